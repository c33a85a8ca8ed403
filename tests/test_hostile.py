"""Issue 14, the rest: hostile outputs, in-sample evaluations, damaged metadata and hostile inputs.

Each case is the issue's reproduction, on a small store whose rows are
written directly (masks drawn as a build draws them, outputs linear in the
masks), so no model is built here. Every refusal is one line and exit code
2, and a snapshot of the files shows that nothing was changed (or, where
something was written, that completed data was left as it was).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coar_dask._yaml import MAX_DEPTH
from coar_dask.cli.main import main
from coar_dask.compat.seed import load_regression_config
from coar_dask.core.experiment import load_experiment
from coar_dask.core.masks import sample_masks
from coar_dask.core.output_paths import check_output_path, write_atomically
from coar_dask.core.spec import Spec
from coar_dask.core.store import COMPLETED, init_store, open_store
from coar_dask.core.verify import repair_store, verify_store
from coar_dask.errors import ConfigError, RegressionError, SpecError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.evaluate import evaluate
from coar_dask.fit.fit import fit
from coar_dask.formats.npy import export_npy, import_npy
from coar_dask.runtime.clusters import load_jobqueue_config as load_slurm_config
from test_bad_input import cli_error, snapshot

torch = pytest.importorskip("torch")

P, K, N, RPC = 8, 5, 120, 20
WEIGHTS = np.random.default_rng(7).normal(size=(P, K))


def make_store(path: Path, mask_seed: int = 0, n: int = N, alpha: float = 0.2, done_blocks=None):
    """A store whose rows hold a build's masks for ``mask_seed`` and outputs linear in them."""
    spec = {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                        "margins": {"dtype": "float32", "shape": [K]}}}
    store = init_store(path, spec, rows_per_chunk=RPC, mask_seed=mask_seed, alpha=alpha)
    noise = np.random.default_rng(mask_seed + 100)
    for block in store.blocks():
        if done_blocks is not None and block.index not in done_blocks:
            continue
        masks = sample_masks(mask_seed, block.rows, P, alpha)
        outputs = masks @ WEIGHTS + 0.01 * noise.normal(size=(len(block), K))
        store.write_block(block.index, {"masks": masks, "margins": outputs})
    return store


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store")


@pytest.fixture
def attrs_file(tmp_path, store):
    out = tmp_path / "out"
    out.mkdir()
    return fit(store, ridge=1e-6).save(out / "a.pt")


def run_ok(argv, capsys) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    return out


# ------------------------------------------------------- item 5: outputs


@pytest.mark.parametrize("target", ["zarr.json", "coar_dask.claim.json", "masks/zarr.json", "masks/c/0/0",
                                    "_completed/c/0"])
def test_fit_out_onto_the_stores_own_files_is_refused(tmp_path, capsys, store, target):
    cli_error(["fit", "--store", store.path, "--out", store.path / target, "--overwrite"], capsys, tmp_path,
              "refusing to write", "zarr store")
    assert verify_store(store.path).ok


def test_run_regression_and_export_npy_into_a_stores_array_are_refused(tmp_path, capsys, store):
    cli_error(["run-regression", "--data.data_path", store.path, "--cfg.out_dir", store.path / "_completed"],
              capsys, tmp_path, "refusing to write", "zarr store")
    cli_error(["export-npy", "--store", store.path, "--out", store.path / "margins", "--overwrite"], capsys,
              tmp_path, "refusing to write")


def test_export_beton_onto_the_stores_metadata_is_refused(tmp_path, capsys, store):
    pytest.importorskip("ffcv")
    cli_error(["export-beton", "--cfg.data_dir", store.path, "--cfg.out_path", store.path / "zarr.json",
               "--overwrite"], capsys, tmp_path, "refusing to write", "zarr store")
    assert verify_store(store.path).ok


def test_an_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path, capsys, store):
    out = tmp_path / "a.pt"
    out.write_bytes(b"old")
    cli_error(["fit", "--store", store.path, "--out", out], capsys, tmp_path, "exists", "--overwrite")
    assert out.read_bytes() == b"old"
    run_ok(["fit", "--store", store.path, "--out", out, "--overwrite"], capsys)
    assert Attributions.load(out).n_components == P
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "store"]  # no temporary file left


