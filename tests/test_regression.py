"""Fitting stores: split, solvers through ``fit``, target slices (in process and on a real
LocalCluster), attributions files, and the ``coar-dask fit`` solver flags."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coar_dask.fit import plan as fit_plan
from coar_dask.errors import RegressionError
from coar_dask.cli.solver_flags import add_fit_solver_arguments, solver_options_from_args
from coar_dask.fit.fit import (
    Attributions,
    StoreRows,
    fit,
    split_rows,
)
from coar_dask.core.store import init_store

P, K, N = 30, 12, 600


def write_synthetic_store(path, n=N, p=P, k=K, *, alpha=0.1, noise=0.05, rows_per_chunk=50, seed=0,
                          incomplete_blocks=()):
    """A store of masks (alpha ablated) and float16 outputs = planted linear model + noise."""
    rng = np.random.default_rng(seed)
    spec = {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [p]},
                                        "margins": {"dtype": "float16", "shape": [k]}}}
    store = init_store(path, spec, rows_per_chunk=rows_per_chunk, mask_seed=seed, alpha=alpha)
    W = rng.normal(size=(p, k)).astype(np.float32)
    b = rng.normal(size=k).astype(np.float32)
    for block in store.blocks():
        if block.index in incomplete_blocks:
            continue
        m = rng.random((len(block), p)) >= alpha
        y = m @ W + b + noise * rng.normal(size=(len(block), k))
        store.write_block(block.index, {"masks": m, "margins": y.astype(np.float16)})
    return store, W, b


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    store, W, b = write_synthetic_store(tmp_path_factory.mktemp("reg") / "store", incomplete_blocks=(3,))
    return store, W, b


def dense_rows(store, rows):
    x = store.read_rows("masks", rows).astype(np.float64)
    y = store.read_rows("margins", rows).astype(np.float64)
    return x, y


def test_fit_lstsq_equals_dense_least_squares_on_the_split(synthetic):
    store, _, _ = synthetic
    attrs = fit(store, num_train=400, num_val=100, split_seed=3)
    done = np.flatnonzero(store.completed_rows())
    assert done.size == N - 50  # block 3 is not completed: never read
    train, val = split_rows(done, 400, 100, 3)
    x, y = dense_rows(store, train)
    A = np.hstack([x, np.ones((400, 1))])
    sol = np.linalg.lstsq(A, y, rcond=None)[0]
    np.testing.assert_allclose(attrs.weight, sol[:-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(attrs.bias, sol[-1], rtol=1e-4, atol=1e-4)
    m = attrs.metadata
    assert (m["n_train"], m["n_val"], m["solver"], m["split_seed"]) == (400, 100, "lstsq", 3)
    assert len(m["val_mse"]) == K and min(m["val_correlation"]) > 0.99


def test_fit_recovers_planted_weights_with_every_cpu_solver(synthetic):
    store, W, _ = synthetic
    for solver, opts in (("lstsq", {}), ("lstsq", {"ridge_grid": "auto"}),
                         ("saga", {"lr": 0.05, "batch_size": 100, "max_epochs": 2000, "early_stop_eps": 1e-10})):
        attrs = fit(store, num_val=100, solver=solver, **opts)
        assert np.corrcoef(attrs.weight.ravel(), W.ravel())[0, 1] > 0.999, solver
        assert min(attrs.metadata["val_correlation"]) > 0.99, solver


def test_split_is_seeded_disjoint_and_checked():
    rows = np.arange(100) * 2
    a = split_rows(rows, 60, 20, seed=1)
    assert np.array_equal(a[0], split_rows(rows, 60, 20, seed=1)[0])
    assert not np.array_equal(a[0], split_rows(rows, 60, 20, seed=2)[0])
    assert len(np.intersect1d(*a)) == 0 and set(a[0]) | set(a[1]) <= set(rows)
    assert split_rows(rows, None, 30)[0].size == 70
    with pytest.raises(RegressionError, match="build more rows"):
        split_rows(rows, 90, 20)


def test_fit_checks_solver_options(synthetic):
    store, _, _ = synthetic
    with pytest.raises(RegressionError, match="no option"):
        fit(store, solver="lstsq", lr=1e-3)
    with pytest.raises(RegressionError, match="target slice"):
        fit(store, target_slice=(5, K + 1))


def test_fit_progress_names_the_target_slice(synthetic):
    store, _, _ = synthetic
    seen = []
    fit(store, num_val=50, target_slice=(2, 7), progress=seen.append)
    assert seen and all(p.target_slice == (2, 7) for p in seen)
    assert "targets 2:7" in seen[-1].describe()


@pytest.mark.parametrize("solver,opts", [("lstsq", {}), ("lstsq", {"ridge_grid": "0,1,10"}),
                                         ("saga", {"lr": 0.05, "batch_size": 100, "max_epochs": 300})])
def test_slices_in_process_equal_a_single_fit(synthetic, solver, opts):
    store, _, _ = synthetic
    kw = dict(num_train=400, num_val=100, split_seed=1, solver=solver, **opts)
    whole = fit(store, **kw)
    seen = []
    sliced = fit(store, slices=3, progress=seen.append, **kw)
    np.testing.assert_allclose(sliced.weight, whole.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sliced.bias, whole.bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sliced.lam, whole.lam)
    np.testing.assert_allclose(sliced.metadata["val_mse"], whole.metadata["val_mse"], rtol=1e-4)
    assert sliced.metadata["target_slice"] == [0, K] and sliced.metadata["n_slices"] == 3
    assert [p.done for p in seen if p.stage == "slices"] == [1, 2, 3]


def test_target_slice_subrange_in_slices(synthetic):
    store, _, _ = synthetic
    whole = fit(store, num_val=50, target_slice=(3, 11))
    sliced = fit(store, num_val=50, target_slice=(3, 11), max_targets=3)
    assert sliced.metadata["n_slices"] == 3 and sliced.metadata["target_slice"] == [3, 11]
    np.testing.assert_allclose(sliced.weight, whole.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_slices_as_dask_tasks_on_a_local_cluster_equal_a_single_fit(synthetic):
    from coar_dask.runtime.clusters import cluster_client

    store, _, _ = synthetic
    kw = dict(num_train=400, num_val=100, split_seed=2, solver="saga", lr=0.05, batch_size=100, max_epochs=300)
    whole = fit(store, **kw)
    seen = []
    with cluster_client("local", n_workers=2) as client:
        sliced = fit(store, slices=4, client=client, progress=seen.append, **kw)
        assert len(client.scheduler_info()["workers"]) == 2
        with pytest.raises(RegressionError, match="advertises a GPU"):
            fit(store, slices=2, client=client, device="cuda", num_val=50)
    np.testing.assert_allclose(sliced.weight, whole.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sliced.bias, whole.bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sliced.metadata["val_correlation"], whole.metadata["val_correlation"], atol=1e-5)
    assert [p.done for p in seen if p.stage == "slices"] == [1, 2, 3, 4]
    # the workers' epoch progress reached the client, tagged with the slice
    worker_events = [p for p in seen if p.stage.startswith("saga")]
    assert worker_events and {p.target_slice for p in worker_events} <= {(0, 3), (3, 6), (6, 9), (9, 12)}


def test_fit_plan_is_small_readable_and_gpu_annotated(synthetic):
    store, _, _ = synthetic
    plan = fit_plan.plan_fit(store, fit_plan.FitSettings.create(solver="saga", device="cuda", lr=1e-3), slices=4)
    assert plan.gpu and plan.slices == ((0, 3), (3, 6), (6, 9), (9, 12))
    assert "4 slice(s)" in repr(plan) and "lr=0.001" in repr(plan)
    assert plan.task_key(0) != plan.task_key(1)
    assert not fit_plan.plan_fit(store, fit_plan.FitSettings(), slices=2).gpu
    import pickle

    assert pickle.loads(pickle.dumps(plan)) == plan


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 50), size=st.integers(1, 300), slices=st.integers(1, 40),
       max_targets=st.one_of(st.none(), st.integers(1, 100)))
def test_plan_slices_tile_the_targets(start, size, slices, max_targets):
    out = fit_plan.plan_slices((start, start + size), slices, max_targets=max_targets)
    assert out[0][0] == start and out[-1][1] == start + size
    assert all(a < b for a, b in out) and all(out[i][1] == out[i + 1][0] for i in range(len(out) - 1))
    sizes = [b - a for a, b in out]
    assert max(sizes) - min(sizes) <= 1
    if max_targets is not None:
        assert max(sizes) <= max_targets
    assert len(out) == min(size, max(slices, -(-size // max_targets) if max_targets else slices))


def test_plan_slices_rejects_bad_explicit_slices():
    assert fit_plan.plan_slices((0, 5), [(0, 2), (2, 5)]) == [(0, 2), (2, 5)]
    for bad in ([(0, 2), (3, 5)], [(0, 2), (2, 4)], [(1, 5)]):
        with pytest.raises(RegressionError, match="slices"):
            fit_plan.plan_slices((0, 5), bad)


def test_attributions_roundtrip_with_saga_metadata(synthetic, tmp_path):
    import torch

    store, _, _ = synthetic
    attrs = fit(store, num_val=100, solver="saga", lr=0.05, batch_size=100, max_epochs=50)
    path = attrs.save(tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"weight", "bias", "lam", "metadata"}
    back = Attributions.load(path)
    np.testing.assert_array_equal(back.weight, attrs.weight)
    assert back.metadata["saga_config"]["lr"] == 0.05 and back.metadata["saga_table_bytes"] > 0


def test_store_rows_yield_float32_blocks_of_the_slice(synthetic):
    store, _, _ = synthetic
    rows = np.flatnonzero(store.completed_rows())[:120]
    src = StoreRows(store, rows, "masks", "margins", (4, 9))
    xs, ys = zip(*src.blocks())
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.dtype == y.dtype == np.float32 and y.shape == (120, 5)
    np.testing.assert_array_equal(y, store.read_rows("margins", rows)[:, 4:9].astype(np.float32))


# --------------------------------------------------------------------------- CLI flags
def _cli_like_parser():
    """Like ``coar-dask fit``'s parser, which already has --solver and --ridge."""
    p = argparse.ArgumentParser()
    p.add_argument("--solver", default="lstsq")
    p.add_argument("--ridge", type=float, default=0.0)
    add_fit_solver_arguments(p)
    return p


