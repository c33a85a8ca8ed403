"""Solvers on in-memory row sources: exactness against numpy / scikit-learn, paths, streaming."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coar_dask.solvers import base, registry, metrics as metrics_mod, moments as moments_mod, rows as rows_mod
from coar_dask.solvers import lstsq as lstsq_mod
from coar_dask.solvers import saga as saga_mod
from coar_dask.errors import MissingDependencyError, RegressionError


class ArrayRows:
    """A row source over arrays, in blocks of ``block`` rows (or of the given sizes)."""

    def __init__(self, X, Y, block=37):
        self.X, self.Y = np.asarray(X), np.asarray(Y)
        self.n_rows, self.n_features = self.X.shape
        self.n_targets = self.Y.shape[1]
        self.block = block
        self.reads = 0

    def blocks(self):
        self.reads += 1
        if isinstance(self.block, int):
            edges = list(range(0, self.n_rows, self.block)) + [self.n_rows]
        else:
            edges = list(np.cumsum([0, *self.block]))
        for a, b in zip(edges[:-1], edges[1:]):
            yield self.X[a:b], self.Y[a:b]


def masks(rng, n, p, alpha=0.1, dtype=np.float64):
    return (rng.random((n, p)) >= alpha).astype(dtype)


def planted(seed=0, n=400, p=20, k=4, alpha=0.2, noise=0.0, sparsity=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = masks(rng, n, p, alpha, dtype)
    W = rng.normal(size=(p, k)) * (rng.random((p, k)) < sparsity)
    b = rng.normal(size=k)
    Y = (X @ W + b + noise * rng.normal(size=(n, k))).astype(dtype)
    return X, Y, W, b


def numpy_lstsq(X, Y):
    A = np.hstack([X, np.ones((X.shape[0], 1))])
    sol = np.linalg.lstsq(A, Y, rcond=None)[0]
    return sol[:-1], sol[-1]


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def corr_cols(a, b):
    return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])])


# --------------------------------------------------------------------------- lstsq
@pytest.mark.parametrize("method", ["gram", "cg"])
def test_lstsq_equals_numpy_lstsq_in_float64(method):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(300, 25)), rng.normal(size=(300, 6))
    res = lstsq_mod.lstsq(ArrayRows(X, Y), method=method)
    w, b = numpy_lstsq(X, Y)
    assert res.weight.dtype == np.float64
    assert rel_err(res.weight, w) < 1e-6
    assert rel_err(res.bias, b) < 1e-6
    assert res.info["method"] == method


def test_lstsq_float32_masks_are_exact_enough():
    X, Y, _, _ = planted(1, n=500, p=30, k=5, noise=0.5, dtype=np.float32)
    res = lstsq_mod.lstsq(ArrayRows(X, Y, block=64))
    w, b = numpy_lstsq(X.astype(np.float64), Y.astype(np.float64))
    assert res.weight.dtype == np.float32
    assert rel_err(res.weight, w) < 1e-4


@pytest.mark.parametrize("method", ["gram", "cg"])
def test_ridge_equals_closed_form_with_unpenalised_intercept(method):
    rng = np.random.default_rng(2)
    X, Y = masks(rng, 200, 15), rng.normal(size=(200, 3))
    lam = 3.0
    res = lstsq_mod.lstsq(ArrayRows(X, Y), ridge=lam, method=method)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(15), Xc.T @ Yc)
    assert rel_err(res.weight, w) < 1e-6
    assert rel_err(res.bias, Y.mean(0) - X.mean(0) @ w) < 1e-6
    np.testing.assert_allclose(res.lam, lam)


def test_never_ablated_component_gets_zero_weight():
    """A constant column (component never ablated in the sample) makes X^T X singular:
    the minimum-norm solution gives it zero weight, in both methods."""
    X, Y, _, _ = planted(3, n=300, p=12, k=3, noise=0.1)
    X[:, 4] = 1.0
    ref = np.linalg.pinv(np.hstack([X, np.ones((300, 1))])) @ Y
    for method in ("gram", "cg"):
        res = lstsq_mod.lstsq(ArrayRows(X, Y), method=method)
        np.testing.assert_allclose(res.weight[4], 0.0, atol=1e-9)
        pred, ref_pred = X @ res.weight + res.bias, np.hstack([X, np.ones((300, 1))]) @ ref
        assert rel_err(pred, ref_pred) < 1e-6
    assert lstsq_mod.lstsq(ArrayRows(X, Y)).info["rank"] == 11


@pytest.mark.parametrize("method", ["gram", "cg"])
def test_ridge_grid_picks_each_targets_best_penalty_on_validation(method):
    X, Y, _, _ = planted(4, n=260, p=40, k=5, noise=2.0, sparsity=0.2)
    tr, va = ArrayRows(X[:160], Y[:160]), ArrayRows(X[160:], Y[160:])
    grid = [0.0, 1.0, 10.0, 100.0, 1000.0]
    res = lstsq_mod.lstsq(tr, va, ridge_grid=grid, method=method)
    Xc = X[:160] - X[:160].mean(0)
    mses = []
    for lam in grid:
        w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(40), Xc.T @ (Y[:160] - Y[:160].mean(0)))
        b = Y[:160].mean(0) - X[:160].mean(0) @ w
        mses.append(((X[160:] @ w + b - Y[160:]) ** 2).mean(0))
    mses = np.array(mses)
    np.testing.assert_allclose(res.lam, np.array(grid)[np.argmin(mses, axis=0)])
    np.testing.assert_allclose(res.info["val_mse"], mses.min(0), rtol=1e-6)
    assert len(set(res.lam.tolist())) > 1, "the problem should make targets prefer different penalties"


def test_ridge_grid_refit_uses_train_and_validation_rows():
    X, Y, _, _ = planted(5, n=300, p=10, k=3, noise=1.0)
    tr, va = ArrayRows(X[:200], Y[:200]), ArrayRows(X[200:], Y[200:])
    res = lstsq_mod.lstsq(tr, va, ridge_grid=[5.0], refit=True)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    w = np.linalg.solve(Xc.T @ Xc + 5.0 * np.eye(10), Xc.T @ Yc)
    assert rel_err(res.weight, w) < 1e-6
    held = lstsq_mod.lstsq(tr, va, ridge=5.0)
    # the reported validation figures are those of the train-only fit (held out)
    np.testing.assert_allclose(res.info["val_mse"], held.info["val_mse"], rtol=1e-6)
    assert res.info["n_refit"] == 300


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), batch=st.integers(1, 90))
def test_lstsq_does_not_depend_on_block_or_batch_sizes(sizes, batch):
    n = sum(sizes)
    rng = np.random.default_rng(n)
    X, Y = rng.normal(size=(n, 4)), rng.normal(size=(n, 2))
    if n < 6:
        return
    a = lstsq_mod.lstsq(ArrayRows(X, Y, block=sizes), batch_rows=batch)
    w, b = numpy_lstsq(X, Y)
    assert rel_err(a.weight, w) < 1e-6


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=15), rows=st.integers(1, 50))
def test_rebatch_keeps_rows_and_order(sizes, rows):
    n = sum(sizes)
    X, Y = np.arange(2 * n).reshape(n, 2), np.arange(n).reshape(n, 1)
    out = list(rows_mod.rebatch(ArrayRows(X, Y, block=sizes).blocks(), rows))
    if n == 0:
        assert out == []
        return
    np.testing.assert_array_equal(np.concatenate([x for x, _ in out]), X)
    np.testing.assert_array_equal(np.concatenate([y for _, y in out]), Y)
    assert all(len(x) >= rows for x, _ in out[:-1]) and all(len(x) > 0 for x, _ in out)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=15), rows=st.integers(1, 20), pool=st.integers(1, 4))
def test_rebatch_pool_recycles_a_few_buffers(sizes, rows, pool):
    n = sum(sizes)
    X, Y = np.arange(3 * n, dtype=np.float32).reshape(n, 3), np.arange(n, dtype=np.float32).reshape(n, 1)
    got, buffers = [], []
    for x, y in rows_mod.rebatch(ArrayRows(X, Y, block=sizes).blocks(), rows, pool):
        got.append((x.copy(), y.copy()))  # valid until the next batches are drawn
        buffers.append(x if x.base is None else x.base)
    if n:
        np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), X)
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), Y)
    assert len({id(b) for b in buffers}) <= pool


def test_iter_batches_reuse_recycles_few_buffers_through_the_reader_thread():
    """Streaming allocates a handful of batch buffers, not one per batch, and a buffer is
    never refilled while the consumer still uses it (slow consumer, reader thread ahead)."""
    import time

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(3000, 4)).astype(np.float32)
    buffers, got = [], []
    for i, (x, y) in enumerate(rows_mod.iter_batches(ArrayRows(X, Y, block=70), 100, reuse=True)):
        first = x.copy()
        if i % 5 == 0:
            time.sleep(0.02)  # let the reader fill the queue meanwhile
        np.testing.assert_array_equal(x, first)
        got.append(first)
        buffers.append(x if x.base is None else x.base)  # kept alive: fresh arrays would all differ
    np.testing.assert_array_equal(np.concatenate(got), X)
    assert len({id(b) for b in buffers}) <= rows_mod.PREFETCH_DEPTH + 3 < len(buffers)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=8), seed=st.integers(0, 100))
def test_streamed_validation_metrics_equal_numpy(sizes, seed):
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    X, Y = masks(rng, n, 5), rng.normal(size=(n, 3))
    res = base.SolverResult(rng.normal(size=(5, 3)), rng.normal(size=3), np.zeros(3))
    m = metrics_mod.validation_metrics(res, ArrayRows(X, Y, block=sizes))
    pred = X @ res.weight + res.bias
    np.testing.assert_allclose(m["val_mse"], ((pred - Y) ** 2).mean(0), rtol=1e-9)
    if n > 2:
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = corr_cols(pred, Y)
        # A prediction that does not vary (every mask alike) has no correlation: NaN, where
        # corrcoef returns rounding noise (e.g. -1.3e-16).
        ref[np.ptp(pred, axis=0) == 0] = np.nan
        got = np.array(m["val_correlation"])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        ok = np.isfinite(ref)
        np.testing.assert_allclose(got[ok], ref[ok], atol=1e-7)
        assert m["val_correlation_nan"] == int(np.isnan(ref).sum())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(3, 120))
def test_metrics_from_moments_equal_streamed_metrics(seed, n):
    import torch

    rng = np.random.default_rng(seed)
    X, Y = masks(rng, n, 6, 0.3), rng.normal(size=(n, 3)) + 5.0
    res = base.SolverResult(rng.normal(size=(6, 3)), rng.normal(size=3), np.zeros(3))
    vm = moments_mod.stream_moments(ArrayRows(X, Y, block=7), base.torch_device("cpu"), gram=True, rows=None,
                                 progress=None)
    got = lstsq_mod.moment_metrics(vm, torch.from_numpy(res.weight), torch.from_numpy(res.bias))
    ref = metrics_mod.validation_metrics(res, ArrayRows(X, Y))
    np.testing.assert_allclose(got["val_mse"], ref["val_mse"], rtol=1e-8)
    ok = np.isfinite(ref["val_correlation"])
    np.testing.assert_allclose(np.array(got["val_correlation"])[ok], np.array(ref["val_correlation"])[ok],
                               atol=1e-7)


def test_ridge_grid_values_parsing():
    assert lstsq_mod.ridge_grid_values(None) is None
    assert lstsq_mod.ridge_grid_values([1, 0, 1]) == [1.0, 0.0]
    auto = lstsq_mod.ridge_grid_values("auto:4", scale=10.0)
    assert auto[-1] == 0.0 and len(auto) == 5 and auto[0] == pytest.approx(100.0)
    for bad in ("auto:0", "a,b", [-1.0], []):
        with pytest.raises(RegressionError, match="ridge grid"):
            lstsq_mod.ridge_grid_values(bad)


def test_lstsq_errors_say_what_to_do():
    X, Y, _, _ = planted(6, n=50, p=5, k=2)
    src = ArrayRows(X, Y)
    with pytest.raises(RegressionError, match="num-val"):
        lstsq_mod.lstsq(src, ridge_grid="auto")
    with pytest.raises(RegressionError, match="ridge must"):
        lstsq_mod.lstsq(src, ridge=-1.0)
    with pytest.raises(RegressionError, match="method"):
        lstsq_mod.lstsq(src, method="qr")
    bad = Y.copy()
    bad[3, 1] = np.nan
    with pytest.raises(RegressionError, match="NaN"):
        lstsq_mod.lstsq(ArrayRows(X, bad))
    with pytest.raises(RegressionError, match="unknown solver"):
        registry.get_solver("sgd")


def test_progress_reports_rows_and_cg_iterations():
    X, Y, _, _ = planted(7, n=120, p=8, k=2, noise=0.1)
    seen = []
    lstsq_mod.lstsq(ArrayRows(X, Y), method="cg", batch_rows=50, progress=seen.append)
    stages = [p.stage for p in seen]
    assert "moments" in stages and "cg" in stages
    moments = [p for p in seen if p.stage == "moments"]
    assert moments[-1].done == moments[-1].total == 120
    assert "cg" in seen[-1].describe()


def test_prefetch_propagates_errors_and_stops_early():
    def broken():
        yield 1
        raise ValueError("boom")

    it = rows_mod.prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    endless = rows_mod.prefetch(iter(range(10**9)))
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # must not hang


def test_concat_rows():
    X, Y, _, _ = planted(8, n=30, p=3, k=2)
    both = rows_mod.ConcatRows(ArrayRows(X[:10], Y[:10]), ArrayRows(X[10:], Y[10:]))
    assert both.n_rows == 30
    np.testing.assert_array_equal(np.concatenate([x for x, _ in both.blocks()]), X)


# --------------------------------------------------------------------------- saga
def _standardised(X):
    mu, sd = X.mean(0), X.std(0)
    return (X - mu) / sd, mu, sd


def test_saga_at_fixed_lambda_matches_sklearn_lasso():
    from sklearn.linear_model import Lasso

    X, Y, _, _ = planted(10, n=400, p=30, k=4, alpha=0.2, noise=0.3, sparsity=0.3)
    lam = 0.05
    res = saga_mod.saga(ArrayRows(X.astype(np.float32), Y.astype(np.float32)), k=1, max_lambda=lam, lr=0.05,
                        batch_size=50, early_stop_eps=1e-14, max_epochs=3000)
    Xs, mu, sd = _standardised(X)
    for j in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = Lasso(alpha=lam, tol=1e-12, max_iter=100_000).fit(Xs, Y[:, j])
        w = m.coef_ / sd
        assert rel_err(res.weight[:, j], w) < 1e-3
        assert abs(res.bias[j] - (m.intercept_ - mu @ w)) < 1e-3 * max(1.0, abs(m.intercept_))
        assert np.count_nonzero(m.coef_) < 30  # the penalty bites: this is a lasso, not least squares
    assert res.info["saga_converged"] == 4
    np.testing.assert_allclose(res.lam, lam)


def test_saga_path_selects_the_same_lambda_as_a_dense_reference():
    """Planted sparse problem: the lambda chosen by SAGA's path with early stopping is the one
    an exact lasso (scikit-learn coordinate descent) at each path value would choose on validation."""
    from sklearn.linear_model import Lasso

    rng = np.random.default_rng(1)
    n, nv, P, K = 300, 300, 40, 3
    X = masks(rng, n + nv, P, 0.3)
    W = rng.normal(size=(P, K)) * (rng.random((P, K)) < 0.15)
    Y = X @ W + rng.normal(size=(n + nv, K))
    k, eps = 10, 1e-2
    res = saga_mod.saga(ArrayRows(X[:n].astype(np.float32), Y[:n].astype(np.float32)),
                        ArrayRows(X[n:].astype(np.float32), Y[n:].astype(np.float32)),
                        k=k, eps=eps, max_lambda="auto", lr=0.05, batch_size=50, early_stop_eps=1e-12,
                        refit=False, max_epochs=5000)
    Xs, mu, sd = _standardised(X[:n])
    Xvs = (X[n:] - mu) / sd
    chosen = []
    for j in range(K):
        lmax = np.abs(Xs.T @ (Y[:n, j] - Y[:n, j].mean())).max() / n
        path = saga_mod.lambda_path(lmax, k, eps)
        mses = []
        for lam in path:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = Lasso(alpha=lam, tol=1e-10, max_iter=100_000).fit(Xs, Y[:n, j])
            mses.append(((m.predict(Xvs) - Y[n:, j]) ** 2).mean())
        chosen.append(path[int(np.argmin(mses))])
        assert res.info["val_mse"][j] == pytest.approx(min(mses), rel=1e-3)
    np.testing.assert_allclose(res.lam, chosen, rtol=1e-5)
    assert len(set(np.round(res.lam, 6))) == K  # targets chose different penalties


def test_saga_stops_a_path_when_validation_gets_worse():
    """With min_lambdas small, a target stops soon after its validation MSE rises (fast_l1's rule)."""
    X, Y, _, _ = planted(12, n=500, p=20, k=2, noise=3.0, sparsity=0.2)
    tr, va = ArrayRows(X[:250].astype(np.float32), Y[:250]), ArrayRows(X[250:].astype(np.float32), Y[250:])
    full = saga_mod.saga(tr, va, k=12, eps=1e-3, max_lambda="auto", lr=0.05, batch_size=50, early_stop_eps=1e-9,
                         refit=False, min_lambdas=100, early_stop_every=1)
    early = saga_mod.saga(tr, va, k=12, eps=1e-3, max_lambda="auto", lr=0.05, batch_size=50, early_stop_eps=1e-9,
                          refit=False, min_lambdas=1, early_stop_every=1)
    assert full.info["lambdas_done_mean"] == 12
    assert early.info["lambdas_done_mean"] < 12
    assert early.info["saga_epochs"] < full.info["saga_epochs"]


def test_saga_streamed_and_disk_table_agree_with_cached_memory(tmp_path):
    X, Y, _, _ = planted(13, n=300, p=15, k=3, noise=0.2)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    opts = dict(k=1, max_lambda=0.0, lr=0.05, batch_size=32, early_stop_eps=1e-12, max_epochs=2000)
    mem = saga_mod.saga(ArrayRows(X, Y), **opts)
    disk = saga_mod.saga(ArrayRows(X, Y), table="disk", table_dir=str(tmp_path), **opts)
    np.testing.assert_array_equal(mem.weight, disk.weight)  # same order, same arithmetic
    assert list(tmp_path.iterdir()) == []  # the memory-mapped table is removed
    src = ArrayRows(X, Y, block=20)
    streamed = saga_mod.saga(src, cache_bytes=0, **opts)
    assert src.reads > 10  # re-read every epoch instead of cached
    ref_w, _ = numpy_lstsq(X.astype(np.float64), Y.astype(np.float64))
    for res in (mem, streamed):
        assert rel_err(res.weight, ref_w) < 1e-3


@pytest.mark.parametrize("cached", [True, False])
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 120), batch=st.integers(1, 50), block=st.integers(1, 40), epoch=st.integers(0, 3))
def test_saga_batches_visit_every_row_once_per_epoch(cached, n, batch, block, epoch):
    rng = np.random.default_rng(n)
    X, Y = masks(rng, n, 3, 0.5, np.float32), np.arange(n, dtype=np.float32)[:, None]
    rows = rows_mod.EpochRows(ArrayRows(X, Y, block=block), batch, seed=0, cache_bytes=10**9 if cached else 0)
    assert rows.cached == cached
    seen = []
    batches = list(rows.batches(epoch))
    for idx, x, y in batches:
        np.testing.assert_array_equal(y[:, 0].numpy(), idx.numpy())  # positions match the rows
        np.testing.assert_array_equal(x.float().numpy(), X[idx.numpy()])
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(n))
    assert all(len(b[0]) == batch for b in batches[:-1])


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 50), eps=st.floats(1e-8, 1.0), lmax=st.floats(1e-3, 1e3))
def test_lambda_path_is_geometric_from_lambda_max(k, eps, lmax):
    path = saga_mod.lambda_path(lmax, k, eps)
    assert len(path) == k and path[0] == pytest.approx(lmax)
    assert np.all(np.diff(path) <= 0)
    np.testing.assert_allclose(path[1:] / path[:-1], eps ** (1 / k), rtol=1e-9)
    cfg = saga_mod.SagaOptions(k=k, eps=eps)
    assert cfg.lam_decay == pytest.approx(eps ** (1 / k))


