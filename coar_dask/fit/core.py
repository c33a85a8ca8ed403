"""Solve one part of a planned fit, and assemble the parts into one :class:`Attributions`.

:func:`solve` fits one target slice of a :class:`~coar_dask.fit.plan.FitPlan`
on the plan's rows with its registered solver (every execution calls it:
in process, after the row groups' moments are summed, or once per slice
task); :func:`assemble` joins the parts in target order and writes the
metadata once, the store's recorded experiment and components among it
(:func:`experiment_metadata`: names come from the store's record, never by
running its model). :func:`fit_sources` fits any row sources (a ``.beton``, a
store) the way the seed's final refit does.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from coar_dask._version import __version__
from coar_dask.core.experiment import Experiment
from coar_dask.core.store import Store, open_store
from coar_dask.errors import RegressionError
from coar_dask.fit.attributions import SIGN_CONVENTION, Attributions
from coar_dask.fit.plan import FitPlan
from coar_dask.fit.rows import StoreRows, fitted_on
from coar_dask.solvers.base import FitProgress, ProgressFn, RowSource, SolverResult
from coar_dask.solvers.registry import check_solver_options, get_entry
from coar_dask.solvers.rows import ConcatRows

__all__ = ["FitPart", "solve", "assemble", "experiment_metadata", "fit_sources"]

logger = logging.getLogger(__name__)

#: Metadata that is the same for every slice: kept once, not repeated under ``slices``.
_SHARED = ("sign_convention", "store", "package_version", "spec_sha256", "experiment_fingerprint",
           "target_fingerprint", "x_name", "y_name", "solver", "split_seed", "row_rule")


@dataclass
class FitPart:
    """One solved target slice: the solver's result and the rows it was fitted on."""

    target_slice: tuple[int, int]
    result: SolverResult
    n_train: int
    n_val: int
    #: Components that did not vary over the training rows (never, or always, ablated there).
    constant: list[int] = dataclasses.field(default_factory=list)


class _Counted:
    """A row source that counts, in its first pass, how many rows keep each component."""

    def __init__(self, source: RowSource):
        self.source = source
        self.n_rows, self.n_features, self.n_targets = source.n_rows, source.n_features, source.n_targets
        self.kept = np.zeros(int(source.n_features), dtype=np.int64)
        self.seen = 0
        self._passes = 0

    def blocks(self):
        self._passes += 1
        count = self._passes == 1
        for x, y in self.source.blocks():
            if count:
                self.kept += np.asarray(x).reshape(len(x), -1).sum(0).astype(np.int64)
                self.seen += len(x)
            yield x, y

    def constant(self) -> list[int]:
        if self.seen != self.n_rows:
            return []
        return np.flatnonzero((self.kept == 0) | (self.kept == self.seen)).tolist()

    def __getattr__(self, name: str) -> Any:  # target_slice, rows, store of a StoreRows
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def _tagged(progress: ProgressFn | None, target_slice: tuple[int, int]) -> ProgressFn | None:
    """``progress`` with every report naming ``target_slice`` (unless it names one itself)."""
    if progress is None:
        return None

    def tag(p: FitProgress) -> None:
        progress(dataclasses.replace(p, target_slice=p.target_slice or target_slice))

    return tag


def solve(plan: FitPlan, target_slice: tuple[int, int], progress: ProgressFn | None = None, *,
          store: Store | None = None, prepare: Callable[[StoreRows], RowSource] | None = None) -> FitPart:
    """Fit ``target_slice`` of ``plan`` on its train (and validation) rows with its solver.

    ``store``: the plan's store, already open (else opened from ``plan.store_path``);
    ``prepare(train)``: the training rows the solver gets instead (e.g. with their moments summed
    on a cluster: :mod:`coar_dask.fit.moments`).
    """
    store = store if store is not None else open_store(plan.store_path, read_only=True)
    s = plan.settings
    train: Any = StoreRows(store, plan.train_rows, s.x_name, s.y_name, target_slice)
    train = prepare(train) if prepare is not None else _Counted(train)
    val = StoreRows(store, plan.val_rows, s.x_name, s.y_name, target_slice) if plan.val_rows.size else None
    logger.info("fitting %s on %d train / %d val rows, %d components x %d targets", s.solver, train.n_rows,
                0 if val is None else val.n_rows, train.n_features, train.n_targets)
    fn = get_entry(s.solver).fn
    result = fn(train, val, device=s.device, progress=_tagged(progress, target_slice), **s.options)
    constant = train.constant() if isinstance(train, _Counted) else getattr(train, "constant", [])
    return FitPart(tuple(target_slice), result, int(train.n_rows), 0 if val is None else int(val.n_rows),
                   list(constant))


