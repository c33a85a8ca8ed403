"""One fit, without any distribution: settings, row sources in, :class:`Attributions` out.

:class:`FitSettings` holds what :func:`coar_dask.fit.fit.fit` and
:func:`coar_dask.fit.distributed.plan_fit` both take (the rows, the solver
and its options), so their signature lives once. :func:`fit_store` fits one
target slice of a store in this process; :func:`fit_sources` fits any row
sources (a ``.beton``, a store) with a registered solver. The distributed
executor (:mod:`coar_dask.fit.distributed`) runs :func:`fit_store` once per
slice; nothing here calls it back.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from coar_dask._version import __version__
from coar_dask.core.store import Store, open_store
from coar_dask.errors import RegressionError
from coar_dask.fit.attributions import SIGN_CONVENTION, Attributions
from coar_dask.fit.rows import ROW_RULES, StoreRows, fitted_on, infer_names, select_rows
from coar_dask.solvers.base import FitProgress, ProgressFn, RowSource
from coar_dask.solvers.registry import check_solver_options, get_solver
from coar_dask.solvers.rows import ConcatRows

__all__ = ["FitSettings", "fit_store", "fit_sources", "PATH_SOLVERS"]

logger = logging.getLogger(__name__)

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")

#: Solvers that fit a lasso path: they take the validation rows apart (to choose each penalty).
PATH_SOLVERS = ("saga", "fast_l1")


@dataclass(frozen=True)
class FitSettings:
    """What to fit: rows, solver and solver options (not where or how it runs).

    Attributes
    ----------
    x_name, y_name
        Mask and output arrays (inferred when the store has one of each).
    num_train, num_val
        Rows for training and validation; ``num_train=None`` uses every
        non-validation row.
    split_seed
        Seed of the ``"shuffle"`` row rule.
    solver
        A registered solver (:mod:`coar_dask.solvers.registry`).
    target_slice
        ``(start, stop)``: fit only these output columns.
    device
        ``"cpu"`` (default) or ``"cuda"``.
    row_rule
        ``"shuffle"`` (seeded split, default) or ``"seed"`` (the research
        code's first-rows rule); see :mod:`coar_dask.fit.rows`.
    solver_options
        The solver's options, as sorted ``(name, value)`` pairs.
    """

    x_name: str | None = None
    y_name: str | None = None
    num_train: int | None = None
    num_val: int | None = 0
    split_seed: int = 0
    solver: str = "lstsq"
    target_slice: tuple[int, int] | None = None
    device: str | None = None
    row_rule: str = "shuffle"
    solver_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.row_rule not in ROW_RULES:
            raise RegressionError(f"row_rule={self.row_rule!r}: choose one of {list(ROW_RULES)}.")
        seed = self.split_seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise RegressionError(f"split_seed (--split-seed) must be an integer >= 0; found {seed!r}.")
        if self.device is not None and not _DEVICE.fullmatch(str(self.device)):
            raise RegressionError(f"device (--device) must be 'cpu', 'cuda' or 'cuda:N'; found {self.device!r}.")
        check_solver_options(self.solver, dict(self.solver_options))

    @classmethod
    def create(cls, **kwargs: Any) -> "FitSettings":
        """Settings from :func:`~coar_dask.fit.fit.fit`'s keywords: the fields above, and every other
        keyword a solver option (checked against the solver's options)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"solver_options"}
        fields = {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k not in names}
        if fields.get("device") is not None:
            fields["device"] = str(fields["device"])
        if fields.get("target_slice") is not None:
            fields["target_slice"] = tuple(int(v) for v in fields["target_slice"])
        return cls(**fields, solver_options=tuple(sorted(options.items())))

    @property
    def options(self) -> dict[str, Any]:
        """The solver options as a dict."""
        return dict(self.solver_options)

    def resolve(self, store: Store) -> "FitSettings":
        """These settings with the array names and the target slice of ``store`` filled in (and checked)."""
        x_name, y_name = infer_names(store, self.x_name, self.y_name)
        k = int(np.prod(store.spec[y_name].shape))
        start, stop = self.target_slice or (0, k)
        if not 0 <= start < stop <= k:
            raise RegressionError(f"target slice [{start}, {stop}) is outside the {k} outputs of {y_name!r}.")
        return dataclasses.replace(self, x_name=x_name, y_name=y_name, target_slice=(int(start), int(stop)))


def fit_store(store: Store | str, settings: FitSettings, progress: ProgressFn | None = None, *,
              prepare: Callable[[StoreRows, FitSettings], RowSource] | None = None) -> Attributions:
    """Fit ``settings.target_slice`` of ``store`` in this process (no slicing, no cluster).

    ``prepare(train, settings)``: the training rows the solver gets instead of
    ``train`` (e.g. with their moments summed on a cluster: :mod:`coar_dask.fit.moments`).
    """
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    s = settings.resolve(store)
    completed = np.flatnonzero(store.completed_rows())
    train_rows, val_rows = select_rows(completed, s.num_train, s.num_val, s.split_seed, s.row_rule)
    train = StoreRows(store, train_rows, s.x_name, s.y_name, s.target_slice)
    if prepare is not None:
        train = prepare(train, s)
    val = StoreRows(store, val_rows, s.x_name, s.y_name, s.target_slice) if val_rows.size else None
    logger.info("fitting %s on %d train / %d val rows, %d components x %d targets",
                s.solver, train.n_rows, 0 if val is None else val.n_rows, train.n_features, train.n_targets)
    if progress is not None:
        outer, sl = progress, train.target_slice

        def progress(p: FitProgress) -> None:
            outer(dataclasses.replace(p, target_slice=p.target_slice or sl))

    result = get_solver(s.solver)(train, val, device=s.device, progress=progress, **s.options)
    metadata = {
        "package_version": __version__,
        "store": str(store.path),
        "spec_sha256": store.spec.sha256,
        "experiment_fingerprint": store.experiment_fingerprint or "",
        "target_fingerprint": store.meta.get("target_fingerprint") or "",
        "x_name": s.x_name,
        "y_name": s.y_name,
        "n_train": int(train.n_rows),
        "n_val": 0 if val is None else int(val.n_rows),
        "split_seed": int(s.split_seed),
        "row_rule": s.row_rule,
        "solver": s.solver,
        "solver_options": {k: v for k, v in s.options.items() if isinstance(v, (int, float, str, list))},
        "target_slice": list(train.target_slice),
        "sign_convention": SIGN_CONVENTION,
        **{k: v for k, v in result.info.items() if isinstance(v, (int, float, str, list, dict))},
        # the stores and rows fitted on: evaluate tells in-sample figures from held-out ones
        "fitted_on": {"stores": [fitted_on(store, np.concatenate([train_rows, val_rows]), s.x_name)]},
    }
    return Attributions(result.weight, result.bias, result.lam, metadata)


def fit_sources(train: RowSource, val: RowSource | None = None, *, solver: str = "lstsq", device: str | None = None,
                metadata: Mapping[str, Any] | None = None, **options: Any) -> Attributions:
    """Fit row sources with a registered solver, on train and validation rows together, as the seed's
    final refit does -> :class:`Attributions`.

    The exact solver (``lstsq``) gets them as one source (with the seed's
    ``k: 1, manual_max_lambda: 0`` the validation rows choose nothing); a path
    solver (``saga``, ``fast_l1``) gets them apart, chooses each target's
    penalty on the validation rows and refits on both.
    """
    check_solver_options(solver, options)
    fn = get_solver(solver)
    if solver in PATH_SOLVERS:
        result = fn(train, val, device=device, **options)
        n_fit = train.n_rows + (0 if val is None else val.n_rows)
    else:
        rows = train if val is None else ConcatRows(train, val)
        result = fn(rows, None, device=device, **options)
        n_fit = rows.n_rows
    meta = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, list))}
    meta.update({
        "package_version": __version__,
        "solver": solver,
        "n_train": int(train.n_rows),
        "n_val": 0 if val is None else int(val.n_rows),
        "n_fit": int(n_fit),
        "sign_convention": SIGN_CONVENTION,
        **(metadata or {}),
    })
    return Attributions(result.weight, result.bias, result.lam, meta)
