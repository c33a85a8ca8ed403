"""Solvers for the per-example linear models, over streamed row blocks.

A solver takes a *row source*: any object with ``n_rows``, ``n_features``,
``n_targets`` and ``blocks()`` yielding ``(X, Y)`` numpy blocks (X: masks as
0/1, shape (b, P); Y: outputs, shape (b, K)). It never holds more than one
block plus its own state (here a P x P Gram matrix), so memory does not grow
with the number of rows.

All solvers return weights in *mask units*: the prediction for a mask ``m``
(1 = kept) is ``m @ weight + bias``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from .errors import RegressionError

__all__ = ["RowSource", "SolverResult", "lstsq", "validation_metrics", "SOLVERS", "get_solver"]

logger = logging.getLogger(__name__)


class RowSource(Protocol):
    """What a solver reads: row blocks of features X and targets Y."""

    n_rows: int
    n_features: int
    n_targets: int

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class SolverResult:
    """Weights ``(P, K)``, bias ``(K,)``, regularisation ``lam`` ``(K,)`` and extras."""

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _device(device: str | None):
    import torch

    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RegressionError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu.")
    return dev


def _moments(source: RowSource, device: str | None):
    """Streamed first and second moments of [X, Y] in float64 on ``device``."""
    import torch

    dev = _device(device)
    P, K = source.n_features, source.n_targets
    sx = torch.zeros(P, dtype=torch.float64, device=dev)
    sy = torch.zeros(K, dtype=torch.float64, device=dev)
    xx = torch.zeros(P, P, dtype=torch.float64, device=dev)
    xy = torch.zeros(P, K, dtype=torch.float64, device=dev)
    n = 0
    for X, Y in source.blocks():
        x = torch.as_tensor(np.asarray(X), device=dev).to(torch.float64)
        y = torch.as_tensor(np.asarray(Y), device=dev).to(torch.float64)
        if not torch.isfinite(y).all():
            raise RegressionError(
                "the regression targets contain NaN or inf; run `coar-dask verify` on the store "
                "and rebuild the affected blocks."
            )
        n += x.shape[0]
        sx += x.sum(0)
        sy += y.sum(0)
        xx += x.T @ x
        xy += x.T @ y
    if n == 0:
        raise RegressionError("no rows to fit on: the store has no completed rows in the chosen split.")
    return n, sx, sy, xx, xy


def lstsq(
    train: RowSource,
    val: RowSource | None = None,
    *,
    ridge: float = 0.0,
    device: str | None = None,
    rcond: float = 1e-10,
) -> SolverResult:
    """Exact least squares (or ridge) with an intercept, from streamed normal equations.

    Solves ``min_w,b ||Y - X w - b||^2 + ridge ||w||^2`` per target column
    (the intercept is not penalised) through the centred Gram matrix, with an
    eigendecomposition so that rank-deficient designs (a component that is
    never ablated in the sample) get the minimum-norm solution instead of an
    error. Costs O(n P^2 + n P K) time and O(P^2 + P K) memory.
    """
    import torch

    if ridge < 0:
        raise RegressionError(f"ridge must be >= 0; found {ridge}.")
    n, sx, sy, xx, xy = _moments(train, device)
    mx, my = sx / n, sy / n
    cxx = xx - n * torch.outer(mx, mx)
    cxy = xy - n * torch.outer(mx, my)
    evals, evecs = torch.linalg.eigh(cxx)
    evals = evals + ridge
    tol = rcond * max(float(evals.abs().max()), 1e-300)
    inv = torch.where(evals > tol, 1.0 / evals, torch.zeros_like(evals))
    w = evecs @ (inv[:, None] * (evecs.T @ cxy))
    b = my - mx @ w
    result = SolverResult(
        weight=w.float().cpu().numpy(),
        bias=b.float().cpu().numpy(),
        lam=np.full(train.n_targets, float(ridge), dtype=np.float32),
        info={"solver": "lstsq", "n_train": n, "rank": int((evals > tol).sum())},
    )
    if val is not None and val.n_rows > 0:
        result.info.update(validation_metrics(result, val))
    return result


def validation_metrics(result: SolverResult, val: RowSource) -> dict[str, Any]:
    """Per-target validation MSE and Pearson correlation, streamed over ``val``."""
    stats = _PearsonAccumulator(val.n_targets)
    sq = np.zeros(val.n_targets)
    for X, Y in val.blocks():
        pred = np.asarray(X, dtype=np.float64) @ result.weight.astype(np.float64) + result.bias
        actual = np.asarray(Y, dtype=np.float64)
        stats.update(pred, actual)
        sq += ((pred - actual) ** 2).sum(0)
    return {"val_mse": (sq / max(stats.n, 1)).tolist(), "val_correlation": stats.result().tolist()}


class _PearsonAccumulator:
    """Streamed per-column Pearson correlation of predictions with actual values."""

    def __init__(self, k: int):
        self.n = 0
        self.sp = np.zeros(k)
        self.sa = np.zeros(k)
        self.spp = np.zeros(k)
        self.saa = np.zeros(k)
        self.spa = np.zeros(k)

    def update(self, pred: np.ndarray, actual: np.ndarray) -> None:
        self.n += pred.shape[0]
        self.sp += pred.sum(0)
        self.sa += actual.sum(0)
        self.spp += (pred * pred).sum(0)
        self.saa += (actual * actual).sum(0)
        self.spa += (pred * actual).sum(0)

    def result(self) -> np.ndarray:
        n = max(self.n, 1)
        cov = self.spa / n - (self.sp / n) * (self.sa / n)
        vp = self.spp / n - (self.sp / n) ** 2
        va = self.saa / n - (self.sa / n) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / np.sqrt(np.clip(vp, 0, None) * np.clip(va, 0, None))
        return np.clip(r, -1.0, 1.0)


SOLVERS: dict[str, Callable[..., SolverResult]] = {"lstsq": lstsq}


def get_solver(name: str) -> Callable[..., SolverResult]:
    """The solver registered under ``name``."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise RegressionError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}.") from None