def test_fit_solver_flags_and_seed_aliases():
    p = _cli_like_parser()
    args = p.parse_args(["--solver", "saga", "--cfg.lr", "5e-4", "--k", "1", "--cfg.batch_size", "500",
                         "--early_stopping.check_every", "3", "--early-stop-eps", "1e-10",
                         "--cfg.manual_max_lambda", "0", "--slices", "4", "--no-refit"])
    assert solver_options_from_args(args) == {
        "solver": "saga", "lr": 5e-4, "k": 1, "batch_size": 500, "early_stop_every": 3, "early_stop_eps": 1e-10,
        "max_lambda": 0.0, "refit": False, "slices": 4}
    assert solver_options_from_args(p.parse_args([])) == {"solver": "lstsq"}
    assert solver_options_from_args(p.parse_args(["--ridge-grid", "auto", "--refit", "--max-targets", "9"])) == {
        "solver": "lstsq", "ridge_grid": "auto", "refit": True, "max_targets": 9}
    assert solver_options_from_args(p.parse_args(["--solver", "saga", "--max-lambda", "auto"])) == {
        "solver": "saga", "max_lambda": "auto"}
    with pytest.raises(RegressionError, match="--solver saga"):
        solver_options_from_args(p.parse_args(["--lr", "0.1"]))
    with pytest.raises(RegressionError, match="--max-lambda"):
        solver_options_from_args(p.parse_args(["--solver", "saga", "--max-lambda", "big"]))
    with pytest.raises(RegressionError, match="--slices"):
        solver_options_from_args(p.parse_args(["--slices", "0"]))
    fresh = argparse.ArgumentParser()
    add_fit_solver_arguments(fresh)
    assert fresh.parse_args([]).solver == "lstsq"
    with pytest.raises(SystemExit):
        fresh.parse_args(["--solver", "sgd"])


