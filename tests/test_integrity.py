"""Issue 14's silent wrong results, each with its reproduction: nothing is mixed, swapped or fitted on zeros.

1. two builds of different experiments started together on one store: one is
   refused before computing, and the store verifies;
2. chunks swapped between blocks, copied from another store or replaced by a
   link: ``verify`` finds them and ``fit`` / ``evaluate`` refuse them;
3. a deleted chunk, a chunk replaced by a folder, flags set for rows never
   built, damaged chunk bytes: ``fit`` refuses, naming the block and
   ``coar-dask repair``;
7. ``fit --x-name margins --y-name masks`` is refused;

plus: a store's path is absolute, a worker that cannot see the store says
that a shared filesystem is needed, and stores written before digests still
open, verify and fit. The .beton items are in ``test_beton.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from coar_dask.core.experiment import load_experiment, load_state
from coar_dask.core.store import COMPLETED, init_store, open_store
from coar_dask.core.verify import repair_store, verify_store
from coar_dask.errors import BuildError, CoarError, CorruptBlockError, RegressionError
from coar_dask.fit.evaluate import eval_store_for, evaluate
from coar_dask.fit.rows import StoreRows, infer_names
from coar_dask.runtime.build import plan_build, run_block, run_build

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
E = ROOT / "configs" / "digits.yaml"
N, RPC = 300, 50


def _cli(coar_dask_cli, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*coar_dask_cli, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _experiment_copy(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(E.read_text())
    data.update(changes)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(data))
    return out


def _one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit code 2 and one error line holding every needle; no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits_experiment):
    """A complete digits store (6 blocks) and its evaluation store, built in this process."""
    root = tmp_path_factory.mktemp("integrity")
    state = load_state(digits_experiment)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = eval_store_for(root / "store", digits_experiment, N, state.n_components, state.n_examples,
                               rows_per_chunk=RPC)
        run_build(store, digits_experiment)
        eval_exp = load_experiment({**digits_experiment.to_dict(), "mask_seed": 1})
        eval_store = eval_store_for(root / "eval", eval_exp, 100, state.n_components, state.n_examples,
                                    rows_per_chunk=RPC)
        run_build(eval_store, eval_exp)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def store_copy(built, tmp_path):
    """A fresh copy of the built store (and its evaluation store) to damage."""
    for name in ("store", "eval"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path / "store"


def _fit(coar_dask_cli, store: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli(coar_dask_cli, "fit", "--store", str(store), "--out", str(tmp_path / "attr.pt"), *extra)


# ------------------------------------------------------------------ item 1


def _race(coar_dask_cli, store: Path, first: Path, second: Path) -> tuple[subprocess.CompletedProcess, ...]:
    """Start a build of ``first``, and 0.3 s later one of ``second``, on the same store."""
    cmd = [*coar_dask_cli, "build", "--store", str(store), "--cluster", "none", "--experiment"]
    a = subprocess.Popen([*cmd, str(first)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    b = subprocess.Popen([*cmd, str(second)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for proc in (a, b):
        stdout, stderr = proc.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return tuple(out)


def _assert_one_refused(store: Path, results, experiments) -> None:
    codes = [r.returncode for r in results]
    assert sorted(codes) == [0, 2], [(r.returncode, r.stderr[-2000:]) for r in results]
    winner = codes.index(0)
    _one_line_refusal(results[1 - winner], "belongs to another experiment")
    opened = open_store(store, read_only=True)
    assert opened.experiment_fingerprint == load_experiment(experiments[winner]).fingerprint
    assert opened.read_claim()["experiment_fingerprint"] == opened.experiment_fingerprint
    report = verify_store(store)
    assert report.ok, report.format()


def test_two_builds_of_different_outputs_one_refused_and_store_verifies(coar_dask_cli, digits_experiment, tmp_path):
    store = tmp_path / "s"
    init = _cli(coar_dask_cli, "init", "--experiment", str(E), "--rows", "600", "--store", str(store))
    assert init.returncode == 0, init.stderr
    other = _experiment_copy(tmp_path, "correct_logit.yaml", output="correct_logit")
    results = _race(coar_dask_cli, store, E, other)
    _assert_one_refused(store, results, (E, other))


def test_two_builds_of_different_alphas_on_a_seed_initialized_store(coar_dask_cli, digits_experiment, tmp_path):
    state = load_state(load_experiment(E))
    spec = tmp_path / "spec.json"
    spec.write_text(
        '{"num_models": 600, "schema": {"masks": {"dtype": "bool_", "shape": [%d]}, '
        '"margins": {"dtype": "float16", "shape": [%d]}}}' % (state.n_components, state.n_examples)
    )
    store = tmp_path / "s"
    init = subprocess.run([sys.executable, "-m", "coar_dask.initialize_store", "--logging.logdir", str(store),
                           "--logging.spec", str(spec)], capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    assert open_store(store).alpha is None  # the seed's init records no alpha: only the claim decides
    a05 = _experiment_copy(tmp_path, "a05.yaml", alpha=0.05)
    a10 = _experiment_copy(tmp_path, "a10.yaml", alpha=0.10)
    results = _race(coar_dask_cli, store, a05, a10)
    _assert_one_refused(store, results, (a05, a10))


def test_a_task_of_another_experiment_writes_nothing(store_copy, digits_experiment):
    other = load_experiment({**digits_experiment.to_dict(), "output": "correct_logit"})
    before = open_store(store_copy).chunk_path("margins", 0).read_bytes()
    with pytest.raises(BuildError, match="belongs to another experiment"):
        run_block(str(store_copy), other, 0)
    assert open_store(store_copy).chunk_path("margins", 0).read_bytes() == before


# ------------------------------------------------------------------ item 2


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap.tmp")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def _swap_3_5(store: Path) -> list[int]:
    _swap(store / "margins" / "c" / "3" / "0", store / "margins" / "c" / "5" / "0")
    return [3, 5]


def _copy_from_eval(store: Path) -> list[int]:
    shutil.copyfile(store.parent / "eval" / "margins" / "c" / "1" / "0", store / "margins" / "c" / "1" / "0")
    return [1]


def _link_to_other_block(store: Path) -> list[int]:
    chunk = store / "margins" / "c" / "4" / "0"
    chunk.unlink()
    chunk.symlink_to(store / "margins" / "c" / "2" / "0")
    return [4]


@pytest.mark.parametrize("damage", [_swap_3_5, _copy_from_eval, _link_to_other_block],
                         ids=["swapped", "copied-from-eval-store", "symlinked"])
def test_swapped_copied_or_linked_chunks_fail_verify_and_fit(damage, store_copy, coar_dask_cli, tmp_path):
    bad = damage(store_copy)
    report = verify_store(store_copy)
    assert not report.ok and list(report.bad_blocks) == bad, report.format()
    assert {p.kind for p in report.problems} <= {"digest_mismatch", "not_a_file"}
    line = _one_line_refusal(_fit(coar_dask_cli, store_copy, tmp_path), f"block {bad[0]} ", "coar-dask repair")
    assert not (tmp_path / "attr.pt").exists(), line
    repaired = repair_store(store_copy)
    assert repaired.reset_blocks == tuple(bad)
    assert verify_store(store_copy).intact


def test_evaluate_refuses_a_swapped_chunk_of_the_evaluation_store(store_copy, digits_experiment):
    from coar_dask.fit.fit import fit

    attributions = fit(open_store(store_copy, read_only=True))
    eval_path = store_copy.parent / "eval"
    assert evaluate(attributions, eval_path).n_rows == 100
    _swap(eval_path / "masks" / "c" / "0" / "0", eval_path / "masks" / "c" / "1" / "0")
    with pytest.raises(CorruptBlockError, match=r"block 0 .*coar-dask repair"):
        evaluate(attributions, eval_path)


# ------------------------------------------------------------------ item 3


def _delete_chunk(store: Path) -> int:
    (store / "margins" / "c" / "2" / "0").unlink()
    return 2


def _folder_chunk(store: Path) -> int:
    chunk = store / "margins" / "c" / "3" / "0"
    chunk.unlink()
    chunk.mkdir()
    return 3


def _damaged_bytes(store: Path) -> int:
    chunk = store / "masks" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    chunk.write_bytes(bytes(data))
    return 1


@pytest.mark.parametrize("damage", [_delete_chunk, _folder_chunk, _damaged_bytes],
                         ids=["deleted", "folder", "damaged-bytes"])
def test_fit_refuses_missing_folder_or_damaged_chunks(damage, store_copy, coar_dask_cli, tmp_path):
    b = damage(store_copy)
    _one_line_refusal(_fit(coar_dask_cli, store_copy, tmp_path), f"block {b} ", "coar-dask repair")
    assert b in verify_store(store_copy).bad_blocks
    repair_store(store_copy)
    report = verify_store(store_copy)
    assert report.intact and report.incomplete_blocks == (b,), report.format()
    assert not (store_copy / "margins" / "c" / str(b) / "0").is_dir()  # repair clears a folder chunk


def test_flags_set_for_rows_never_built_are_refused(tmp_path, coar_dask_cli, digits_experiment):
    state = load_state(digits_experiment)
    store = eval_store_for(tmp_path / "s", digits_experiment, N, state.n_components, state.n_examples,
                           rows_per_chunk=RPC)
    plan_build(store, digits_experiment)  # claims the store; then blocks 0-2 only are built
    for b in (0, 1, 2):
        run_block(str(store.path), digits_experiment, b)
    open_store(store.path).array(COMPLETED)[:] = True
    line = _one_line_refusal(_fit(coar_dask_cli, store.path, tmp_path), "block 3 ", "no digest",
                             "coar-dask repair")
    assert "flagged completed" in line
    assert verify_store(store.path).bad_blocks == (3, 4, 5)


# ------------------------------------------------------------------ item 7


def test_fit_with_the_outputs_as_masks_is_refused(built, coar_dask_cli, tmp_path):
    proc = _fit(coar_dask_cli, built / "store", tmp_path, "--x-name", "margins", "--y-name", "masks")
    _one_line_refusal(proc, "x_name='margins'", "must be bool")
    with pytest.raises(RegressionError, match="must be bool"):
        infer_names(open_store(built / "store", read_only=True), "margins", "masks")


# ------------------------------------------------------------ paths, workers


def test_store_path_is_absolute(built, monkeypatch, tmp_path):
    monkeypatch.chdir(built)
    assert open_store("store").path == built / "store"
    monkeypatch.chdir(tmp_path)
    made = init_store("new", {"num_models": 4, "schema": {"masks": {"dtype": "bool_", "shape": [2]}}})
    assert made.path.is_absolute() and made.path == tmp_path / "new"


def test_a_worker_that_cannot_see_the_store_says_a_shared_filesystem_is_needed(digits_experiment, tmp_path):
    with pytest.raises(BuildError, match="does not see the store folder .*shared filesystem") as err:
        run_block(str(tmp_path / "not-mounted-here"), digits_experiment, 0)
    assert "coar-dask init" not in str(err.value)


def test_a_relative_store_path_builds_on_workers_started_in_another_folder(digits_experiment, tmp_path,
                                                                           monkeypatch):
    """Issue 13, bug 2: a relative --store reached the workers unchanged and every block failed there."""
    from coar_dask.runtime.build import init_experiment_store
    from coar_dask.runtime.clusters import cluster_client

    workers_home, mine = tmp_path / "workers", tmp_path / "client"
    workers_home.mkdir(), mine.mkdir()
    monkeypatch.chdir(workers_home)  # the workers start here, and stay here
    with cluster_client("local", n_workers=1, gpus=0) as client:
        assert list(client.run(os.getcwd).values()) == [str(workers_home)]
        monkeypatch.chdir(mine)
        init_experiment_store("rel/store", digits_experiment, 2 * RPC, rows_per_chunk=RPC)
        report = run_build("rel/store", digits_experiment, client=client)
    assert report.rows_done == 2 * RPC and not report.failed
    assert verify_store(mine / "rel" / "store").ok
    assert not (workers_home / "rel").exists()


# ------------------------------------------------------------- old stores


def test_a_store_without_digests_opens_verifies_and_fits(built, tmp_path, digits_experiment):
    from coar_dask.fit.fit import fit

    state = load_state(digits_experiment)
    old = init_store(tmp_path / "old", open_store(built / "store").spec, rows_per_chunk=RPC,
                     mask_seed=digits_experiment.mask_seed, alpha=digits_experiment.alpha, digests=False)
    new = open_store(built / "store", read_only=True)
    for b in range(new.n_blocks):
        old.write_block(b, new.read_verified(b))
    meta = old.meta
    meta["format_version"] = 1  # as an earlier coar_dask wrote it: no store_id, no digests
    del meta["store_id"], meta["block_digest"]
    import zarr

    zarr.open_group(str(old.path), mode="r+").attrs["coar_dask"] = meta
    shutil.rmtree(old.path / "_digests", ignore_errors=True)
    reopened = open_store(old.path)
    assert not reopened.has_digests and state.n_components == reopened.spec["masks"].shape[0]
    report = verify_store(old.path)
    assert report.ok and any("no block digests" in n for n in report.notes), report.format()
    a, b = fit(reopened), fit(new)
    np.testing.assert_array_equal(a.weight, b.weight)
    rows = StoreRows(reopened, np.arange(N), "masks", "margins")
    (reopened.path / "margins" / "c" / "2" / "0").unlink()
    with pytest.raises(CorruptBlockError, match="block 2 .*missing"):
        list(rows.blocks())
    assert isinstance(CorruptBlockError("x"), CoarError)