def test_a_device_node_is_never_replaced(tmp_path, capsys, store):
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    cli_error(["fit", "--store", store.path, "--out", "/dev/full", "--overwrite"], capsys, tmp_path,
              "not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    with pytest.raises(ConfigError, match="a folder"):
        check_output_path(tmp_path, overwrite=True)


def test_outputs_under_a_file_are_refused(tmp_path, capsys, store, attrs_file):
    file = tmp_path / "FILE"
    file.write_text("x")
    cli_error(["fit", "--store", store.path, "--out", file / "x.pt"], capsys, tmp_path, "is a file, not a folder")
    cli_error(["evaluate", "--attributions", attrs_file, "--store", store.path, "--plot", file / "p.png"],
              capsys, tmp_path, "is a file, not a folder")


def test_evaluate_plot_prints_the_path_it_wrote_and_needs_overwrite(tmp_path, capsys, store, attrs_file):
    pytest.importorskip("matplotlib")
    out = run_ok(["evaluate", "--attributions", attrs_file, "--store", store.path, "--plot", tmp_path / "DIR"],
                 capsys)
    assert (tmp_path / "DIR.png").is_file() and not (tmp_path / "DIR").exists()
    assert f"plot: {tmp_path / 'DIR.png'}" in out
    cli_error(["evaluate", "--attributions", attrs_file, "--store", store.path, "--plot", tmp_path / "DIR"],
              capsys, tmp_path, "DIR.png", "exists", "--overwrite")


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "a.pt"
    out.write_bytes(b"old")

    def fill(tmp: Path) -> None:
        tmp.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ConfigError, match="disk full at") as info:
        write_atomically(out, fill, overwrite=True)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def _tmpfs(folder, options):
    """A real tmpfs mounted at ``folder`` with ``options`` (root only; skips elsewhere), unmounted after."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real full disk."""
    yield from _tmpfs(tmp_path / "full", "size=64k")


@pytest.fixture
def store_tmpfs(tmp_path):
    """A 128 KiB tmpfs: a format-4 store's init (with its coordinate arrays) fits, its build does not."""
    yield from _tmpfs(tmp_path / "full", "size=128k")


def test_fit_out_on_a_full_disk_says_so(tmp_path, capsys, tiny_tmpfs):
    wide = init_store(tmp_path / "wide", {"num_models": 40, "schema": {
        "masks": {"dtype": "bool_", "shape": [600]}, "margins": {"dtype": "float32", "shape": [50]}}},
        rows_per_chunk=40)
    rng = np.random.default_rng(0)
    wide.write_block(0, {"masks": rng.random((40, 600)) > 0.2, "margins": rng.normal(size=(40, 50))})
    cli_error(["fit", "--store", wide.path, "--out", tiny_tmpfs / "a.pt", "--ridge", "1"], capsys,
                    tmp_path / "wide", "disk full at")
    assert not list(tiny_tmpfs.iterdir())


def test_init_on_a_full_disk_says_so_and_leaves_completed_blocks(tmp_path, capsys, tiny_tmpfs):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"num_models": 10_000, "schema": {m: {"dtype": "float32", "shape": [4]}
                                                                for m in [f"a{i}" for i in range(60)]}}))
    capsys.readouterr()
    code = main(["init", "--store", str(tiny_tmpfs / "s"), "--spec", str(spec)])
    err = capsys.readouterr().err
    assert code == 2 and "disk full at" in err and len(err.strip().splitlines()) == 1, err
    assert not list((tiny_tmpfs / "s").iterdir())  # nothing half-made blocks the next init


# ------------------------------------------------- item 6: in-sample evaluation


def test_fit_records_what_it_was_fitted_on(store):
    attrs = fit(store, num_train=60, num_val=20, ridge=1e-6)
    (record,) = attrs.metadata["fitted_on"]["stores"]
    assert record["store"] == str(store.path) and record["store_id"] == store.store_id
    assert (record["mask_seed"], record["alpha"], record["n_rows"]) == (0, 0.2, 80)


def test_evaluate_on_the_training_store_says_in_sample(tmp_path, capsys, store, attrs_file):
    out = run_ok(["evaluate", "--attributions", attrs_file, "--store", store.path], capsys)
    assert out.startswith(f"in-sample correlation over {N} masks") and "held-out" not in out.split("(")[0]
    assert evaluate(attrs_file, store.path).summary()["evaluation"] == "in-sample"


def test_evaluate_on_fresh_masks_says_held_out_and_same_masks_elsewhere_in_sample(tmp_path, capsys, attrs_file):
    fresh = make_store(tmp_path / "fresh", mask_seed=1, n=60)
    out = run_ok(["evaluate", "--attributions", attrs_file, "--store", fresh.path], capsys)
    assert out.startswith("held-out correlation over 60 masks")
    same = make_store(tmp_path / "same", mask_seed=0, n=60)  # another store, the same masks
    assert evaluate(attrs_file, same.path).kind == "in-sample"


