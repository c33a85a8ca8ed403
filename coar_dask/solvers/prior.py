"""Ridge shrinkage toward a prior attribution, on streamed moments.

``min_{w,b} ||y - b - X w||^2 + lam ||w - w0||^2`` per target is ridge on the
residual targets ``y - X w0`` plus ``w0``: with the centred Gram ``G`` and
cross moments ``c``, ``(G + lam I) w = c + lam w0``. :func:`toward` rewrites
summed :class:`~coar_dask.solvers.moments.Moments` into the residual frame
(``X^T y - X^T X w0`` and the matching ``sum y``, ``sum y^2``) from the sums
alone, so the least-squares solver still streams its blocks once and its
ridge grid chooses ``lam`` on validation rows as before; lam -> inf gives
``w0``, lam = 0 gives least squares.

A prior made another way (gradient x parameter, leave-one-out) need not be in
the same scale as the regression: :func:`prior_scale` fits one scalar per
target on the training rows, ``c = argmin ||y' - c X' w0||^2``
(``w0^T c_xy / w0^T G w0``, centred), and the solver shrinks toward ``c w0``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coar_dask.errors import RegressionError

__all__ = ["Prior", "as_prior", "prior_scale", "toward"]


@dataclass(frozen=True, eq=False)
class Prior:
    """A prior attribution ``weight`` (P, K) in mask units, named (``"gp"``, ``"loo"``, a file).

    ``target_start``: the store output its first column belongs to (a fit of a target slice takes
    its columns). Its ``repr`` is short and carries a digest of the weights (fit plans hash it).
    """

    weight: np.ndarray
    name: str = "prior"
    target_start: int = 0
    digest: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, dtype=np.float64)
        if w.ndim != 2 or not np.isfinite(w).all():
            raise RegressionError(f"prior {self.name!r}: expected finite weights of shape (components, targets); "
                                  f"found shape {w.shape}{'' if np.isfinite(w).all() else ' with NaN/inf'}.")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "digest", hashlib.sha256(w.tobytes()).hexdigest()[:12])

    def __repr__(self) -> str:
        return f"Prior({self.name!r}, {self.weight.shape[0]}x{self.weight.shape[1]}, sha256 {self.digest})"

    def columns(self, P: int, start: int, stop: int) -> np.ndarray:
        """The prior's weights for store outputs ``[start, stop)``, checked against ``P`` components."""
        w = self.weight
        a, b = start - self.target_start, stop - self.target_start
        if w.shape[0] != P or a < 0 or b > w.shape[1]:
            raise RegressionError(
                f"prior {self.name!r} has {w.shape[0]} components x {w.shape[1]} outputs; the fit needs {P} "
                f"components and outputs [{start}, {stop}): give a prior of this store's model and examples.")
        return w[:, a:b]


def as_prior(value: Any) -> Prior | None:
    """``None``, a :class:`Prior`, or an array (P, K) made into one."""
    if value is None or isinstance(value, Prior):
        return value
    if isinstance(value, (str, os.PathLike)):
        raise RegressionError(f"prior {str(value)!r}: a named prior ('gp', 'loo', a file) is made by "
                              f"coar_dask.fit(store, prior=...) / coar-dask fit --prior; pass the solver a "
                              f"Prior or a (components, targets) array.")
    return Prior(np.asarray(value, dtype=np.float64))


def prior_scale(cxx, cxy, w0):
    """Per-target scalar ``c`` minimising ``||y' - c X' w0||^2`` on centred moments (0 where ``X' w0`` is
    constant); ``cxx`` (P, P), ``cxy`` and ``w0`` (P, K) torch float64 tensors."""
    import torch

    a = (w0 * cxy).sum(0)
    q = (w0 * (cxx @ w0)).sum(0)
    return torch.where(q > 0, a / torch.where(q > 0, q, torch.ones_like(q)), torch.zeros_like(q))


def toward(m, w0, sign: float = 1.0) -> None:
    """Rewrite Gram moments ``m`` in place for targets ``y - sign * X w0`` (``sign=-1`` undoes it).

    ``m`` must hold the full ``X^T X`` (``gram=True``) and ``X^T Y``; ``w0`` is (P, K) on ``m``'s device.
    """
    if m.xx is None or m.xy is None:
        raise RegressionError("a prior needs the Gram moments (X^T X); fit with method='gram' (--method gram).")
    v = w0.to(m.xy.device, dtype=m.xy.dtype) * sign
    gv = m.full_gram() @ v
    a = (v * m.xy).sum(0)
    m.syy = m.syy - 2 * a + (v * gv).sum(0)
    m.sy = m.sy - m.sx @ v
    m.xy = m.xy - gv
