"""Numerics (issue 17): solvers against float64 numpy / scikit-learn references over output offsets,
ablation rates, N near and below P, constant columns and constant targets; correlations that are NaN
(and counted) where there is no variance; and the issue's four reproductions through ``fit`` and
``evaluate``."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_solvers

from coar_dask.core.store import init_store
from coar_dask.fit.evaluate import evaluate
from coar_dask.fit.fit import fit
from coar_dask.solvers import base, metrics as metrics_mod, moments as moments_mod
from coar_dask.solvers import lstsq as lstsq_mod
from coar_dask.solvers import saga as saga_mod

CPU = torch.device("cpu")
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ArrayRows(test_solvers.ArrayRows):
    """test_solvers' row source over arrays, in blocks of 23 rows by default."""

    def __init__(self, X, Y, block=23):
        super().__init__(X, Y, block)


def problem(seed, n, p, k, alpha, offset, *, dtype=np.float32, const_col=False, const_target=False, noise=0.1):
    """Masks (``alpha`` ablated) and outputs ``X W + offset + noise`` stored in ``dtype``."""
    rng = np.random.default_rng(seed)
    X = (rng.random((n, p)) >= alpha).astype(np.float32)
    if const_col:
        X[:, 0] = 1.0  # a component never ablated in the sample
    Y = X @ rng.normal(size=(p, k)) + offset + rng.normal(size=k) + noise * rng.normal(size=(n, k))
    if const_target:
        Y[:, -1] = offset + 0.25
    return X, Y.astype(dtype)


def centred_min_norm(X, Y, standardised=False):
    """Float64 reference: least squares with a free intercept; the minimum-norm solution in mask
    units, or (``standardised``) in standardised units ``sum_j var_j w_j^2``."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    mx, my = X.mean(0), Y.mean(0)
    Xc = X - mx
    sd = Xc.std(0)
    keep = sd > 1e-12
    scale = np.where(keep, sd, 1.0) if standardised else np.ones_like(sd)
    w = np.zeros((X.shape[1], Y.shape[1]))
    w[keep] = np.linalg.lstsq(Xc[:, keep] / scale[keep], Y - my, rcond=1e-10)[0] / scale[keep, None]
    return w, my - mx @ w


class Captured(logging.Handler):
    """Warnings of one logger, inside a hypothesis test (where caplog is not reset per example)."""

    def __init__(self, name):
        super().__init__(logging.WARNING)
        self.logger, self.text = logging.getLogger(name), ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def rel(a, b, scale):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / scale)


# ----------------------------------------------------------------------------- least squares
@FAST
@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 3.0, 100.0, 700.0, 1e3]),
       alpha=st.floats(0.01, 0.5), extra=st.integers(2, 12), method=st.sampled_from(["gram", "cg"]),
       const_col=st.booleans(), const_target=st.booleans())
def test_lstsq_independent_of_offset_and_equal_to_float64(seed, offset, alpha, extra, method, const_col,
                                                         const_target):
    """N near P (N = P + 2..12) in float32: the training-row fit equals float64 least squares on the
    same stored values whatever the offset; constant targets get zero weight and their mean as bias."""
    P, K = 12, 3
    X, Y = problem(seed, P + extra, P, K, alpha, offset, const_col=const_col, const_target=const_target)
    res = lstsq_mod.lstsq(ArrayRows(X, Y), method=method, cg_tol=1e-7)
    w, b = centred_min_norm(X, Y, standardised=method == "cg")
    spread = max(float(np.std(Y.astype(np.float64), axis=0).max()), 1e-3)
    pred, ref = X @ res.weight.astype(np.float64) + res.bias, X @ w + b
    assert rel(pred, ref, spread) < 2e-3
    if const_target:
        assert np.abs(res.weight[:, -1]).max() < 1e-6
        assert abs(res.bias[-1] - Y[0, -1]) < 1e-3


@FAST
@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 50.0, 1e3]), alpha=st.floats(0.02, 0.5),
       method=st.sampled_from(["gram", "cg"]), missing=st.integers(1, 15))
def test_lstsq_below_p_returns_the_documented_minimum_norm_solution(seed, offset, alpha, method, missing):
    """N < P: a warning; gram gives the minimum-norm solution in mask units, cg the one in
    standardised units (float64 rows: to 1e-6), and both fit the training rows."""
    P, K = 20, 2
    X, Y = problem(seed, P - missing, P, K, alpha, offset, dtype=np.float64)
    X = X.astype(np.float64)
    with Captured("coar_dask.solvers.lstsq") as log:
        res = lstsq_mod.lstsq(ArrayRows(X, Y), method=method)
    assert "underdetermined" in log.text
    w, b = centred_min_norm(X, Y, standardised=method == "cg")
    scale = max(float(np.abs(w).max()), 1.0)
    assert rel(res.weight, w, scale) < 1e-6
    spread = max(float(np.std(Y, axis=0).max()), 1e-3)
    assert rel(X @ res.weight + res.bias, X @ w + b, spread) < 1e-6  # Y itself when the masks have rank N - 1


@FAST
@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 100.0, 1e3]), alpha=st.floats(0.01, 0.5),
       n=st.integers(20, 80))
def test_ridge_grid_and_moment_metrics_independent_of_offset(seed, offset, alpha, n):
    """The ridge grid's choice and its metrics (from moments) equal the streamed float64 ones."""
    X, Y = problem(seed, n, 8, 3, alpha, offset, dtype=np.float64, noise=0.5)
    Xv, Yv = problem(seed + 1, 40, 8, 3, alpha, offset, dtype=np.float64, noise=0.5)
    res = lstsq_mod.lstsq(ArrayRows(X, Y), ArrayRows(Xv, Yv), ridge_grid="0,1,10")
    ref = metrics_mod.validation_metrics(res, ArrayRows(Xv, Yv))
    # The moments' metrics are of the float64 weights, the streamed ones of the returned float32 weights.
    np.testing.assert_allclose(res.info["val_mse"], ref["val_mse"], rtol=1e-4)
    np.testing.assert_allclose(res.info["val_correlation"], ref["val_correlation"], atol=1e-5)


