"""A store knows what made it (issue 22 items 1, 2, 5; issue 27 item 7).

* block digests are bound to the store (the id it is given when claimed) and
  to the claimed experiment: data and digest chunks copied between two stores
  of the same layout, even holding the same values, are refused;
* copies of an unbuilt store (``cp -r``) get ids of their own when claimed;
* digests of what the factories returned (model state, examples, labels) are
  recorded when the store is claimed and checked by every session and worker
  before its first block: a weights file changed between sessions, or
  examples in another order on each worker, are refused naming what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coar_dask.core.spec import Spec
from coar_dask.core.store import init_store, open_store
from coar_dask.core.verify import verify_store
from coar_dask.errors import CorruptBlockError

P, K, RPC = 40, 7, 5


def _copy_block_chunks(src: Path, dst: Path, names: list[str], index: int) -> None:
    """Copy block ``index``'s chunk files of ``names`` and of ``_digests`` from one store into another."""
    src_store, dst_store = open_store(src), open_store(dst)
    for name in [*names, "_digests"]:
        shutil.copyfile(src_store.chunk_path(name, index), dst_store.chunk_path(name, index))


def test_chunks_copied_between_stores_of_the_same_layout_and_values_are_refused(tmp_path):
    """Issue 27 item 7: the copied chunks hold the very values the other store holds, so only the
    store's id in the digest tells them apart."""
    spec = Spec.for_experiment(10, P, K)
    rng = np.random.default_rng(0)
    blocks = [{"masks": rng.random((RPC, P)) > 0.1, "margins": rng.normal(size=(RPC, K)).astype(np.float16)}
              for _ in range(2)]
    for name in ("a", "b"):
        store = init_store(tmp_path / name, spec, rows_per_chunk=RPC)
        for i, data in enumerate(blocks):
            store.write_block(i, data)
    assert open_store(tmp_path / "a").read_verified(1)["margins"].tobytes() == blocks[1]["margins"].tobytes()
    _copy_block_chunks(tmp_path / "a", tmp_path / "b", ["masks", "margins"], 1)
    b = open_store(tmp_path / "b")
    with pytest.raises(CorruptBlockError, match="block 1 "):
        b.read_verified(1)
    report = verify_store(b)
    assert not report.ok
    assert {(p.kind, p.block) for p in report.problems} >= {("digest_mismatch", 1)}
    b.read_verified(0)  # the block not copied still reads


# -- a user's module: an MLP on digits whose load_model() reads mlp.pt ---------------------------------

MYMOD = '''
import os

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def load_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model.load_state_dict(torch.load(os.path.join(HERE, "mlp.pt"), weights_only=True))
    return model.eval()


def examples():
    data = np.load(os.path.join(HERE, "digits.npz"))
    return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


def shuffled_examples():
    """Examples in another order in each process (shuffled with the process id)."""
    x, y = examples()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(os.getpid()))
    return x[order], y[order]
'''

ROWS, ROWS_PER_BLOCK = 50, 10


def _write_user_module(folder: Path) -> None:
    import torch
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mymod.py").write_text(MYMOD)
    digits = load_digits()
    np.savez(folder / "digits.npz", x=(digits.data[:100] / 16.0).astype(np.float32),
             y=digits.target[:100].astype(np.int64))
    for name, seed in (("mlp_a.pt", 0), ("mlp_b.pt", 1)):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        torch.save(net.state_dict(), folder / name)
    shutil.copyfile(folder / "mlp_a.pt", folder / "mlp.pt")


