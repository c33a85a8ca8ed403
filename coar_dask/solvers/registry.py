"""The one registry of solvers: name -> solver function and its options class.

Registered solvers (chosen by name with :func:`get_solver`):

``lstsq`` (default)
    Exact least squares or ridge with an intercept (:func:`coar_dask.solvers.lstsq.lstsq`,
    options :class:`~coar_dask.solvers.lstsq.LstsqOptions`).
``saga``
    fast_l1's SAGA lasso path in torch on any device (:func:`coar_dask.solvers.saga.saga`,
    options :class:`~coar_dask.solvers.saga.SagaOptions`).
``fast_l1``
    The real fast_l1 package on a CUDA GPU (:func:`coar_dask.solvers.fast_l1.fast_l1`,
    options :class:`~coar_dask.solvers.fast_l1.FastL1Options`).

Every solver follows :class:`~coar_dask.solvers.base.Solver`. To add one,
write a module with its function and its frozen options dataclass (fields
made with :func:`~coar_dask.solvers.base.option`) and add a
:class:`SolverEntry` to :data:`REGISTRY`: the ``coar-dask fit`` flags and the
option checks follow from the options class, and everything else that differs
between solvers is a trait of the entry, read where it matters:

``path``
    It fits a lasso path and takes the validation rows apart to choose each
    penalty (:func:`coar_dask.fit.core.fit_sources`); otherwise a final refit
    hands it train and validation rows as one source.
``stages``
    The progress stages it reports and the unit each counts
    (:mod:`coar_dask.fit.progress`).
``seed``
    ``run-regression --solver`` offers it for the seed's settings
    (:data:`coar_dask.compat.seed.SEED_SOLVERS`).
``needs_validation``
    ``(options) -> bool``: whether a fit with these options chooses something
    on validation rows (a ridge grid, a lasso path); a fit that gives it none
    then holds out :data:`coar_dask.fit.plan.DEFAULT_VAL_FRACTION` of the rows.
``row_parallel``
    ``(options, n_features, device) -> bool``: whether a fit with these options
    can sum the training rows' moments in row groups on Dask workers and solve
    once (:mod:`coar_dask.fit.moments`); ``None``: never.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from coar_dask.errors import RegressionError
from coar_dask.solvers.base import OptionInfo, Solver, option_infos
from coar_dask.solvers.fast_l1 import FastL1Options, fast_l1
from coar_dask.solvers.lstsq import LstsqOptions, lstsq, sums_rows_apart
from coar_dask.solvers.saga import SagaOptions, saga

__all__ = [
    "SolverEntry",
    "REGISTRY",
    "SOLVERS",
    "get_solver",
    "get_entry",
    "solver_options",
    "check_solver_options",
    "options_class",
    "stage_units",
]


@dataclass(frozen=True)
class SolverEntry:
    """A registered solver: its name, function, options class, one line of description and its traits
    (see the module's docstring)."""

    name: str
    fn: Solver
    options: type
    description: str
    path: bool = False
    stages: Mapping[str, str] = field(default_factory=dict)
    seed: bool = True
    row_parallel: Callable[[Mapping[str, Any], int, str | None], bool] | None = None
    needs_validation: Callable[[Mapping[str, Any]], bool] | None = None

    def wants_validation(self, options: Mapping[str, Any]) -> bool:
        """Whether a fit with ``options`` chooses something on validation rows."""
        return self.needs_validation is not None and bool(self.needs_validation(options))

    def sums_rows_apart(self, options: Mapping[str, Any], n_features: int, device: str | None) -> bool:
        """Whether a fit with ``options`` on ``device`` can sum its rows' moments apart (row groups)."""
        return self.row_parallel is not None and bool(self.row_parallel(options, n_features, device))

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def option_infos(self) -> tuple[OptionInfo, ...]:
        return option_infos(self.options)


def _grid_or_refit(options: Mapping[str, Any]) -> bool:
    return options.get("ridge_grid") is not None or bool(options.get("refit"))


def _path(options: Mapping[str, Any]) -> bool:
    return int(options.get("k", SagaOptions.k)) > 1


#: Every solver, in the order the command line lists them.
REGISTRY: dict[str, SolverEntry] = {
    e.name: e for e in (
        SolverEntry("lstsq", lstsq, LstsqOptions, "exact least squares/ridge, default",
                    stages={"moments": "row", "cg": "iteration", "ridge": "penalty"}, row_parallel=sums_rows_apart,
                    needs_validation=_grid_or_refit),
        SolverEntry("saga", saga, SagaOptions, "fast_l1's lasso path in torch, CPU or GPU", path=True,
                    stages={"saga": "epoch", "saga-refit": "epoch"}, needs_validation=_path),
        SolverEntry("fast_l1", fast_l1, FastL1Options, "the fast_l1 package, CUDA only", path=True,
                    stages={"fast_l1": "step"}, needs_validation=_path),
    )
}

#: name -> solver function.
SOLVERS: dict[str, Solver] = {name: e.fn for name, e in REGISTRY.items()}


def get_entry(name: str) -> SolverEntry:
    """The :class:`SolverEntry` registered under ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RegressionError(f"unknown solver {name!r}; choose one of {sorted(REGISTRY)}.") from None


def get_solver(name: str) -> Solver:
    """The solver registered under ``name``."""
    return get_entry(name).fn


def options_class(name: str) -> type:
    """The options dataclass of solver ``name``."""
    return get_entry(name).options


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options solver ``name`` accepts (besides ``device`` and ``progress``)."""
    return get_entry(name).option_names


def check_solver_options(solver: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`RegressionError` naming the valid options if ``options`` has one ``solver`` lacks."""
    allowed = solver_options(solver)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RegressionError(
            f"solver {solver!r} has no option(s) {unknown}; its options are {list(allowed)}. "
            f"(CLI: the flags of another solver were given; check --solver.)"
        )


def stage_units() -> dict[str, str]:
    """Every registered solver's progress stages -> the unit each counts (``"moments"`` -> ``"row"``)."""
    out: dict[str, str] = {}
    for entry in REGISTRY.values():
        out.update(entry.stages)
    return out