def _plain(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, list, dict))}


def _joined_info(plan: FitPlan, parts: Sequence[FitPart]) -> dict[str, Any]:
    """The solvers' info of all parts: per-target lists concatenated in target order, the rest from the
    first part; with several slices, each slice's own scalars under ``slices``."""
    infos = [_plain(p.result.info) for p in parts]
    widths = [p.target_slice[1] - p.target_slice[0] for p in parts]
    per_target = {k for k, v in infos[0].items() if isinstance(v, list) and len(v) == widths[0]
                  and all(isinstance(i.get(k), list) and len(i[k]) == w for i, w in zip(infos, widths))}
    out = {k: v for k, v in infos[0].items() if k not in per_target}
    out.update({k: [x for i in infos for x in i[k]] for k in sorted(per_target)})
    if plan.execution == "slices":
        out["slices"] = [{"target_slice": list(p.target_slice), "n_train": p.n_train, "n_val": p.n_val,
                          **{k: v for k, v in i.items() if k not in per_target and k not in _SHARED
                             and isinstance(v, (int, float, str, list))}}
                         for p, i in zip(parts, infos)]
        out["n_slices"] = len(parts)
    return out


def assemble(plan: FitPlan, parts: Sequence[FitPart], store: Store | None = None) -> Attributions:
    """One :class:`Attributions` of ``plan``'s parts, in target order, with the fit's metadata.

    Raises :class:`RegressionError` when a part is missing or covers other targets than its slice.
    """
    if len(parts) != len(plan.slices):
        raise RegressionError(f"expected {len(plan.slices)} solved slice(s), got {len(parts)}.")
    for part, sl in zip(parts, plan.slices):
        width = part.result.weight.shape[1] if part.result.weight.ndim == 2 else -1
        if tuple(part.target_slice) != tuple(sl) or width != sl[1] - sl[0]:
            raise RegressionError(f"slice {sl} came back as {part.target_slice} with {width} targets; refit it.")
    store = store if store is not None else open_store(plan.store_path, read_only=True)
    s = plan.settings
    metadata = {
        "package_version": __version__,
        "store": str(store.path),
        "spec_sha256": store.spec.sha256,
        "experiment_fingerprint": store.experiment_fingerprint or "",
        "target_fingerprint": store.meta.get("target_fingerprint") or "",
        "x_name": s.x_name,
        "y_name": s.y_name,
        "n_train": parts[0].n_train,
        "n_val": parts[0].n_val,
        "split_seed": int(s.split_seed),
        "row_rule": s.row_rule,
        "solver": s.solver,
        "solver_options": {k: v for k, v in s.options.items() if isinstance(v, (int, float, str, list))},
        "sign_convention": SIGN_CONVENTION,
        **_joined_info(plan, parts),
        "target_slice": list(plan.target_range),
        # the stores and rows fitted on: evaluate tells in-sample figures from held-out ones
        "fitted_on": {"stores": [fitted_on(store, np.concatenate([plan.train_rows, plan.val_rows]), s.x_name)]},
        **experiment_metadata(store),
        **_gaps(plan, parts[0].constant),
    }
    cat = lambda name: np.concatenate([getattr(p.result, name) for p in parts], axis=-1)  # noqa: E731
    weight = cat("weight")
    # their weights say nothing: NaN, not the solver's 0 (issue 22); a fit toward a prior keeps the prior's there
    if metadata["unfitted_components"] and "prior" not in metadata:
        weight[metadata["unfitted_components"], :] = np.nan
    return Attributions(weight, cat("bias"), cat("lam"), metadata)


