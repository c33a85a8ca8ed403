"""What a fit will do, decided once: :class:`FitSettings` resolved against a store into a :class:`FitPlan`.

A fit goes one way through: :func:`plan_fit` resolves the settings (array
names, target range), reads the store's completed rows once and splits them
into train and validation rows, and chooses one of three executions --

``"process"``
    one solve of every target in this process (:func:`coar_dask.fit.core.solve`);
``"rows"``
    the training rows' moments summed in row groups on Dask workers, one
    solve here (:mod:`coar_dask.fit.moments`), for solvers whose registry
    entry says they can (``row_parallel``);
``"slices"``
    contiguous target slices, one task each, in this process or on Dask
    (:mod:`coar_dask.fit.distributed`);

-- then :func:`coar_dask.fit.core.assemble` makes one
:class:`~coar_dask.fit.attributions.Attributions` of the parts. The plan is
small, frozen, picklable (it is every task's argument) and has a readable
``repr``; nothing here reads a row or runs a solver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from coar_dask.core.store import Store, open_store
from coar_dask.errors import RegressionError
from coar_dask.fit.rows import ROW_RULES, infer_names, select_rows
from coar_dask.solvers.registry import check_solver_options, get_entry

__all__ = ["FitSettings", "FitPlan", "EXECUTIONS", "DEFAULT_VAL_FRACTION", "plan_fit", "plan_slices"]

logger = logging.getLogger(__name__)

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")

#: Fraction of the completed rows held out for validation when the solver's options choose on validation
#: rows (a ridge grid, a lasso path) and neither num_val nor num_train was given.
DEFAULT_VAL_FRACTION = 0.1

#: The ways a plan runs (see the module's docstring); ``"auto"`` lets :func:`plan_fit` choose.
EXECUTIONS = ("process", "rows", "slices")


def _count(value: Any, name: str, flag: str, *, least: int, none: bool) -> None:
    """Refuse a row count that is not an integer >= ``least`` (``None`` allowed when ``none``)."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        allowed = " or None (every row not for validation)" if none else ""
        raise RegressionError(f"{name} ({flag}) must be an integer >= {least}{allowed}; found {value!r} "
                              f"({type(value).__name__}).")


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
        ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``.
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
        _count(self.num_train, "num_train", "--num-train", least=1, none=True)
        _count(self.num_val, "num_val", "--num-val", least=0, none=True)
        _count(self.split_seed, "split_seed", "--split-seed", least=0, none=False)
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
            try:
                fields["target_slice"] = tuple(int(v) for v in fields["target_slice"])
            except (TypeError, ValueError):
                raise RegressionError(f"target_slice (--target-slice) must be (start, stop) integers; found "
                                      f"{fields['target_slice']!r}.") from None
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