# ----------------------------------------------------------------------------- SAGA
@FAST
@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 10.0, 700.0, 1e3]), alpha=st.floats(0.01, 0.5),
       const_col=st.booleans())
def test_saga_lambda_max_independent_of_offset(seed, offset, alpha, const_col):
    """lambda_max = max_j |Xs_j^T (y - ybar)| / n of float64 numpy on the same float32 values."""
    X, Y = problem(seed, 300, 10, 3, alpha, offset, const_col=const_col)
    std = saga_mod._Standardiser(ArrayRows(X, Y), CPU, True, None)
    Xd, Yd = X.astype(np.float64), Y.astype(np.float64)
    sd = Xd.std(0)
    Xs = np.where(sd > 1e-12, (Xd - Xd.mean(0)) / np.where(sd > 1e-12, sd, 1.0), 0.0)
    want = np.abs(Xs.T @ (Yd - Yd.mean(0))).max(0) / len(Xd)
    np.testing.assert_allclose(std.lambda_max.numpy(), want, rtol=1e-4)
    np.testing.assert_allclose(std.ymean.numpy(), Yd.mean(0), rtol=1e-6)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 300.0]), alpha=st.floats(0.1, 0.5))
def test_saga_at_fixed_lambda_equals_sklearn_lasso_at_any_offset(seed, offset, alpha):
    from sklearn.linear_model import Lasso

    X, Y = problem(seed, 300, 10, 2, alpha, offset, noise=0.3)
    lam = 0.05
    res = saga_mod.saga(ArrayRows(X, Y), k=1, max_lambda=lam, lr=0.05, batch_size=50, early_stop_eps=1e-14,
                        max_epochs=3000)
    Xd, Yd = X.astype(np.float64), Y.astype(np.float64)
    mu, sd = Xd.mean(0), Xd.std(0)
    for j in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = Lasso(alpha=lam, tol=1e-12, max_iter=100_000).fit((Xd - mu) / sd, Yd[:, j])
        w = m.coef_ / sd
        assert np.abs(res.weight[:, j] - w).max() < 2e-3 * max(1.0, np.abs(w).max())
        assert abs(res.bias[j] - (m.intercept_ - mu @ w)) < 1e-2


# ----------------------------------------------------------------------------- correlations
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(3, 60), offset=st.sampled_from([0.0, 1.0, 700.0, 1e3, 1e6]),
       cuts=st.lists(st.integers(1, 59), max_size=4), flat=st.sampled_from(["none", "pred", "actual", "both"]))