def test_saga_config_defaults_follow_the_seed_and_validate():
    cfg = saga_mod.SagaOptions()
    # lr None: a step from the batch's size (auto_lr); the seed's fixed 1e-3 did not converge on digits
    assert (cfg.lr, cfg.k, cfg.early_stop_every, cfg.early_stop_eps) == (None, 1, 3, 1e-10)
    assert cfg.start_mode() == 0.0  # k=1, manual_max_lambda 0: plain least squares, as the seed's configs
    assert saga_mod.SagaOptions(k=5).start_mode() == "auto"
    assert saga_mod.table_nbytes(45_000, 10_000) == 1_800_000_000
    for bad in (dict(lr=0), dict(k=0), dict(eps=2.0), dict(max_lambda="big"), dict(batch_size=0),
                dict(early_stop_every=0), dict(table="gpu")):
        with pytest.raises(RegressionError, match="saga option"):
            saga_mod.SagaOptions(**bad)
    X, Y, _, _ = planted(14, n=40, p=4, k=2)
    with pytest.raises(RegressionError, match="num-val"):
        saga_mod.saga(ArrayRows(X, Y), k=5)


def test_saga_reports_progress_and_gives_up_at_max_epochs(caplog):
    X, Y, _, _ = planted(15, n=200, p=10, k=3, noise=0.5)
    seen = []
    with caplog.at_level("WARNING", logger="coar_dask.solvers.saga"):
        res = saga_mod.saga(ArrayRows(X.astype(np.float32), Y.astype(np.float32)), lr=1e-4, max_epochs=4,
                            progress=seen.append)
    assert "max_epochs" in caplog.text
    assert res.info["saga_converged"] == 0 and res.info["saga_epochs"] == 4
    assert [p.done for p in seen if p.stage == "saga"] == [1, 2, 3, 4]
    assert "lambdas" in seen[-1].detail
    assert np.isfinite(res.weight).all()