def test_a_fit_on_some_rows_evaluated_on_its_store_is_partly_in_sample(store):
    attrs = fit(store, num_train=60, ridge=1e-6)
    result = evaluate(attrs, store)
    assert result.kind == "partly in-sample" and result.n_in_sample == 60
    assert "60 of them in-sample" in result.heading()


def test_attributions_evaluated_on_a_store_of_another_width(tmp_path, capsys, attrs_file):
    other = init_store(tmp_path / "other", {"num_models": 20, "schema": {
        "masks": {"dtype": "bool_", "shape": [P - 2]}, "margins": {"dtype": "float32", "shape": [K]}}})
    cli_error(["evaluate", "--attributions", attrs_file, "--store", other.path], capsys, tmp_path,
              f"{P} components", f"has {P - 2} components")


# ------------------------------------------------------- damaged metadata


@pytest.mark.parametrize("target", ["zarr.json", "masks/zarr.json", "_completed/zarr.json", "_digests/zarr.json"])
@pytest.mark.parametrize("command", ["status", "fit", "build", "init"])
def test_damaged_zarr_json_is_one_line(tmp_path, capsys, store, target, command):
    (store.path / target).write_text("{garbage")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(store.spec.to_dict()))
    argv = {"status": ["status", "--store", store.path],
            "fit": ["fit", "--store", store.path, "--out", tmp_path / "a.pt"],
            "build": ["build", "--store", store.path, "--cluster", "none"],
            "init": ["init", "--store", store.path, "--spec", spec, "--rows-per-chunk", RPC]}[command]
    cli_error(argv, capsys, tmp_path, "cannot be read", target, "Restore")


def test_a_row_count_edited_consistently_is_refused(tmp_path, capsys, store):
    meta = json.loads((store.path / "zarr.json").read_text())
    record = meta["attributes"]["coar_dask"]
    record["spec"]["num_models"] = 200
    record["spec_sha256"] = Spec.from_dict(record["spec"]).sha256
    (store.path / "zarr.json").write_text(json.dumps(meta))
    for argv in (["status", "--store", store.path], ["fit", "--store", store.path, "--out", tmp_path / "a.pt"]):
        cli_error(argv, capsys, tmp_path, "records 200 rows", "has shape (120, 8)")
    assert not verify_store(store.path).ok


def test_a_chunk_folder_is_cleared_by_repair(tmp_path, store):
    chunk = store.path / "margins" / "c" / "2" / "0"
    chunk.unlink()
    chunk.mkdir()
    (chunk / "junk").write_text("x")
    assert 2 in verify_store(store.path).bad_blocks
    repair_store(store.path)
    assert not chunk.exists()
    report = verify_store(store.path)
    assert report.intact and 2 in report.incomplete_blocks


def test_another_tools_zarr_group_is_not_offered_for_deletion(tmp_path, capsys):
    import zarr

    group = zarr.open_group(str(tmp_path / "theirs"), mode="w", zarr_format=3)
    group.create_array("data", shape=(4,), dtype="f4")
    for argv in (["status", "--store", tmp_path / "theirs"], ["verify", tmp_path / "theirs"],
                 ["fit", "--store", tmp_path / "theirs", "--out", tmp_path / "a.pt"]):
        err = cli_error(argv, capsys, tmp_path, "not a coar_dask store", "another tool's data")
        assert "remove" not in err.lower() and "delete" not in err.lower()


def test_rows_beyond_what_a_store_holds_are_refused_before_anything_is_made(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"num_models": 1_000_000_000_000,
                                "schema": {"masks": {"dtype": "bool_", "shape": [P]}}}))
    cli_error(["init", "--store", tmp_path / "s", "--spec", spec], capsys, tmp_path, "at most 100,000,000")


# ------------------------------------------------------- hostile inputs


DEEP = "a: " + "[" * 20_000 + "]" * 20_000 + "\n"
LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


@pytest.mark.parametrize("text", [DEEP, LAUGHS], ids=["deep", "laughs"])
@pytest.mark.parametrize("reader", [load_experiment, load_regression_config, load_slurm_config],
                         ids=["experiment", "regression", "slurm"])
def test_hostile_yaml_is_refused_quickly(tmp_path, text, reader):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"more than {MAX_DEPTH} levels|through its aliases") as info:
        reader(path)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(info.value)


def test_hostile_yaml_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text(LAUGHS)
    cli_error(["init", "--experiment", path, "--rows", "10", "--store", tmp_path / "s"], capsys, tmp_path,
              "through its aliases")