def _experiment_yaml(folder: Path, name: str = "exp.yaml", examples: str = "mymod:examples",
                     output: str = "margin") -> Path:
    path = folder / name
    path.write_text(
        f"model: {{factory: 'mymod:load_model'}}\nexamples: {{factory: '{examples}'}}\n"
        f"components: {{kinds: [linear]}}\noutput: {output}\nalpha: 0.1\nmask_seed: 0\n"
        f"run: {{batch_size: 100, device: cpu}}\n"
    )
    return path


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder holding mymod.py, its weights and data, importable here, by subprocesses and by workers."""
    folder = tmp_path / "user"
    _write_user_module(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    for name in [m for m in sys.modules if m == "mymod"]:
        monkeypatch.delitem(sys.modules, name)
    return folder


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


_BUILD_3 = ("import dataclasses; from coar_dask.runtime.build import plan_build, execute_plan; "
            "plan = plan_build('s', 'exp.yaml'); execute_plan(dataclasses.replace(plan, blocks=plan.blocks[:3]))")


def _change_examples(folder: Path) -> None:
    data = dict(np.load(folder / "digits.npz"))
    data["x"] = data["x"][::-1].copy()  # the same images, in another order; labels unchanged
    np.savez(folder / "digits.npz", **data)


@pytest.mark.parametrize("change, named", [
    (lambda folder: shutil.copyfile(folder / "mlp_b.pt", folder / "mlp.pt"), "model state"),
    (_change_examples, "examples"),
], ids=["weights", "examples"])
def test_a_second_session_with_other_weights_or_examples_is_refused(user_folder, coar_dask_cli, change, named):
    """Issue 22 item 1: build 3 blocks, change what a factory reads, `coar-dask build`: refused, naming what
    changed; the store still verifies and, with the file restored, the build completes."""
    folder = user_folder
    _experiment_yaml(folder)
    init = _run([*coar_dask_cli, "init", "--experiment", "exp.yaml", "--store", "s", "--rows", str(ROWS),
                 "--rows-per-chunk", str(ROWS_PER_BLOCK)], folder)
    assert init.returncode == 0, init.stderr
    first = _run([sys.executable, "-c", _BUILD_3], folder)
    assert first.returncode == 0, first.stderr
    assert int(open_store(folder / "s").completed_blocks().sum()) == 3
    backup = {p: p.read_bytes() for p in (folder / "mlp.pt", folder / "digits.npz")}
    change(folder)
    second = _run([*coar_dask_cli, "build", "--store", "s", "--cluster", "none"], folder)
    assert second.returncode == 2, (second.returncode, second.stdout, second.stderr)
    assert "Traceback" not in second.stderr, second.stderr
    errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and named in errors[0] and "new store" in errors[0], second.stderr
    assert int(open_store(folder / "s").completed_blocks().sum()) == 3  # nothing written
    for path, data in backup.items():
        path.write_bytes(data)
    third = _run([*coar_dask_cli, "build", "--store", "s", "--cluster", "none"], folder)
    assert third.returncode == 0, third.stderr
    report = verify_store(folder / "s")
    assert report.ok, report.format()


def test_examples_in_another_order_on_each_worker_are_refused(user_folder):
    """Issue 22 item 2: an examples factory that shuffles with the process id, two workers: every block is
    refused (the workers' examples differ from the ones recorded at the claim), none is written."""
    from distributed import Client, LocalCluster

    from coar_dask.errors import BuildError
    from coar_dask.runtime.build import init_experiment_store, run_build

    exp = _experiment_yaml(user_folder, examples="mymod:shuffled_examples")
    store = init_experiment_store(user_folder / "s", str(exp), ROWS, rows_per_chunk=ROWS_PER_BLOCK)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(BuildError) as info:
            run_build(store, str(exp), client=client, retries=0)
    assert "examples" in str(info.value) and "same order" in str(info.value)
    assert not open_store(store.path).completed_rows().any()


def test_copies_of_an_unbuilt_store_get_ids_of_their_own(user_folder):
    """Issue 22 item 5: `cp -r` an initialised store, build both with different experiments, copy a block's
    data and digest chunks from one into the other: verify finds it."""
    from coar_dask.runtime.build import init_experiment_store, run_build

    margin = _experiment_yaml(user_folder, "margin.yaml", output="margin")
    logit = _experiment_yaml(user_folder, "logit.yaml", output="correct_logit")
    init_experiment_store(user_folder / "a", str(margin), ROWS, rows_per_chunk=ROWS_PER_BLOCK)
    shutil.copytree(user_folder / "a", user_folder / "b")
    run_build(user_folder / "a", str(margin))
    run_build(user_folder / "b", str(logit))
    assert verify_store(user_folder / "b").ok
    _copy_block_chunks(user_folder / "a", user_folder / "b", ["masks", "margins"], 2)
    report = verify_store(user_folder / "b")
    assert not report.ok
    assert ("digest_mismatch", 2) in {(p.kind, p.block) for p in report.problems}, report.format()
    assert open_store(user_folder / "a").store_id != open_store(user_folder / "b").store_id


def test_a_store_with_blocks_written_before_its_claim_keeps_its_id(user_folder):
    """An import writes blocks before any claim: a build claiming the store afterwards keeps the id those
    blocks' digests are bound to, so they still read."""
    from coar_dask.core.experiment import load_state
    from coar_dask.core.masks import sample_masks
    from coar_dask.runtime.build import init_experiment_store, run_build

    exp = _experiment_yaml(user_folder)
    store = init_experiment_store(user_folder / "s", str(exp), ROWS, rows_per_chunk=ROWS_PER_BLOCK)
    first = store.block(0)
    n = load_state(__import__("coar_dask").core.experiment.load_experiment(str(exp))).n_components
    store.write_block(0, {"masks": sample_masks(0, first.rows, n, 0.1),
                          "margins": np.zeros((len(first), 100), np.float16)})
    init_id = store.store_id
    run_build(store, str(exp))
    built = open_store(store.path)
    assert built.store_id == init_id
    assert verify_store(built).ok


def test_a_format_2_claim_still_verifies(tmp_path):
    """A store claimed by an earlier coar_dask (a claim without an id): its digests stay bound to the id
    its init recorded, so it opens, reads and verifies."""
    import json

    spec = Spec.for_experiment(10, P, K)
    store = init_store(tmp_path / "s", spec, rows_per_chunk=RPC)
    (tmp_path / "s" / "coar_dask.claim.json").write_text(json.dumps({"experiment_fingerprint": "f" * 64}))
    rng = np.random.default_rng(1)
    data = {"masks": rng.random((RPC, P)) > 0.1, "margins": rng.normal(size=(RPC, K)).astype(np.float16)}
    store.write_block(0, data)
    reopened = open_store(tmp_path / "s")
    assert reopened.store_id == store.meta["store_id"]
    np.testing.assert_array_equal(reopened.read_verified(0)["margins"], data["margins"])


def test_digits_training_gives_the_same_weights_whatever_the_thread_count(tmp_path):
    """Issue 22 item 1: workers that each train the built-in model (no cached one) with different thread
    counts must hold the same model, else the store refuses one of them."""
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from coar_dask.zoo.digits import train_model, model_digest; "
            "print(model_digest(train_model(epochs=1)))")
    digests = {_run([sys.executable, "-c", code, str(t)], tmp_path).stdout.strip() for t in (1, 2)}
    assert len(digests) == 1 and "" not in digests, digests