def plan_slices(
    target_range: tuple[int, int], slices: int | Sequence[tuple[int, int]] | None = None, *, max_targets: int | None = None
) -> list[tuple[int, int]]:
    """Split the targets ``[start, stop)`` into contiguous slices.

    Parameters
    ----------
    target_range
        ``(start, stop)`` of all the targets to fit.
    slices
        A number of slices (sizes differ by at most one, larger first, like
        ``numpy.array_split``), or explicit ``(start, stop)`` slices that
        must tile ``target_range`` in order. ``None``: one slice, or as many
        as ``max_targets`` needs.
    max_targets
        Largest slice (e.g. to bound SAGA's ``n x K`` table per task).

    Examples
    --------
    >>> plan_slices((0, 10), 3)
    [(0, 4), (4, 7), (7, 10)]
    >>> plan_slices((100, 110), max_targets=4)
    [(100, 104), (104, 107), (107, 110)]
    """
    start, stop = int(target_range[0]), int(target_range[1])
    if not 0 <= start < stop:
        raise RegressionError(f"target range [{start}, {stop}) is empty or negative.")
    if slices is not None and not isinstance(slices, (int, np.integer)):
        return _tiled(slices, start, stop)
    count = 1 if slices is None else int(slices)
    if max_targets is not None:
        if int(max_targets) < 1:
            raise RegressionError(f"max_targets must be >= 1; found {max_targets}.")
        count = max(count, -(-(stop - start) // int(max_targets)))
    if count < 1:
        raise RegressionError(f"slices must be >= 1; found {slices}.")
    count = min(count, stop - start)
    base, extra = divmod(stop - start, count)
    out, a = [], start
    for i in range(count):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


def _tiled(slices: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """Explicit slices, checked to tile ``[start, stop)`` in order."""
    out = [(int(a), int(b)) for a, b in slices]
    expected = start
    for a, b in out:
        if a != expected or b <= a:
            raise RegressionError(f"target slices {out} must tile [{start}, {stop}) in order without gaps or overlaps.")
        expected = b
    if expected != stop:
        raise RegressionError(f"target slices {out} must end at {stop}.")
    return out


@dataclass(frozen=True)
class FitPlan:
    """A fit decided: the store, the resolved settings, the rows, the execution and its target slices.

    Attributes
    ----------
    store_path
        The store (absolute path); tasks open it themselves.
    settings
        :class:`FitSettings` resolved against the store (array names and target range filled in).
    slices
        Target slices: one for ``"process"`` and ``"rows"``, one task each for ``"slices"``.
    execution
        ``"process"``, ``"rows"`` or ``"slices"`` (see the module's docstring).
    n_rows, n_completed
        The store's rows, and how many of them were completed when planned (the rest are pending).
    train_rows, val_rows
        The rows each part fits on (the same for every slice, read once when planning).
    """

    store_path: str
    settings: FitSettings
    slices: tuple[tuple[int, int], ...]
    execution: str = "process"
    n_rows: int = 0
    n_completed: int = 0
    train_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False, repr=False)
    val_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False, repr=False)

    @property
    def gpu(self) -> bool:
        device = self.settings.device
        return bool(device) and str(device).startswith("cuda")

    @property
    def target_range(self) -> tuple[int, int]:
        return self.slices[0][0], self.slices[-1][1]

    @property
    def n_pending(self) -> int:
        """Rows of the store not completed when the fit was planned (not fitted on)."""
        return self.n_rows - self.n_completed

    @property
    def token(self) -> str:
        h = hashlib.sha256(f"{self.store_path}|{self.settings!r}|{self.slices}|{self.execution}".encode())
        h.update(np.ascontiguousarray(self.train_rows).tobytes())
        h.update(np.ascontiguousarray(self.val_rows).tobytes())
        return h.hexdigest()[:10]

    def task_key(self, index: int) -> str:
        return f"coar-fit-{index}-{self.token}"

    def __repr__(self) -> str:
        a, b = self.target_range
        s = self.settings
        opts = ", ".join(f"{k}={v!r}" for k, v in s.solver_options)
        rule = f"seed {s.split_seed}" if s.row_rule == "shuffle" else "first rows"
        return (
            f"<FitPlan {s.solver}{'(' + opts + ')' if opts else ''} on {self.store_path!r}: targets {a}:{b} "
            f"in {len(self.slices)} slice(s), {self.execution}, {self.train_rows.size} train / "
            f"{self.val_rows.size} val rows ({rule}), device {s.device or 'cpu'}>"
        )


def _choose(execution: str, store: Store, s: FitSettings, client: Any, sliced: bool) -> str:
    """The execution ``"auto"`` stands for: slices when asked for; with a client, row groups when the
    solver's entry can sum rows apart, else slices; without one, this process."""
    if execution not in ("auto", *EXECUTIONS):
        raise RegressionError(f"execution={execution!r}: choose 'auto' or one of {list(EXECUTIONS)}.")
    P = int(np.prod(store.spec[s.x_name].shape))
    rows_ok = get_entry(s.solver).sums_rows_apart(s.options, P, s.device)
    if execution == "rows" and not rows_ok:
        raise RegressionError(
            f"a row-parallel fit sums the rows' moments: solver {s.solver!r} with options {s.options} on device "
            f"{s.device or 'cpu'} cannot (lstsq needs the CPU and method 'gram', or 'auto' with P x P within "
            f"max_gram_bytes). Fit in target slices instead (slices=N).")
    if execution != "auto":
        return execution
    if sliced:
        return "slices"
    if client is None:
        return "process"
    return "rows" if rows_ok else "slices"


def _default_split(s: FitSettings, n_completed: int) -> FitSettings:
    """``s``, holding out :data:`DEFAULT_VAL_FRACTION` of the rows for validation when its solver options
    choose something on validation rows (``ridge_grid="auto"``, a lasso path) and no split was given."""
    if s.num_val or s.num_train is not None or not get_entry(s.solver).wants_validation(s.options):
        return s
    num_val = max(1, int(n_completed * DEFAULT_VAL_FRACTION))
    logger.warning("%s with %s chooses on validation rows and none were given: holding out %d of the %d "
                   "completed rows (%d%%; set num_val / --num-val to choose)", s.solver, s.options, num_val,
                   n_completed, round(100 * DEFAULT_VAL_FRACTION))
    return dataclasses.replace(s, num_val=num_val)


def _no_rows(store: Store) -> RegressionError:
    return RegressionError(
        f"store {str(store.path)!r} has only 0 completed rows of {store.num_rows}: nothing to fit on. Build "
        f"rows first (`coar-dask build {store.path} ...`, or the seed's write_dataset), then fit.")


def plan_fit(
    store: Store | str | os.PathLike,
    settings: FitSettings,
    *,
    slices: int | Sequence[tuple[int, int]] | None = None,
    max_targets: int | None = None,
    client: Any | None = None,
    execution: str = "auto",
) -> FitPlan:
    """Plan a fit of ``store``: settings resolved, rows chosen, execution and slices decided; nothing runs.

    Parameters
    ----------
    store
        A store or its path.
    settings
        What to fit (:class:`FitSettings`).
    slices, max_targets
        Target slices (see :func:`plan_slices`); either one asks for the ``"slices"`` execution.
    client
        The Dask client the plan will run on, if any (``"auto"`` then prefers row groups).
    execution
        ``"auto"`` (default) or one of :data:`EXECUTIONS`.

    Examples
    --------
    >>> plan = plan_fit("store", FitSettings(num_val=200), slices=4)   # doctest: +SKIP
    >>> plan                                                           # doctest: +SKIP
    <FitPlan lstsq on '/data/store': targets 0:500 in 4 slice(s), slices, 1800 train / 200 val rows ...>
    """
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    s = settings.resolve(store)
    completed = np.flatnonzero(store.completed_rows())
    if completed.size == 0:
        raise _no_rows(store)
    s = _default_split(s, completed.size)
    train_rows, val_rows = select_rows(completed, s.num_train, s.num_val, s.split_seed, s.row_rule)
    how = _choose(execution, store, s, client, slices is not None or max_targets is not None)
    parts = plan_slices(s.target_slice, slices, max_targets=max_targets) if how == "slices" else [s.target_slice]
    return FitPlan(store_path=str(os.path.abspath(store.path)), settings=s, slices=tuple(parts), execution=how,
                   n_rows=int(store.num_rows), n_completed=int(completed.size), train_rows=train_rows,
                   val_rows=val_rows)