def test_pearson_accumulator_equals_two_pass_and_nan_without_variance(seed, n, offset, cuts, flat):
    rng = np.random.default_rng(seed)
    pred = offset + rng.normal(size=(n, 3))
    actual = offset + 0.5 * (pred - offset) + rng.normal(size=(n, 3))
    if flat in ("pred", "both"):
        pred[:, 1] = offset + 0.1
    if flat in ("actual", "both"):
        actual[:, 2] = offset - 0.3
    acc = metrics_mod.PearsonAccumulator(3)
    edges = [0, *sorted({c for c in cuts if c < n}), n]
    for a, b in zip(edges[:-1], edges[1:]):
        acc.update(pred[a:b], actual[a:b])
    pc, ac = pred - pred.mean(0), actual - actual.mean(0)  # two-pass float64 reference
    with np.errstate(invalid="ignore", divide="ignore"):
        want = (pc * ac).sum(0) / np.sqrt((pc * pc).sum(0) * (ac * ac).sum(0))
    want[np.ptp(pred, 0) == 0] = np.nan
    want[np.ptp(actual, 0) == 0] = np.nan
    got = acc.result()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], atol=1e-9 * max(1.0, offset / 1e3))


@FAST
@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 700.0]), const_target=st.booleans())
def test_moment_metrics_equal_streamed_metrics_with_constant_targets(seed, offset, const_target):
    X, Y = problem(seed, 60, 6, 3, 0.3, offset, dtype=np.float64, const_target=const_target)
    res = lstsq_mod.lstsq(ArrayRows(X, Y))
    tm = moments_mod.stream_moments(ArrayRows(X, Y), CPU, gram=True, rows=None, progress=None)
    vm = moments_mod.stream_moments(ArrayRows(X, Y), CPU, gram=True, rows=None, progress=None, precise=True,
                                  shift=tm.shift)
    got = lstsq_mod.moment_metrics(vm, torch.from_numpy(res.weight), torch.from_numpy(res.bias))
    ref = metrics_mod.validation_metrics(res, ArrayRows(X, Y))
    np.testing.assert_allclose(got["val_mse"], ref["val_mse"], rtol=1e-6, atol=1e-12)
    g, r = np.array(got["val_correlation"]), np.array(ref["val_correlation"])
    np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
    assert np.isnan(r[-1]) == const_target and ref["val_correlation_nan"] == got["val_correlation_nan"]
    np.testing.assert_allclose(g[~np.isnan(r)], r[~np.isnan(r)], atol=1e-7)


# ----------------------------------------------------------------------------- through fit and evaluate
def make_store(path, X, Y, *, y_dtype="float16", rows_per_chunk=500):
    n, p = X.shape
    spec = {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [p]},
                                        "margins": {"dtype": y_dtype, "shape": [Y.shape[1]]}}}
    store = init_store(path, spec, rows_per_chunk=min(rows_per_chunk, n), mask_seed=0, alpha=0.05)
    for block in store.blocks():
        sl = slice(block.start, block.start + len(block))
        store.write_block(block.index, {"masks": X[sl].astype(bool), "margins": Y[sl].astype(y_dtype)})
    return store


def test_acceptance_fit_on_float16_outputs_around_700_equals_float64_least_squares(tmp_path):
    """Issue 17 item 1: N = 20,000, P = 20, K = 2, alpha 0.05, outputs around 700 in float16."""
    rng = np.random.default_rng(17)
    n, p = 20_000, 20
    X = rng.random((n, p)) >= 0.05
    Y = 700 + X @ rng.normal(size=(p, 2)) + rng.normal(size=(n, 2))
    store = make_store(tmp_path / "s", X, Y, rows_per_chunk=2000)
    attrs = fit(store)
    stored = store.read_rows("margins", np.arange(n)).astype(np.float64)
    A = np.hstack([X.astype(np.float64), np.ones((n, 1))])
    sol = np.linalg.lstsq(A, stored, rcond=None)[0]
    assert np.abs(attrs.weight - sol[:-1]).max() < 1e-2
    assert np.abs(attrs.bias - sol[-1]).max() < 1e-2