# --------------------------------------------------------------------------- every solver
def _solver_cases():
    cases = [("lstsq", {}), ("lstsq", {"method": "cg"}), ("lstsq", {"ridge_grid": "auto"}),
             ("saga", {"lr": 0.05, "batch_size": 64, "max_epochs": 3000, "early_stop_eps": 1e-12})]
    fast = pytest.param("fast_l1", {"lr": 0.05, "batch_size": 50}, marks=pytest.mark.gpu)
    return [*cases, fast]


@pytest.mark.parametrize("name,options", _solver_cases())
def test_planted_linear_model_is_recovered_by_every_solver(name, options):
    """Outputs exactly linear in the mask: every solver predicts held-out rows with correlation > 0.999."""
    if name == "fast_l1":
        pytest.importorskip("fast_l1")
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("fast_l1 needs a CUDA GPU")
        options = {**options, "device": "cuda"}
    X, Y, W, b = planted(20, n=900, p=24, k=6, alpha=0.1)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    tr, va, te = slice(0, 600), slice(600, 750), slice(750, 900)
    res = registry.get_solver(name)(ArrayRows(X[tr], Y[tr]), ArrayRows(X[va], Y[va]), **options)
    pred = X[te] @ res.weight + res.bias
    assert corr_cols(pred, Y[te]).min() > 0.999
    assert min(res.info["val_correlation"]) > 0.999


