"""Statistics of a fit's predictions: validation MSE and Pearson correlation, streamed.

Pearson correlations come from sums of values shifted by each column's first
value, so a large common offset costs no digits, and a column that does not
vary (a constant prediction or constant outputs) gets NaN, never +-1 or noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coar_dask.solvers.base import RowSource, SolverResult
from coar_dask.solvers.rows import iter_batches

__all__ = [
    "validation_metrics",
    "NO_VARIANCE_RTOL",
    "pearson_from_sums",
    "pearson_centred",
    "no_variance",
    "correlation_summary",
    "PearsonAccumulator",
]


def validation_metrics(result: SolverResult, val: RowSource, rows: int | None = None) -> dict[str, Any]:
    """Per-target validation MSE and Pearson correlation, streamed over ``val``.

    Returns ``{"val_mse": [...], "val_correlation": [...], "val_correlation_nan": m}``
    (lists of K floats; a target whose prediction or outputs do not vary on
    ``val`` has correlation NaN, and ``m`` counts them).
    """
    stats = PearsonAccumulator(val.n_targets)
    sq = np.zeros(val.n_targets)
    w = result.weight.astype(np.float64)
    for X, Y in iter_batches(val, rows, reuse=True):
        # float64: the MSE is a small difference of large numbers when the fit is good.
        pred = np.asarray(X, dtype=np.float64) @ w + result.bias
        actual = np.asarray(Y, dtype=np.float64)
        stats.update(pred, actual)
        err = pred - actual
        sq += np.einsum("ij,ij->j", err, err, dtype=np.float64)
    corr = stats.result()
    return {"val_mse": (sq / max(stats.n, 1)).tolist(), "val_correlation": corr.tolist(),
            "val_correlation_nan": int(np.isnan(corr).sum())}


#: A column whose standard deviation is at most this fraction of its largest
#: magnitude has no variance: its values differ by rounding alone, and its
#: correlation is NaN (a one-pass formula would give +-1 or noise there).
NO_VARIANCE_RTOL = 1e-12


def pearson_from_sums(n: int, sp, sa, spp, saa, spa, scale_p=0.0, scale_a=0.0) -> np.ndarray:
    """Per-column Pearson correlation from sums of *shifted* values (``p - c_p``, ``a - c_a``, with
    ``c`` near the column's values, e.g. its first one; the sums' rounding error then scales with
    the spread, not the offset). ``scale_p``, ``scale_a``: the columns' largest ``|value|``; a column
    with no variance (see :data:`NO_VARIANCE_RTOL`) gives NaN.
    """
    n = max(int(n), 1)
    sp, sa, spp, saa, spa = (np.asarray(v, dtype=np.float64) for v in (sp, sa, spp, saa, spa))
    mp, ma = sp / n, sa / n
    vp = spp / n - mp * mp
    va = saa / n - ma * ma
    cov = spa / n - mp * ma
    return pearson_centred(cov, vp, va, no_variance(vp, mp, scale_p) | no_variance(va, ma, scale_a))


def no_variance(var, shifted_mean, scale) -> np.ndarray:
    """Whether a column's variance ``var`` (from sums of values shifted by ``c``, whose mean is
    ``shifted_mean``) is rounding alone: at most :data:`NO_VARIANCE_RTOL` of ``scale`` (the
    values' magnitude) squared, or within the cancellation error of ``E[(v-c)^2] - E[v-c]^2``."""
    var = np.asarray(var, dtype=np.float64)
    m2 = np.asarray(shifted_mean, dtype=np.float64) ** 2
    return (var <= (NO_VARIANCE_RTOL * np.asarray(scale, dtype=np.float64)) ** 2) | (var <= _CANCELLATION * m2)


#: Relative error of a variance computed as ``E[v^2] - E[v]^2`` in float64 (a few hundred ulps).
_CANCELLATION = 1e-13


def pearson_centred(cov, vp, va, flat) -> np.ndarray:
    """``cov / sqrt(vp va)`` clipped to [-1, 1], NaN where ``flat``."""
    cov, vp, va = (np.asarray(v, dtype=np.float64) for v in (cov, vp, va))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cov / np.sqrt(np.clip(vp, 0, None) * np.clip(va, 0, None)), -1.0, 1.0)
    return np.where(np.asarray(flat) | ~np.isfinite(r), np.nan, r)


def correlation_summary(correlations: Any) -> dict[str, Any]:
    """Mean and median over the examples with a correlation, and how many have none (NaN: a
    constant prediction or constant outputs)."""
    r = np.asarray(correlations, dtype=np.float64).ravel()
    ok = r[np.isfinite(r)]
    return {"mean": float(ok.mean()) if ok.size else float("nan"),
            "median": float(np.median(ok)) if ok.size else float("nan"),
            "n_nan": int(r.size - ok.size), "n": int(r.size)}


class PearsonAccumulator:
    """Streamed per-column Pearson correlation of predictions with actual values.

    Sums are of values shifted by each column's first row, so the result
    does not lose digits to a large common offset, and a constant column
    gives exactly zero variance: its correlation is NaN (see
    :func:`pearson_from_sums`).
    """

    def __init__(self, k: int):
        self.n = 0
        self.sp = np.zeros(k)
        self.sa = np.zeros(k)
        self.spp = np.zeros(k)
        self.saa = np.zeros(k)
        self.spa = np.zeros(k)
        self.scale_p = np.zeros(k)
        self.scale_a = np.zeros(k)
        self.cp: np.ndarray | None = None
        self.ca: np.ndarray | None = None

    def update(self, pred: np.ndarray, actual: np.ndarray) -> None:
        if pred.shape[0] == 0:
            return
        if self.cp is None:
            self.cp = np.array(pred[0], dtype=np.float64)
            self.ca = np.array(actual[0], dtype=np.float64)
        p = np.asarray(pred, dtype=np.float64) - self.cp
        a = np.asarray(actual, dtype=np.float64) - self.ca
        self.n += p.shape[0]
        self.scale_p = np.maximum(self.scale_p, np.abs(pred).max(0))
        self.scale_a = np.maximum(self.scale_a, np.abs(actual).max(0))
        self.sp += p.sum(0)
        self.sa += a.sum(0)
        self.spp += np.einsum("ij,ij->j", p, p)
        self.saa += np.einsum("ij,ij->j", a, a)
        self.spa += np.einsum("ij,ij->j", p, a)

    def result(self) -> np.ndarray:
        """Correlation per column; NaN where the prediction or the actual values do not vary."""
        return pearson_from_sums(self.n, self.sp, self.sa, self.spp, self.saa, self.spa, self.scale_p, self.scale_a)
