"""The solver flags of ``coar-dask fit``, derived from the solvers' options dataclasses.

Each option field made with :func:`coar_dask.solvers.base.option` that names
a ``flag`` becomes one flag (its ``seed_key``, e.g. ``cfg.lr``, an alias
``--cfg.lr``); a flag shared by several solvers (``--lr`` by ``saga`` and
``fast_l1``) is added once. :func:`solver_options_from_args` reads them back
into the keywords of :func:`coar_dask.fit.fit.fit`.

The seed's row keys (``--data.num_train``, ``--data.num_val``,
``--data.seed``; :func:`add_row_arguments`) select rows by the seed's rule (the first
``num_train`` rows, then ``num_val``; see :mod:`coar_dask.fit.rows`), as
``run-regression`` does with the same keys; the plain flags keep the seeded
shuffle.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable

from coar_dask.errors import RegressionError
from coar_dask.solvers.base import OptionInfo
from coar_dask.solvers.registry import REGISTRY

__all__ = ["add_fit_solver_arguments", "add_row_arguments", "solver_options_from_args", "solver_flags", "SolverFlag", "SEED_ROW_FLAGS"]

logger = logging.getLogger(__name__)

#: The seed's row keys as ``coar-dask fit`` flags -> the dest they set.
SEED_ROW_FLAGS = {"--data.num_train": "num_train", "--data.num_val": "num_val", "--data.seed": "split_seed"}
#: Namespace attribute listing the seed row keys given (their presence selects the seed's row rule).
_SEED_ROWS_SEEN = "seed_row_keys"


@dataclass(frozen=True)
class SolverFlag:
    """One ``coar-dask fit`` flag of a solver option, and the solvers that have it."""

    info: OptionInfo
    solvers: tuple[str, ...]

    @property
    def spellings(self) -> tuple[str, ...]:
        alias = f"--{self.info.seed_key}" if self.info.seed_key else None
        return tuple(f for f in (self.info.flag, alias) if f)


def solver_flags() -> tuple[SolverFlag, ...]:
    """Every solver flag, in registry and field order, each once with the solvers it belongs to."""
    found: dict[str, tuple[OptionInfo, list[str]]] = {}
    for name, entry in REGISTRY.items():
        for info in entry.option_infos():
            if info.flag:
                found.setdefault(info.flag, (info, []))[1].append(name)
    return tuple(SolverFlag(info, tuple(solvers)) for info, solvers in found.values())


def _solvers_of(dest: str) -> tuple[str, ...]:
    """The solvers that have a flag setting ``dest``."""
    return tuple(n for n, e in REGISTRY.items() if any(i.name == dest and i.flag for i in e.option_infos()))


class _SeedRowFlag(argparse.Action):
    """Stores an int like ``--num-train`` does, and notes that the seed's key was used."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, _SEED_ROWS_SEEN, (*getattr(namespace, _SEED_ROWS_SEEN, ()), option_string))


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """The row flags of ``coar-dask fit``: ``--num-train``, ``--num-val``, ``--split-seed`` (a seeded
    shuffle) and the seed's keys ``--data.num_train``, ``--data.num_val``, ``--data.seed`` (the seed's
    rule: the first rows, in order; see :data:`SEED_ROW_FLAGS`)."""
    parser.add_argument("--num-train", dest="num_train", type=int, default=None,
                        help="train rows (default: all completed rows not used for validation)")
    parser.add_argument("--num-val", dest="num_val", type=int, default=0, help="validation rows (default 0)")
    parser.add_argument("--split-seed", dest="split_seed", type=int, default=0,
                        help="seed of the shuffled train/val split")
    for flag, dest in SEED_ROW_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=int, action=_SeedRowFlag, default=argparse.SUPPRESS,
                            help=f"the seed's {flag[2:]}: rows by the seed's rule (the first rows, in order)")