def test_fast_l1_missing_or_without_cuda_raises_clearly(monkeypatch):
    X, Y, _, _ = planted(21, n=40, p=4, k=2)
    monkeypatch.setitem(sys.modules, "fast_l1", None)  # import fails
    with pytest.raises(MissingDependencyError, match="pip install") as err:
        registry.get_solver("fast_l1")(ArrayRows(X, Y))
    assert "--solver saga" in str(err.value)
    import types

    import torch

    fake = types.ModuleType("fast_l1")
    fake.regressor = types.ModuleType("fast_l1.regressor")
    monkeypatch.setitem(sys.modules, "fast_l1", fake)
    monkeypatch.setitem(sys.modules, "fast_l1.regressor", fake.regressor)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RegressionError, match="CUDA"):
        registry.get_solver("fast_l1")(ArrayRows(X, Y))


def test_solver_options_lists_keyword_options():
    assert "ridge_grid" in registry.solver_options("lstsq")
    assert {"lr", "k", "eps", "batch_size", "early_stop_every"} <= set(registry.solver_options("saga"))
    assert "device" not in registry.solver_options("saga")


@pytest.mark.parametrize("method", ["gram", "cg"])
def test_refit_without_grid_fits_train_and_validation_rows(method):
    X, Y, _, _ = planted(22, n=240, p=8, k=2, noise=1.0)
    res = lstsq_mod.lstsq(ArrayRows(X[:160], Y[:160]), ArrayRows(X[160:], Y[160:]), refit=True, method=method)
    w, b = numpy_lstsq(X, Y)
    assert rel_err(res.weight, w) < 1e-6 and res.info["n_refit"] == 240
    held = lstsq_mod.lstsq(ArrayRows(X[:160], Y[:160]), ArrayRows(X[160:], Y[160:]), method=method)
    np.testing.assert_allclose(res.info["val_mse"], held.info["val_mse"], rtol=1e-6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(3, 120), k=st.integers(1, 5), cuts=st.lists(st.integers(1, 119), max_size=6))