@pytest.mark.parametrize("schema, fragment", [
    ({"m": {"dtype": "longdouble", "shape": [2]}}, "cannot hold"),
    ({"m": {"dtype": "float128", "shape": [2]}}, "cannot hold"),
    ({".": {"dtype": "bool_", "shape": [2]}}, "cannot name a folder"),
    ({"..": {"dtype": "bool_", "shape": [2]}}, "cannot name a folder"),
    ({"zarr.json": {"dtype": "bool_", "shape": [2]}}, "reserved"),
    ({"_digests": {"dtype": "bool_", "shape": [2]}}, "reserved"),
    ({"a\0b": {"dtype": "bool_", "shape": [2]}}, "cannot name a folder"),
    ({"a/b": {"dtype": "bool_", "shape": [2]}}, "cannot name a folder"),
    ({"a\\b": {"dtype": "bool_", "shape": [2]}}, "cannot name a folder"),
])
def test_bad_spec_names_and_dtypes_create_nothing(tmp_path, capsys, schema, fragment):
    (tmp_path / "in").mkdir()
    spec = tmp_path / "in" / "spec.json"
    spec.write_text(json.dumps({"num_models": 10, "schema": schema}))
    cli_error(["init", "--store", tmp_path / "s", "--spec", spec], capsys, tmp_path, fragment)
    assert not (tmp_path / "s").exists()


def test_ulonglong_is_stored_as_uint64(tmp_path):
    store = init_store(tmp_path / "s", {"num_models": 4, "schema": {"m": {"dtype": "ulonglong", "shape": [2]}}})
    store.write_block(0, {"m": np.arange(8, dtype=np.uint64).reshape(4, 2)})
    assert verify_store(store.path).intact and store.array("m").dtype == np.uint64


def _malformed(kind: str) -> dict:
    w = torch.zeros(P, K)
    data = {"weight": w, "bias": torch.zeros(K), "lam": torch.zeros(K), "metadata": {}}
    if kind == "weight-list":
        data["weight"] = w.tolist()
    elif kind == "weight-1d":
        data["weight"] = torch.zeros(P)
    elif kind == "bias-length":
        data["bias"] = torch.zeros(K + 1)
    elif kind == "metadata-string":
        data["metadata"] = "hello"
    elif kind == "target-slice":
        data["metadata"] = {"target_slice": [0, K + 3]}
    elif kind == "nan":
        data["weight"] = torch.zeros((P, K))
        data["weight"][0, 0] = float("nan")  # a stray NaN; a whole NaN row is an unfitted component
    elif kind == "complex":
        data["weight"] = torch.zeros(P, K, dtype=torch.complex64)
    return data


@pytest.mark.parametrize("kind", ["weight-list", "weight-1d", "bias-length", "metadata-string", "target-slice",
                                  "nan", "complex"])
def test_malformed_attributions_files_are_refused(tmp_path, capsys, store, kind):
    path = tmp_path / "bad.pt"
    torch.save(_malformed(kind), path)
    with pytest.raises(RegressionError, match="malformed attributions file"):
        Attributions.load(path)
    cli_error(["evaluate", "--attributions", path, "--store", store.path], capsys, tmp_path,
              "malformed attributions file", "refit")


@pytest.mark.parametrize("flags, fragment", [
    (["--split-seed", "-1"], "--split-seed"),
    (["--device", "tpu"], "--device"),
])
def test_bad_fit_flags(tmp_path, capsys, store, flags, fragment):
    cli_error(["fit", "--store", store.path, "--out", tmp_path / "a.pt", *flags], capsys, tmp_path, fragment)


@pytest.mark.parametrize("address, fragment", [("not an address", "is not a scheduler address"),
                                               ("tcp://127.0.0.1:1", "no Dask scheduler answered")])
def test_a_bad_scheduler_address_fails_fast(tmp_path, capsys, address, fragment):
    store = make_store(tmp_path / "pending", done_blocks={0})  # blocks pending: a completed store needs no cluster
    t0 = time.perf_counter()
    cli_error(["build", "--store", store.path, "--cluster", "address", "--address", address,
               "--experiment", Path(__file__).parents[1] / "configs" / "digits.yaml"], capsys, tmp_path, fragment)
    assert time.perf_counter() - t0 < 30


# ------------------------------------------------------- imported stores


