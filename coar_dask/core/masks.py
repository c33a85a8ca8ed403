"""Deterministic mask sampling.

Row ``i``'s mask is a pure function of ``(seed, i, n_components, alpha)``: a
fresh generator is seeded from ``(seed, i)``, so any row can be regenerated,
verified or recomputed on any worker, in any order. ``True`` means the
component is kept; each component is ablated independently with probability
``alpha``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from coar_dask.errors import ExperimentError

__all__ = ["sample_mask", "sample_masks", "check_alpha"]


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise if it is not in (0, 1)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ExperimentError(f"alpha must be a number in (0, 1); found {alpha!r}.") from None
    if not 0.0 < value < 1.0:
        raise ExperimentError(
            f"alpha (the fraction of components ablated per mask) must lie strictly "
            f"between 0 and 1; found {alpha!r}. The paper used 0.05-0.10."
        )
    return value


def sample_mask(seed: int, row: int, n_components: int, alpha: float) -> np.ndarray:
    """The mask of one row: bool array of shape ``(n_components,)``, True = kept."""
    if row < 0:
        raise ValueError(f"row must be >= 0; found {row}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(row)])))
    return rng.random(n_components) >= alpha


def sample_masks(
    seed: int, rows: Iterable[int], n_components: int, alpha: float
) -> np.ndarray:
    """Masks of several rows stacked: bool array ``(len(rows), n_components)``.

    Examples
    --------
    >>> m = sample_masks(0, range(3), 1000, 0.1)
    >>> m.shape, bool((sample_masks(0, [2], 1000, 0.1) == m[2]).all())
    ((3, 1000), True)
    """
    alpha = check_alpha(alpha)
    rows = np.asarray(list(rows), dtype=np.int64)
    out = np.empty((rows.size, n_components), dtype=bool)
    for k, row in enumerate(rows):
        out[k] = sample_mask(seed, int(row), n_components, alpha)
    return out