def test_pearson_accumulator_streamed_equals_corrcoef(seed, n, k, cuts):
    """The public accumulator (used by solvers and evaluate): any split of the rows into batches
    gives numpy's per-column correlation."""
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(n, k))
    actual = 0.5 * pred + rng.normal(size=(n, k))
    acc = metrics_mod.PearsonAccumulator(k)
    edges = [0, *sorted({c for c in cuts if c < n}), n]
    for a, b in zip(edges[:-1], edges[1:]):
        acc.update(pred[a:b], actual[a:b])
    want = [np.corrcoef(pred[:, j], actual[:, j])[0, 1] for j in range(k)]
    assert acc.n == n
    np.testing.assert_allclose(acc.result(), want, rtol=1e-9, atol=1e-9)


def test_unknown_option_names_the_solvers_options():
    X, Y, _, _ = planted(n=50, p=4, k=2)
    with pytest.raises(RegressionError, match="no option.*'ridge'"):
        lstsq_mod.lstsq(ArrayRows(X, Y), lr=0.1)
    with pytest.raises(RegressionError, match="no option.*'lr'"):
        saga_mod.saga(ArrayRows(X, Y), ridge=1.0)
    opts = lstsq_mod.LstsqOptions(ridge=2.0)
    assert np.allclose(lstsq_mod.lstsq(ArrayRows(X, Y), options=opts).lam, 2.0)