def test_imported_stores_record_digests_and_partial_flags(tmp_path):
    src = make_store(tmp_path / "src", done_blocks={0, 1, 3})
    flags = src.completed_rows()
    flags[65] = False  # a partly done block (3)
    export_npy(src, tmp_path / "npy")
    done = np.lib.format.open_memmap(tmp_path / "npy" / f"{COMPLETED}.npy", mode="r+")
    done[65] = False
    done.flush()
    del done
    store = import_npy(tmp_path / "npy", tmp_path / "imported", rows_per_chunk=RPC)
    assert store.has_digests
    np.testing.assert_array_equal(store.completed_rows(), flags)
    report = verify_store(store.path)
    assert report.intact and 3 in report.partial_blocks
    a, b = (store.path / "margins" / "c" / str(i) / "0" for i in (0, 1))
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)
    assert {0, 1} <= set(verify_store(store.path).bad_blocks)


def test_a_build_on_a_full_disk_says_so_and_keeps_its_completed_blocks(tmp_path, capsys, store_tmpfs):
    tiny_tmpfs = store_tmpfs
    exp = tmp_path / "tiny.yaml"
    exp.write_text("model: conftest:tiny_model\nexamples: conftest:tiny_examples\nalpha: 0.2\nrun:\n  batch_size: 5\n")
    store = tiny_tmpfs / "s"
    run_ok(["init", "--store", store, "--experiment", exp, "--rows", "200", "--rows-per-chunk", "10"], capsys)
    capsys.readouterr()
    assert main(["build", "--store", str(store), "--cluster", "none"]) == 2
    err = capsys.readouterr().err
    assert "disk full at" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    report = verify_store(store)
    assert report.intact and 0 < report.completed_blocks < report.n_blocks


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (root ignores folder permissions; a read-only mount it cannot)."""
    yield from _tmpfs(tmp_path / "ro", "ro,size=64k")


def test_a_read_only_folder_is_one_line(tmp_path, capsys, store, read_only_folder):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(store.spec.to_dict()))
    cli_error(["init", "--store", read_only_folder / "s", "--spec", spec], capsys, tmp_path / "store",
              "read-only filesystem")
    cli_error(["fit", "--store", store.path, "--out", read_only_folder / "a.pt"], capsys, tmp_path / "store",
              "read-only filesystem")


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_init_store_refuses_a_mask_seed_that_is_not_a_non_negative_integer(tmp_path, seed):
    """Issue 22: `init --mask-seed -1` was refused by the CLI only; `init_store(..., mask_seed=-1)` made a store.
    The check now lives in init_store, which both use."""
    from coar_dask.errors import StoreError

    spec = {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [4]}}}
    with pytest.raises(StoreError, match="mask_seed must be a non-negative integer"):
        init_store(tmp_path / "s", spec, mask_seed=seed)
    assert not (tmp_path / "s").exists()


_KILL_THE_SCHEDULER = '''
import sys, threading, time

def kill_scheduler_after_a_block(store_path):
    from distributed import Scheduler
    from coar_dask.core.store import open_store
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not open_store(store_path, read_only=True).completed_blocks().any():
        time.sleep(0.2)
    for scheduler in list(Scheduler._instances):
        scheduler.loop.add_callback(scheduler.close)

if __name__ == "__main__":
    threading.Thread(target=kill_scheduler_after_a_block, args=(sys.argv[1],), daemon=True).start()
    from coar_dask.cli.main import main
    sys.exit(main(["build", sys.argv[1], "--cluster", "local", "--workers", "2"]))
'''


def test_a_killed_scheduler_during_a_build_is_one_line_naming_resume(tmp_path, coar_dask_cli):
    """Issue 22: a LocalCluster whose scheduler dies mid-build printed ~250 lines (one error per block and
    distributed's reconnect tracebacks). Now: one line saying what happened, that completed blocks are kept
    and how to resume; exit 2. The scheduler is closed from a thread of the CLI's own process (the
    LocalCluster's scheduler lives there) once a block is complete."""
    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    store = tmp_path / "s"
    init = subprocess.run([*coar_dask_cli, "init", "--experiment", str(config), "--store", str(store), "--rows",
                           "2000", "--rows-per-chunk", "20"], capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    script = tmp_path / "build_and_kill.py"
    script.write_text(_KILL_THE_SCHEDULER)
    proc = subprocess.run([sys.executable, str(script), str(store)], capture_output=True, text=True, timeout=500,
                          cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) <= 5, proc.stderr  # workers may log 'close-stream'
    assert lines[-1].startswith("coar-dask build: error: lost the connection to the Dask scheduler"), lines[-1]
    assert "completed in this session are kept" in lines[-1] and f"coar-dask build {store}" in lines[-1]
    assert 0 < int(open_store(store, read_only=True).completed_blocks().sum()) < 100
