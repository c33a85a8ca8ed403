"""The moments' CPU BLAS products (``coar_dask.solvers._blas``): equal to float64 numpy products over
shapes and dtypes, through the GIL-free path and the scipy fallback; other threads run during a call;
and ``Moments`` summing the Gram in float32 across batches gives the float64 sums (exact for 0/1 masks)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coar_dask.solvers import _blas, moments as moments_mod

FAST = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fixtures set once
CPU = torch.device("cpu")


@pytest.fixture(params=["cython_blas", "scipy_fallback"])
def path(request, monkeypatch):
    if request.param == "scipy_fallback":
        monkeypatch.setattr(_blas, "_routine", lambda name: None)
    else:
        assert _blas._routine("ssyrk") is not None and _blas._routine("dgemm") is not None
    return request.param


@FAST
@given(n=st.integers(1, 40), p=st.integers(1, 30), k=st.integers(1, 20), f64=st.booleans(), seed=st.integers(0, 99),
       beta=st.sampled_from([0.0, 1.0]))
def test_products_match_float64_numpy(path, n, p, k, f64, seed, beta):
    dt = np.float64 if f64 else np.float32
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)).astype(dt)  # C-ordered batches, as the moments pass them
    y = rng.normal(size=(n, k)).astype(dt)
    start = np.asfortranarray(rng.normal(size=(p, p)).astype(dt))
    c = start.copy(order="F")
    _blas.syrk_upper(x.T, c, beta=beta)
    want = x.astype(np.float64).T @ x.astype(np.float64) + beta * start
    tol = 1e-10 if f64 else 1e-4
    iu = np.triu_indices(p)
    np.testing.assert_allclose(c[iu], want[iu], rtol=tol, atol=tol * max(1, n))
    il = np.tril_indices(p, -1)
    np.testing.assert_array_equal(c[il], start[il])  # the lower triangle is not touched

    out = np.empty((k, p), dtype=dt, order="F")
    _blas.gemm_tn(y.T, x.T, out)
    xy = x.astype(np.float64).T @ y.astype(np.float64)
    np.testing.assert_allclose(out.T, xy, rtol=tol, atol=tol * max(1, n))
    # the memory of out is X^T Y in C order, which the moments read without a copy
    np.testing.assert_allclose(np.frombuffer(out.tobytes(order="F"), dtype=dt).reshape(p, k), xy, rtol=tol,
                               atol=tol * max(1, n))


def test_wrong_layouts_are_refused():
    x = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match="Fortran-ordered"):
        _blas.syrk_upper(x, np.zeros((5, 5), np.float32, order="F"), 0.0)  # a C-ordered (P, n)
    with pytest.raises(ValueError, match="one dtype"):
        _blas.syrk_upper(x.T, np.zeros((3, 3), np.float64, order="F"), 0.0)
    with pytest.raises(ValueError, match="gemm_tn"):
        _blas.gemm_tn(np.ones((2, 5), np.float32, order="F"), x.T, np.zeros((2, 3), np.float32))  # C-ordered c


def test_other_threads_run_during_a_call():
    """scipy.linalg.blas holds the GIL for a whole call (a spinning thread ran at 6% of its speed);
    the ctypes path lets the read-ahead thread and a worker's event loop run (110%)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x = (rng.random((4000, 1500)) > 0.05).astype(np.float32)
    c = np.zeros((1500, 1500), np.float32, order="F")
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    with threadpool_limits(1):  # one BLAS thread: the other core is the spinner's
        _blas.syrk_upper(x.T, c, beta=0.0)
        thread.start()
        try:
            time.sleep(0.02)
            a, t = count[0], time.perf_counter()
            time.sleep(0.1)
            alone = (count[0] - a) / (time.perf_counter() - t)
            speeds = []
            for _ in range(5):
                a, t = count[0], time.perf_counter()
                _blas.syrk_upper(x.T, c, beta=0.0)
                speeds.append((count[0] - a) / (time.perf_counter() - t) / alone)
        finally:
            stop.set()
            thread.join()
    assert np.median(speeds) > 0.5, f"another thread ran at {np.median(speeds):.0%} of its speed: the GIL was held"


@FAST
@given(rows=st.integers(1, 300), p=st.integers(1, 25), batch=st.integers(1, 64), alpha=st.floats(0.01, 0.5),
       seed=st.integers(0, 99))
def test_moments_gram_summed_across_batches_is_exact(rows, p, batch, alpha, seed, monkeypatch):
    """Masks' Gram sums held in float32 over several batches (flushed at EXACT_GRAM_ROWS) equal the counts."""
    monkeypatch.setattr(moments_mod, "EXACT_GRAM_ROWS", 97)  # flush often: across batch boundaries too
    rng = np.random.default_rng(seed)
    x = rng.random((rows, p)) >= alpha
    y = rng.normal(loc=50, size=(rows, 3))
    m = moments_mod.Moments(p, 3, CPU, gram=True)
    for a in range(0, rows, batch):
        m.update(x[a:a + batch].astype(np.float32), y[a:a + batch])
    state = m.state()  # flushes what is still in float32
    xf = x.astype(np.float64)
    np.testing.assert_array_equal(m.full_gram().numpy(), xf.T @ xf)
    assert state["xx"].dtype == np.float32  # counts: packed losslessly in float32
    np.testing.assert_array_equal(moments_mod.unpack_gram(state["xx"], p), xf.T @ xf)
    shifted = y - m.shift.numpy()
    np.testing.assert_allclose(state["xy"], xf.T @ shifted, rtol=1e-5, atol=1e-3 * rows)
    m.release()
    np.testing.assert_array_equal(m.full_gram().numpy(), xf.T @ xf)  # release flushed nothing twice


@FAST
@given(p=st.integers(1, 12), integer=st.booleans(), seed=st.integers(0, 99))
def test_states_pack_the_gram_losslessly_and_add_up(p, integer, seed):
    """A state moves the Gram's upper triangle (float32 only when lossless); sums of states are the
    moments of all rows, whichever order they are added in."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(3):
        x = (rng.random((rng.integers(1, 30), p)) > 0.3) if integer else rng.normal(size=(rng.integers(1, 30), p))
        parts.append((x.astype(np.float32 if integer else np.float64), rng.normal(loc=9, size=(len(x), 2))))
    shift = np.array([9.0, 9.0])
    states = []
    for x, y in parts:
        m = moments_mod.Moments(p, 2, CPU, gram=True, shift=shift)
        m.update(x, y)
        states.append(m.state())
        assert states[-1]["xx"].dtype == (np.float32 if integer else np.float64)
    total = moments_mod.add_states(moments_mod.add_states(states[0], states[1]), states[2])
    other = moments_mod.add_states(states[2], moments_mod.add_states(states[1], states[0]))
    xs = np.concatenate([x for x, _ in parts]).astype(np.float64)
    ys = np.concatenate([y for _, y in parts]) - shift
    for s in (total, other):
        m = moments_mod.Moments.from_state(s, CPU)
        np.testing.assert_allclose(m.full_gram().numpy(), xs.T @ xs, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(m.xy.numpy(), xs.T @ ys, rtol=1e-5, atol=1e-4)
        assert m.n == len(xs)


def test_pack_gram_refuses_a_wrong_length():
    with pytest.raises(Exception, match="packed Gram matrix of 3 features has 6 values"):
        moments_mod.unpack_gram(np.zeros(5), 3)