# --------------------------------------------------------------------------- fast_l1 on current PyTorch (issue 18.3)
_UNPATCHED_TRAIN_SAGA = '''
def train_saga(weight, bias, loader, val_loader, *, lr, start_lams, lam_decay, num_lambdas,
               early_stop_freq=2, early_stop_eps=1e-5):
    for bool_X, y, idx in loader:
        a_prev[:, :num_keep].copy_(a_table[idx, :num_keep], non_blocking=True)
    inds_to_swap = inds_to_swap[still_opt_outer[inds_to_swap]]
'''


def _fake_regressor(tmp_path, source, name):
    """A module whose train_saga has ``source`` (inspect.getsource reads its file)."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unpatched_fast_l1_is_refused_naming_the_two_line_patch(tmp_path):
    from coar_dask.solvers import fast_l1 as fl

    unpatched = _fake_regressor(tmp_path, _UNPATCHED_TRAIN_SAGA, "regressor_unpatched")
    with pytest.raises(RegressionError, match=r"still_opt_outer\[inds_to_swap\]\.cpu\(\)") as err:
        fl.check_fast_l1_patched(unpatched)
    assert "a_table[idx.cpu(), :num_keep]" in str(err.value) and "--solver saga" in str(err.value)
    assert "\n" not in str(err.value)
    patched = _UNPATCHED_TRAIN_SAGA.replace("still_opt_outer[inds_to_swap]]", "still_opt_outer[inds_to_swap].cpu()]")
    fl.check_fast_l1_patched(_fake_regressor(tmp_path, patched, "regressor_patched"))


def test_fast_l1_loader_feeds_idx_on_the_cpu_and_the_rows_on_the_device():
    """fast_l1 indexes its pinned host table with idx (MadryLab/datamodels#3): idx must stay on the CPU.
    The 'meta' device stands in for CUDA on a machine without one."""
    import torch

    from coar_dask.solvers import fast_l1 as fl

    X, Y, _, _ = planted(23, n=60, p=5, k=2)
    loader = fl._FastL1Loader(ArrayRows(X, Y), 20, torch.device("meta"), seed=0, cache_bytes=1 << 20)
    batches = list(loader)
    assert len(batches) == 3
    for x, y, idx in batches:
        assert x.device.type == "meta" and y.device.type == "meta" and idx.device.type == "cpu"


def test_fast_l1_epochs_are_bounded(caplog):
    """fast_l1's train_saga loops until every target is done; max_epochs stops it, and it still
    returns its best penalties (through its KeyboardInterrupt exit)."""
    import types

    import torch

    from coar_dask.solvers import fast_l1 as fl

    epochs = []

    def train_saga(weight, bias, loader, val_loader, **kwargs):  # fast_l1's structure: setup passes, then forever
        best = torch.zeros(weight.shape[1])
        list(loader)
        next(iter(loader))
        list(loader)
        try:
            while True:
                for _ in loader:
                    pass
                epochs.append(1)
                best += 1
        except KeyboardInterrupt:
            pass
        return best

    X, Y, _, _ = planted(24, n=60, p=5, k=2)
    loader = fl._FastL1Loader(ArrayRows(X, Y), 20, torch.device("cpu"), seed=0, cache_bytes=1 << 20)
    w, b = torch.zeros(5, 2), torch.zeros(2)
    with caplog.at_level("WARNING", logger="coar_dask.solvers.fast_l1"):
        best, stopped = fl.run_train_saga(types.SimpleNamespace(train_saga=train_saga), w, b, loader, None,
                                          max_epochs=7, lr=0.1)
    assert stopped and len(epochs) == 7 and best.tolist() == [7.0, 7.0]
    assert "max_epochs=7" in caplog.text
    assert len(list(loader)) == 3  # the bound is lifted afterwards (calc_stats reads the loader again)
    assert fl.FastL1Options().max_epochs == 1000
    with pytest.raises(RegressionError, match="max_epochs"):
        fl.FastL1Options(max_epochs=0)


# --------------------------------------------------------------------------- the Gram solver's GPU memory (issue 18.6)
def test_auto_method_sizes_the_gram_path_from_the_gpus_free_memory(monkeypatch):
    """On CUDA, method='auto' asks torch.cuda.mem_get_info(): 3 P x P float64 matrices (6 with a grid)
    must fit 90 % of the free memory; mocked here, as the CPU path never asks."""
    import torch

    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 16 * 10**9, 80 * 10**9

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda")
    assert not lstsq_mod.gram_fits_device(23_000, cuda, grid=False)  # 3.8 P^2 float64 (core.memory), not 3
    assert not lstsq_mod.gram_fits_device(17_000, cuda, grid=True)  # ResNet-50-sized with a ridge grid: CG
    assert lstsq_mod.gram_fits_device(13_000, cuda, grid=True)
    assert asked
    asked.clear()
    assert not lstsq_mod.gram_fits_device(10**6, torch.device("cpu"), grid=True) and not asked  # host memory
    assert lstsq_mod.gram_max_features(80e9, grid=False) == 23_170  # max_gram_bytes caps it
    assert lstsq_mod.gram_max_features(8e9, grid=False) == 15_335


def test_gram_moments_free_their_scratch_and_centre_in_place():
    X, Y, _, _ = planted(25, n=300, p=12, k=3, dtype=np.float32)
    m = moments_mod.stream_moments(ArrayRows(X, Y), lstsq_mod.torch_device("cpu"), gram=True, rows=64,
                                 progress=None)
    assert not m._buffers and m._ybuf is None  # the float32 P x P scratch is gone
    copy_xx, copy_xy = m.centred()
    cxx, cxy = m.centred(inplace=True)
    assert m.xx is None and m.xy is None
    np.testing.assert_array_equal(cxx.numpy(), copy_xx.numpy())
    np.testing.assert_array_equal(cxy.numpy(), copy_xy.numpy())


def test_products_run_at_full_float32_precision_even_with_tf32_enabled(monkeypatch):
    """A user's torch.set_float32_matmul_precision('high') / allow_tf32 would round X^T Y' to 10-bit
    mantissas on an Ampere/Hopper GPU; the moments and CG products force full precision locally."""
    import torch

    seen = []
    real_mm = torch.mm

    def spy(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32))
        return real_mm(*args, **kwargs)

    X, Y, _, _ = planted(26, n=200, p=6, k=2, dtype=np.float32)
    before = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        monkeypatch.setattr(torch, "mm", spy)
        # the moments' torch products are the CUDA path; run it on CPU tensors (the CPU path is scipy's BLAS)
        monkeypatch.setattr(moments_mod.Moments, "_scipy_blas", lambda self: False)
        lstsq_mod.lstsq(ArrayRows(X, Y), method="gram")
        lstsq_mod.lstsq(ArrayRows(X, Y), method="cg")
        after = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
    assert seen and set(seen) == {("highest", False)}
    assert after == ("high", True)  # the user's settings are put back


def test_fast_l1_install_hint_names_the_cupy_wheel_of_torchs_cuda(monkeypatch):
    """Issue 23 item 10: the hint named cupy-cuda12x beside a CUDA 13 torch."""
    import builtins

    import torch

    from coar_dask.errors import MissingDependencyError
    from coar_dask.solvers import fast_l1 as fl

    real_import = builtins.__import__

    def no_fast_l1(name, *args, **kwargs):
        if name.startswith("fast_l1"):
            raise ImportError("No module named 'fast_l1'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fast_l1)
    for cuda, wheel in (("13.0", "cupy-cuda13x"), ("12.4", "cupy-cuda12x"), ("11.8", "cupy-cuda11x")):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(MissingDependencyError, match=wheel):
            fl._import_fast_l1()
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(MissingDependencyError, match="CPU build"):
        fl._import_fast_l1()


def test_a_cuda_index_is_remapped_on_a_worker_that_sees_one_gpu(monkeypatch):
    """Issue 23 item 8: a worker started with CUDA_VISIBLE_DEVICES=N sees its GPU as cuda:0, so a fit asking
    for cuda:1 there resolves to cuda:0 (torch.cuda faked: the check a CPU machine cannot make; on a GPU,
    tests/test_gpu.py runs a fit on a one-GPU worker)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert base.torch_device("cuda:1") == torch.device("cuda", 0)
    assert base.torch_device("cuda") == torch.device("cuda")
    assert base.torch_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert base.torch_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RegressionError, match="cuda:0 to cuda:1"):
        base.torch_device("cuda:3")