def add_fit_solver_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the solver flags of ``coar-dask fit`` to ``parser``.

    ``--solver``; each solver option's flag (``--ridge``, ``--ridge-grid``,
    ``--refit``, ``--method`` of lstsq; ``--lr``, ``--k``, ``--eps``,
    ``--max-lambda``, ``--batch-size``, ``--early-stop-every``,
    ``--early-stop-eps``, ``--max-epochs``, ``--no-refit`` of saga, with the
    seed's ``--cfg.*`` / ``--early_stopping.*`` spellings as aliases);
    ``--slices N`` and ``--max-targets M``. Every option defaults to ``None``
    (solver default); flags the parser already has (e.g. ``--solver``,
    ``--ridge``) are left as they are. Read them back with
    :func:`solver_options_from_args`.
    """
    g = parser.add_argument_group("solver", "how the per-example regressions are solved")

    def add(*flags: str, **kwargs: Any) -> None:
        try:
            g.add_argument(*flags, **kwargs)
        except argparse.ArgumentError:
            logger.debug("parser already has %s", flags[0])

    add("--solver", choices=sorted(REGISTRY), default="lstsq",
        help=", ".join(f"{name} ({e.description})" for name, e in REGISTRY.items()))
    for sf in solver_flags():
        info = sf.info
        if info.action == "store":
            add(*sf.spellings, dest=info.name, type=info.type, default=None, help=info.help)
        else:
            add(*sf.spellings, dest=info.name, action=info.action, default=None, help=info.help)
    add("--slices", dest="slices", type=int, default=None,
        help="split the targets into N slices fitted as separate Dask tasks (GPU tasks with --device cuda)")
    add("--max-targets", dest="max_targets", type=int, default=None,
        help="at most M targets per slice (bounds SAGA's rows x targets table per task)")


def _flag_value(solver: str, dest: str, value: Any, spelling: str, parse: Callable[[Any], Any] | None) -> Any:
    solvers = _solvers_of(dest)
    if solver not in solvers:
        raise RegressionError(f"{spelling} is an option of solver {' / '.join(solvers)}, not {solver!r}; "
                              f"drop it or pass --solver {solvers[0]}.")
    return parse(value) if parse is not None else value


def solver_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`~coar_dask.fit.fit.fit` from the flags of :func:`add_fit_solver_arguments`.

    Always ``solver``; ``slices`` and ``max_targets`` when given;
    ``row_rule="seed"`` when a seed row key (``--data.num_train`` ...) was
    given; and the solver's options whose flags were given (so
    ``fit(store, **options)`` uses the solver's defaults for the rest). A flag
    of another solver (``--lr`` with lstsq) raises :class:`RegressionError`
    saying so.

    Examples
    --------
    >>> p = argparse.ArgumentParser(); add_fit_solver_arguments(p)
    >>> solver_options_from_args(p.parse_args(["--solver", "saga", "--cfg.lr", "1e-3", "--slices", "4"]))
    {'solver': 'saga', 'lr': 0.001, 'slices': 4}
    """
    solver = getattr(args, "solver", None) or "lstsq"
    out: dict[str, Any] = {"solver": solver}
    by_dest: dict[str, list[SolverFlag]] = {}
    for sf in solver_flags():
        by_dest.setdefault(sf.info.name, []).append(sf)
    for dest, flags in by_dest.items():
        value = getattr(args, dest, None)
        if value is None or (dest == "ridge" and value == 0 and solver != "lstsq"):
            continue
        spelling = "/".join(f.info.flag for f in flags)
        out[dest] = _flag_value(solver, dest, value, spelling, flags[0].info.parse)
    if out.get("ridge") == 0.0:  # plain least squares: the solver's default too
        del out["ridge"]
    for name in ("slices", "max_targets"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise RegressionError(f"--{name.replace('_', '-')} must be >= 1; found {value}.")
            out[name] = int(value)
    if getattr(args, _SEED_ROWS_SEEN, ()):
        out["row_rule"] = "seed"
    return out