def test_fit_accepts_the_cli_options(synthetic):
    """What ``coar-dask fit`` does: ``fit(store, **solver_options_from_args(args))``."""
    store, _, _ = synthetic
    args = _cli_like_parser().parse_args(["--solver", "saga", "--lr", "0.05", "--batch-size", "100",
                                          "--max-epochs", "20", "--slices", "2"])
    attrs = fit(store, num_val=50, **solver_options_from_args(args))
    assert attrs.metadata["solver"] == "saga" and attrs.metadata["n_slices"] == 2
    assert attrs.metadata["solver_options"]["lr"] == 0.05


@pytest.mark.slow
def test_regression_benchmark_runs_small(tmp_path):
    """benchmarks/regression.py at small sizes: the JSON keys, and memory that does not grow with rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "regression.py"
    spec = importlib.util.spec_from_file_location("bench_regression", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--json", "--no-digits", "--workdir", str(tmp_path), "--synthetic-rows", "1500",
                      "--rss-rows", "1000,10000", "--synthetic-saga-max-epochs", "6"])
    for key in ("lstsq_seconds", "saga_seconds", "speedup", "lstsq_correlation", "saga_correlation",
                "rss_10k_mb", "rss_100k_mb"):
        assert np.isfinite(out[key]), key
    assert out["synthetic"]["num_train"] == 1200 and out["synthetic"]["saga_max_epochs"] == 6
    assert out["rss_100k_mb"] < 1.1 * out["rss_10k_mb"]


def test_plot_evaluation_leaves_the_backend_alone(tmp_path):
    """plot_evaluation draws on its own Figure: the process's matplotlib backend stays what it was."""
    matplotlib = pytest.importorskip("matplotlib")
    from coar_dask.fit.evaluate import EvaluationResult, plot_evaluation

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        rng = np.random.default_rng(0)
        result = EvaluationResult(correlations=rng.uniform(0.5, 1, 20), n_rows=30,
                                  sample_examples=np.array([1, 4]), sample_predicted=rng.normal(size=(30, 2)),
                                  sample_actual=rng.normal(size=(30, 2)))
        path = plot_evaluation(result, tmp_path / "plots" / "eval.png")
        assert matplotlib.get_backend() == "svg"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize("how", [{}, {"slices": 2}])