# -- issue 24 item 8: SAGA's defaults converge on a real digits store -------------------------------------------
@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, digits_experiment):
    from coar_dask import run_build
    from coar_dask.runtime.build import init_experiment_store

    store = init_experiment_store(tmp_path_factory.mktemp("digits") / "s", digits_experiment, 300,
                                  rows_per_chunk=100, alpha=0.1)
    run_build(store, None)
    return store


def test_saga_defaults_converge_on_a_digits_store_and_match_least_squares(digits_store):
    from coar_dask import fit

    train, held_out = np.arange(200), np.arange(250, 300)
    masks = digits_store.read_rows("masks", held_out).astype(np.float64)
    outputs = digits_store.read_rows("margins", held_out).astype(np.float64)

    def held_out_corr(attrs):
        pred = attrs.predict(masks)
        return np.nanmean([np.corrcoef(pred[:, k], outputs[:, k])[0, 1] for k in range(outputs.shape[1])])

    ls = fit(digits_store, num_train=len(train) + 50, num_val=0)  # saga refits on its train + validation rows
    sg = fit(digits_store, solver="saga", num_train=len(train), num_val=50)
    info = sg.metadata
    assert info["saga_converged"] == outputs.shape[1], info
    assert info["saga_refit_converged"] == outputs.shape[1], info
    assert info["saga_epochs"] < 500
    assert held_out_corr(sg) == pytest.approx(held_out_corr(ls), abs=0.01)
