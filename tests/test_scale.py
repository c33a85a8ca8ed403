"""Issue 16: the store as Dask arrays, and row-parallel least-squares fits, on a real LocalCluster."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from coar_dask.core.masks import sample_masks
from coar_dask.core.store import COMPLETED, init_store, open_store
from coar_dask.errors import CorruptBlockError

N, RPC, P, K = 430, 50, 40, 7
SEED, ALPHA = 5, 0.1


def _outputs(masks: np.ndarray, offset: float = 30.0) -> np.ndarray:
    w = np.random.default_rng(2).normal(size=(masks.shape[1], K))
    noise = np.random.default_rng(3).normal(scale=0.1, size=(masks.shape[0], K))
    return (offset + masks @ w + noise).astype(np.float16)


def make_store(path, blocks=None):
    store = init_store(path, {"num_models": N, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                                           "margins": {"dtype": "float16", "shape": [K]}}},
                       rows_per_chunk=RPC, mask_seed=SEED, alpha=ALPHA)
    masks = sample_masks(SEED, range(N), P, ALPHA)
    y = _outputs(masks)
    for b in store.blocks() if blocks is None else [store.block(i) for i in blocks]:
        store.write_block(b.index, {"masks": masks[b.start:b.stop], "margins": y[b.start:b.stop]})
    return store, masks, y


@pytest.fixture(scope="module")
def client():
    from coar_dask.runtime.clusters import cluster_client

    with cluster_client("local", n_workers=2) as c:
        yield c


def test_to_dask_is_lazy_one_chunk_per_block_and_computes_on_the_cluster(tmp_path, client):
    blocks = [0, 2, 3, 8]  # the last block has 30 rows
    store, masks, y = make_store(tmp_path / "s", blocks)
    done = store.to_dask(COMPLETED)
    ys = store.to_dask("margins")
    assert ys.chunks == ((RPC,) * 8 + (N - 8 * RPC,), (K,)) and done.chunks == (ys.chunks[0],)
    assert store.to_dask("masks").dtype == bool and ys.dtype == np.float16
    from distributed import get_task_stream

    with get_task_stream(client) as ts:
        mean = ((ys.astype("float64") * done[:, None]).sum(axis=0) / done.sum()).compute()
    rows = np.concatenate([store.block(b).rows for b in blocks])
    np.testing.assert_allclose(mean, y[rows].astype(np.float64).mean(0), rtol=1e-12)
    assert len(ts.data) >= 9  # ran on the workers, at least one task per block
    np.testing.assert_array_equal(store.to_dask("masks")[rows].compute(), masks[rows])
    np.testing.assert_array_equal(store.to_dask("masks", verify=True).compute()[rows], masks[rows])
    np.testing.assert_array_equal(store.to_dask("masks", verify=True).compute()[store.block(1).rows], False)


def test_to_dask_verify_checks_digests_and_plain_reads_do_not(tmp_path):
    store, masks, _ = make_store(tmp_path / "s")
    a, b = store.chunk_path("masks", 0), store.chunk_path("masks", 3)
    tmp = tmp_path / "tmp"
    shutil.move(a, tmp), shutil.move(b, a), shutil.move(tmp, b)  # two blocks' chunks swapped
    store = open_store(store.path, read_only=True)
    swapped = store.to_dask("masks").compute()  # documented: no digest check
    np.testing.assert_array_equal(swapped[:RPC], masks[3 * RPC:4 * RPC])
    with pytest.raises(CorruptBlockError, match="block [03] .*digest differs"):
        store.to_dask("masks", verify=True).compute(scheduler="sync")
    assert store.to_dask("margins", verify=True).astype("float64").sum().compute(scheduler="sync") != 0


# ------------------------------------------------------------- row-parallel fits (issue 16.3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("scale") / "s")[0]


def _close(a, b, rtol=1e-5):
    scale = np.abs(b.weight).max()
    np.testing.assert_allclose(a.weight, b.weight, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(a.bias, b.bias, rtol=rtol)


@pytest.mark.parametrize("kwargs", [{}, {"num_val": 60, "ridge_grid": "auto", "refit": True}, {"ridge": 2.0}],
                         ids=["plain", "grid-refit", "ridge"])
def test_row_parallel_fit_equals_the_in_process_fit(built, client, kwargs):
    from coar_dask.fit.fit import fit

    local = fit(built, **kwargs)
    events = []
    rows = fit(built, client=client, progress=events.append, **kwargs)  # auto: lstsq gram on the CPU -> rows
    moments = [e for e in events if e.stage == "moments"]
    assert moments[-1].done == moments[-1].total == local.metadata["n_train"]  # rows, as in-process
    assert rows.metadata["parallel"] == "rows" and rows.metadata["row_groups"] == 2  # one per worker thread
    _close(rows, local)
    np.testing.assert_array_equal(rows.lam, local.lam)
    assert rows.metadata["n_train"] == local.metadata["n_train"]
    for key in ("val_mse", "val_correlation"):
        if key in local.metadata:
            np.testing.assert_allclose(rows.metadata[key], local.metadata[key], rtol=1e-4)


def test_row_parallel_without_a_client_and_with_many_groups(built):
    from coar_dask.fit.core import assemble
    from coar_dask.fit.fit import fit
    from coar_dask.fit.moments import execute_rows
    from coar_dask.fit.plan import FitSettings, plan_fit

    s = FitSettings(num_val=30, split_seed=4)
    plan = plan_fit(built.path, s, execution="rows")
    _close(assemble(plan, [execute_rows(plan, None, groups=9)]), fit(built.path, settings=s))


def test_slices_stay_when_asked_for_or_when_x_t_x_is_too_large(built, client):
    from coar_dask.fit.fit import fit

    assert "parallel" not in fit(built, client=client, slices=2).metadata
    big = fit(built, client=client, max_gram_bytes=8 * (P * P - 1))  # auto -> cg: target slices
    assert "parallel" not in big.metadata and big.metadata["method"] == "cg"
    assert "parallel" not in fit(built, client=client, solver="saga", num_val=40).metadata


def test_a_corrupt_block_fails_a_row_parallel_fit_naming_it(built, client, tmp_path):
    from coar_dask.errors import RegressionError
    from coar_dask.fit.fit import fit

    path = tmp_path / "bad"
    shutil.copytree(built.path, path)
    store = open_store(path)
    store.chunk_path("margins", 2).write_bytes(b"garbage")
    with pytest.raises((CorruptBlockError, RegressionError), match="block 2"):
        fit(store, client=client)


def test_plan_row_groups_never_split_a_block():
    from coar_dask.fit.moments import plan_row_groups

    rows = np.sort(np.random.default_rng(0).choice(1000, 300, replace=False))
    for groups in (1, 3, 7, 50, 500):
        parts = plan_row_groups(rows, 40, groups)
        assert np.array_equal(np.concatenate(parts), rows) and len(parts) <= groups
        blocks = [set((p // 40).tolist()) for p in parts]
        assert all(not (a & b) for i, a in enumerate(blocks) for b in blocks[i + 1:])


# ------------------------------------------------------------- the executor's tree sum


def _square(i):
    if i == 13:
        raise ValueError("task 13 failed")
    return np.array([i * i])


def _plus(a, b):
    return a + b


@pytest.mark.parametrize("n", [1, 2, 7])
def test_reduce_tasks_sums_in_process_and_as_a_tree_on_the_workers(client, n):
    from coar_dask.runtime.executor import TaskSet, reduce_tasks

    tasks = TaskSet(_square, [(i, (i,)) for i in range(n)], key=lambda i: f"sq-{n}-{i}")
    seen = []
    assert reduce_tasks(tasks, _plus, None, on_done=seen.append)[0] == sum(i * i for i in range(n))
    assert seen == list(range(n))
    seen.clear()
    assert reduce_tasks(tasks, _plus, client, on_done=seen.append)[0] == sum(i * i for i in range(n))
    assert sorted(seen) == list(range(n))


def test_reduce_tasks_raises_the_task_error_and_leaves_nothing_running(client):
    from coar_dask.runtime.executor import TaskSet, reduce_tasks

    tasks = TaskSet(_square, [(i, (i,)) for i in range(20)], key=lambda i: f"sq-err-{i}")
    with pytest.raises(ValueError, match="task 13 failed"):
        reduce_tasks(tasks, _plus, client)
    with pytest.raises(ValueError, match="task 13 failed"):
        reduce_tasks(tasks, _plus, None)
    import time

    deadline = time.monotonic() + 10  # cancellation reaches the scheduler asynchronously
    while [k for k in client.who_has() if str(k).startswith("sq-err")] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in client.who_has() if str(k).startswith("sq-err")]


def test_store_size_benchmark_meets_the_codec_goal():
    """benchmarks/store_size.py --quick, run as a test: masks >= 20x smaller than the .npy, reads not slower
    in CPU time by more than a shared machine's noise."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "store_size.py"
    spec = importlib.util.spec_from_file_location("store_size_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(["--quick", "--json", "--repeat", "1"]) == 0
    result = json.loads(out.getvalue())
    assert result["masks_ratio_vs_npy"] >= 20 and [r["P"] for r in result["by_P"]] == [2304, 82944]
    assert all(r["masks_ratio_vs_npy"] >= 20 for r in result["by_P"])


def test_a_worker_error_in_a_row_parallel_fit_is_one_regression_error(built, client, monkeypatch):
    from coar_dask.errors import RegressionError
    from coar_dask.fit.fit import fit

    moments = __import__("importlib").import_module("coar_dask.fit.moments")
    monkeypatch.setattr(moments, "group_moments", _broken_group)
    with pytest.raises(RegressionError, match="row groups failed on the cluster .*OSError: disk gone"):
        fit(built, client=client)


def _broken_group(*args):
    raise OSError("disk gone")


def test_coar_dask_fit_with_a_cluster_and_no_slices_sums_rows_on_the_workers(built, tmp_path, coar_dask_cli):
    import subprocess

    import torch

    out = tmp_path / "a.pt"
    done = subprocess.run([*coar_dask_cli, "fit", str(built.path), "--out", str(out), "--cluster", "local",
                           "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["parallel"] == "rows"
    plain = subprocess.run([*coar_dask_cli, "fit", str(built.path), "--out", str(tmp_path / "b.pt")],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert "parallel" not in torch.load(tmp_path / "b.pt", weights_only=True)["metadata"]  # in this process