def test_a_partial_store_reports_its_pending_rows_and_unfitted_components(tmp_path, caplog, how):
    """Issue 22 item 6: a partial store fitted silently; the rows built were those keeping component 0, whose
    weight then came out 0 for every example. The fit names the pending rows and the component."""
    rng = np.random.default_rng(0)
    spec = {"num_models": 300, "schema": {"masks": {"dtype": "bool_", "shape": [8]},
                                          "margins": {"dtype": "float32", "shape": [3]}}}
    store = init_store(tmp_path / "s", spec, rows_per_chunk=50, mask_seed=0, alpha=0.2)
    for block in list(store.blocks())[:4]:  # 200 of 300 rows built, each keeping component 0
        m = rng.random((len(block), 8)) >= 0.2
        m[:, 0] = True
        store.write_block(block.index, {"masks": m, "margins": m @ rng.normal(size=(8, 3)).astype(np.float32)})
    with caplog.at_level("WARNING"):
        attrs = fit(store, **how)
    assert attrs.metadata["n_pending_rows"] == 100
    assert attrs.metadata["unfitted_components"] == [0]
    text = caplog.text
    assert "100 of 300 rows are pending" in text and "never (or always) ablated" in text


def test_coar_dask_fit_says_in_one_line_that_rows_are_pending(tmp_path, capsys):
    from coar_dask.cli.main import main

    store, _, _ = write_synthetic_store(tmp_path / "s", n=200, incomplete_blocks=(3,))
    assert main(["fit", "--store", str(store.path), "--out", str(tmp_path / "a.pt")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "pending" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 50 row(s) of the store pending")


def test_ridge_grid_auto_without_a_split_holds_out_a_default_validation_split(synthetic, caplog):
    """Issue 24 item 8: `--ridge-grid auto` as README shows it failed asking for --num-val."""
    store, _, _ = synthetic
    with caplog.at_level("WARNING"):
        attrs = fit(store, ridge_grid="auto")
    completed = int(store.completed_rows().sum())
    assert attrs.metadata["n_val"] == completed // 10 and attrs.metadata["n_train"] == completed - completed // 10
    assert len(attrs.metadata["val_correlation"]) == K and "num-val" in caplog.text
    assert fit(store, ridge_grid="auto", num_val=50).metadata["n_val"] == 50  # a split given is kept


def test_fit_and_evaluate_refuse_wrong_arguments_with_a_coar_error(synthetic, tmp_path):
    """Issue 22, bad input: fit(ndarray), fit(num_train='10') and evaluate(attrs, ndarray) raised raw
    TypeError/ValueError; a store with no completed rows said 'asked for -200 train rows'."""
    from coar_dask.errors import CoarError
    from coar_dask.fit.evaluate import evaluate

    store, _, _ = synthetic
    with pytest.raises(CoarError, match="store"):
        fit(np.zeros((3, 3)))
    with pytest.raises(CoarError, match=r"num_train \(--num-train\) must be an integer >= 1.*'10'"):
        fit(store, num_train="10")
    with pytest.raises(CoarError, match="num_val"):
        fit(store, num_val=2.5)
    attrs = fit(store, num_val=20)
    with pytest.raises(CoarError, match="store"):
        evaluate(attrs, np.zeros((3, 3)))
    empty = init_store(tmp_path / "empty", store.spec.to_dict(), rows_per_chunk=50)
    with pytest.raises(RegressionError, match="only 0 completed rows") as err:
        fit(empty, num_val=200)
    assert "-200" not in str(err.value) and "\n" not in str(err.value)