def test_acceptance_evaluate_reports_nan_for_constant_outputs_and_leaves_it_out(tmp_path):
    """Issue 17 item 2: an example with constant outputs (and one with a constant prediction)
    has correlation NaN, the mean leaves them out, and the summary counts them."""
    rng = np.random.default_rng(2)
    n, p = 400, 10
    X = rng.random((2 * n, p)) >= 0.2
    Y = X @ rng.normal(size=(p, 3)) + 0.05 * rng.normal(size=(2 * n, 3))
    Y[:, 1] = 5.0  # constant outputs: the fit's prediction is constant too
    train = make_store(tmp_path / "train", X[:n], Y[:n], y_dtype="float32")
    held = make_store(tmp_path / "held", X[n:], Y[n:], y_dtype="float32")
    attrs = fit(train, num_val=100)
    assert np.isnan(attrs.metadata["val_correlation"][1]) and attrs.metadata["val_correlation_nan"] == 1
    result = evaluate(attrs, held)
    assert np.isnan(result.correlations[1]) and np.isfinite(result.correlations[[0, 2]]).all()
    assert result.mean == pytest.approx(float(np.mean(result.correlations[[0, 2]])))
    assert result.n_nan == 1 and result.summary()["n_nan_examples"] == 1
    assert "1 without variance" in result.describe()


def test_acceptance_cg_on_100_rows_by_200_components_float32_is_bounded_and_fits(tmp_path, caplog):
    """Issue 17 item 3: CG with N < P in float32 returns a bounded solution that fits the training
    rows (its best iterate), and warns that the system is underdetermined; so does gram."""
    rng = np.random.default_rng(3)
    n, p = 100, 200
    X = rng.random((n, p)) >= 0.1
    Y = 50 + X @ rng.normal(size=(p, 2)) + 0.1 * rng.normal(size=(n, 2))
    store = make_store(tmp_path / "s", X, Y, y_dtype="float32")
    stored = store.read_rows("margins", np.arange(n)).astype(np.float64)
    for method in ("cg", "gram"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            attrs = fit(store, method=method, cg_tol=1e-12, cg_max_iter=500)
        assert "underdetermined" in caplog.text, method
        assert np.isfinite(attrs.weight).all() and np.abs(attrs.weight).max() < 100, method
        pred = X @ attrs.weight.astype(np.float64) + attrs.bias
        assert np.abs(pred - stored).max() < 1e-3 * np.std(stored), method


def test_acceptance_saga_with_every_mask_kept_returns_the_mean_as_bias(tmp_path):
    """Issue 17 item 4: every mask kept, outputs averaging 5.01: SAGA's bias is their mean."""
    rng = np.random.default_rng(4)
    n, p = 600, 8
    X = np.ones((n, p), dtype=bool)
    Y = 5.01 + rng.normal(size=(n, 2))
    store = make_store(tmp_path / "s", X, Y, y_dtype="float32")
    mean = store.read_rows("margins", np.arange(n)).astype(np.float64).mean(0)
    attrs = fit(store, solver="saga", batch_size=100)
    np.testing.assert_allclose(attrs.bias, mean, atol=1e-2)
    assert np.isnan(attrs.weight).all()  # never ablated: unfitted, NaN rather than 0 (issue 22 item 6)
    path = fit(store, solver="saga", batch_size=100, num_val=100, k=3, max_epochs=30)
    assert np.isnan(path.metadata["val_correlation"]).all() and path.metadata["val_correlation_nan"] == 2


def test_a_float64_store_fits_and_evaluates_in_float64(tmp_path):
    """Issue 22 item 4: outputs ``margin * 1e-3 + 1e5`` in a float64 store keep their digits through the fit
    (float32 rows left ~5 distinct values per example: held-out correlation 0.80 instead of 0.96+)."""
    from coar_dask.core.store import init_store

    P, K, n, alpha = 20, 6, 800, 0.2
    rng = np.random.default_rng(0)
    spec = {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                        "margins": {"dtype": "float64", "shape": [K]}}}
    store = init_store(tmp_path / "s", spec, rows_per_chunk=100, mask_seed=0, alpha=alpha)
    W = rng.normal(size=(P, K))
    for block in store.blocks():
        m = rng.random((len(block), P)) >= alpha
        margin = m @ W + 0.3 * rng.normal(size=(len(block), K))
        store.write_block(block.index, {"masks": m, "margins": margin * 1e-3 + 1e5})
    attrs = fit(store, num_val=200, split_seed=0)
    assert attrs.weight.dtype == np.float64
    np.testing.assert_allclose(attrs.weight * 1e3, W, atol=0.2)  # the planted weights (noise SE ~0.03)
    assert min(attrs.metadata["val_correlation"]) > 0.9
    result = evaluate(attrs, store)
    assert np.nanmin(result.correlations) > 0.9