def _gaps(plan: FitPlan, constant: list[int]) -> dict[str, Any]:
    """What the fit could not see, reported (a warning) and recorded: rows of the store still pending
    (a partial build: its completed rows may be a biased sample) and components that never varied over
    the training rows (their weights say nothing: :func:`assemble` makes them NaN)."""
    if plan.n_pending:
        logger.warning("store %s: %d of %d rows are pending (not built); fitted on the %d completed rows only. "
                       "Finish the build (coar-dask build) to fit on every row.", plan.store_path, plan.n_pending,
                       plan.n_rows, plan.n_completed)
    if constant:
        logger.warning("%d component(s) were never (or always) ablated in the %d training rows, so their weights "
                       "are not fitted (NaN, e.g. %s); metadata 'unfitted_components' lists them. Build more "
                       "rows, or finish a partial build.", len(constant), plan.train_rows.size, constant[:5])
    return {"n_pending_rows": int(plan.n_pending), "unfitted_components": [int(c) for c in constant]}


def experiment_metadata(store: Store) -> dict[str, Any]:
    """What attributions fitted on ``store`` record about its experiment (plain data), from the
    store's record alone (nothing is imported or run).

    ``experiment`` (the description the store was built with), ``example_count``
    and ``components`` (layers and units, which name every component) when the
    store records them; each is ``None`` otherwise (e.g. a store imported from
    the seed's ``.npy`` files; a store built before builds recorded the
    components: :func:`coar_dask.fit.fit.components_from_model` names them by
    calling its model factory, when asked).
    """
    meta = store.meta
    recorded = meta.get("experiment")
    if not recorded:
        return {"experiment": None, "example_count": None, "components": None}
    experiment = Experiment.from_dict(recorded, source=f"the experiment recorded in store {str(store.path)!r}")
    components = meta.get("components")  # a record from elsewhere may hold anything: a mapping or nothing
    summary = dict(components) if isinstance(components, Mapping) and components else None
    if summary is None:
        logger.info("store %s records no components summary (built before builds recorded one): the "
                    "attributions name no components; coar_dask.fit.fit.components_from_model names them "
                    "by calling the model factory", store.path)
    return {
        "experiment": dict(recorded),
        "example_count": int(np.prod(store.spec[experiment.y_name].shape)),
        "components": check_components(summary, store, experiment.x_name),
    }


def check_components(summary: Mapping[str, Any] | None, store: Store, x_name: str) -> dict[str, Any] | None:
    """``summary`` when its total matches the store's mask width; ``None`` (and a warning) otherwise."""
    n_masks = int(np.prod(store.spec[x_name].shape))
    total = summary.get("total") if summary is not None else None
    if summary is not None and (isinstance(total, bool) or not isinstance(total, int) or total != n_masks):
        logger.warning("component names unknown: the model has %s components, the store %d",
                       summary.get("total"), n_masks)
        return None
    return None if summary is None else dict(summary)


def fit_sources(train: RowSource, val: RowSource | None = None, *, solver: str = "lstsq", device: str | None = None,
                metadata: Mapping[str, Any] | None = None, **options: Any) -> Attributions:
    """Fit row sources with a registered solver, on train and validation rows together, as the seed's
    final refit does -> :class:`Attributions`.

    The exact solver (``lstsq``) gets them as one source (with the seed's
    ``k: 1, manual_max_lambda: 0`` the validation rows choose nothing); a path
    solver (its registry entry's ``path`` trait: ``saga``, ``fast_l1``) gets
    them apart, chooses each target's penalty on the validation rows and
    refits on both.
    """
    check_solver_options(solver, options)
    entry = get_entry(solver)
    if entry.path:
        result = entry.fn(train, val, device=device, **options)
        n_fit = train.n_rows + (0 if val is None else val.n_rows)
    else:
        rows = train if val is None else ConcatRows(train, val)
        result = entry.fn(rows, None, device=device, **options)
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