def test_api_misuse_says_what_was_expected(tmp_path):
    """Issue 22's API misuse list: ``open_store(123)`` and ``run_build(store, 5)`` raise one CoarError
    saying what was expected."""
    from coar_dask.errors import CoarError
    from coar_dask.runtime.build import run_build

    with pytest.raises(CoarError, match="str or os.PathLike"):
        open_store(123)
    with pytest.raises(CoarError, match="str or os.PathLike"):
        init_store(None, Spec.for_experiment(10, P, K))
    store = init_store(tmp_path / "s", Spec.for_experiment(10, P, K), rows_per_chunk=RPC)
    with pytest.raises(CoarError, match="coar_dask.Experiment, a mapping .*found int 5"):
        run_build(store, 5)
    with pytest.raises(CoarError, match="found list"):
        run_build([store], None)


def test_an_evaluation_stores_content_record_names_its_own_experiment(user_folder):
    """A train and an evaluation store (another mask seed) share one loaded state in a process; each
    store's content record names the experiment that claimed it, not the first one loaded."""
    import json

    from coar_dask.core.experiment import load_experiment
    from coar_dask.core.identity import CONTENT_FILE
    from coar_dask.runtime.build import init_experiment_store, run_build

    train = load_experiment(str(_experiment_yaml(user_folder)))
    held = train.replace(mask_seed=1)
    for name, exp in (("train", train), ("held", held)):
        init_experiment_store(user_folder / name, exp, ROWS, rows_per_chunk=ROWS_PER_BLOCK)
        run_build(user_folder / name, exp)
    for name, exp in (("train", train), ("held", held)):
        record = json.loads(open_store(user_folder / name).record_file(CONTENT_FILE).read_text())
        assert record["experiment_fingerprint"] == exp.fingerprint == open_store(user_folder / name).experiment_fingerprint
