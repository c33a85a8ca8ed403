"""What every solver shares: the row-source protocol, the solver protocol, results, progress, options.

A solver takes a *row source*: any object with ``n_rows``, ``n_features``,
``n_targets`` and ``blocks()`` yielding ``(X, Y)`` numpy blocks (X: masks as
0/1, shape (b, P); Y: outputs, shape (b, K)). It is called as
``solver(train, val=None, *, device=None, progress=None, **options)``, where
``options`` are the fields of the solver's frozen options dataclass (see
:mod:`coar_dask.solvers.registry`), and returns a :class:`SolverResult` with
weights in *mask units* (the prediction for a mask ``m``, 1 = kept, is
``m @ weight + bias``).

Options dataclasses describe each field once, with :func:`option`: its
default, help text, the ``coar-dask fit`` flag and the seed's config key.
The command line (:mod:`coar_dask.cli.solver_flags`) and the seed mapping
(:mod:`coar_dask.compat.seed`) are derived from these fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, TypeVar

import numpy as np

from coar_dask.errors import RegressionError

logger = logging.getLogger(__name__)

__all__ = [
    "RowSource",
    "Solver",
    "SolverResult",
    "FitProgress",
    "ProgressFn",
    "report",
    "option",
    "OptionInfo",
    "option_infos",
    "make_options",
    "options_dict",
    "torch_device",
    "threads_for",
    "SMALL_STEP_FLOPS",
]


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


@dataclass(frozen=True)
class FitProgress:
    """One progress report of a fit, for a progress bar.

    Attributes
    ----------
    stage
        ``"moments"`` (rows streamed), ``"cg"`` (iterations), ``"ridge"``
        (grid values tried), ``"saga"`` / ``"saga-refit"`` (epochs) or
        ``"slices"`` (target slices finished).
    done, total
        Steps done and expected (``total`` is ``None`` when unknown, and an
        upper bound for iterative stages that may stop early).
    target_slice
        ``(start, stop)`` of the targets this report is about, when known.
    detail
        Short human text, e.g. ``"3.0/10 lambdas, 120/500 targets done"``.
    """

    stage: str
    done: int
    total: int | None = None
    target_slice: tuple[int, int] | None = None
    detail: str = ""

    def describe(self) -> str:
        """A one-line description, e.g. ``"targets 0:500 saga: 3.0/10 lambdas"``."""
        where = f"targets {self.target_slice[0]}:{self.target_slice[1]} " if self.target_slice else ""
        return f"{where}{self.stage}" + (f": {self.detail}" if self.detail else "")


#: A progress callback: called with a :class:`FitProgress`; must be cheap.
ProgressFn = Callable[[FitProgress], None]


def report(progress: ProgressFn | None, stage: str, done: int, total: int | None, detail: str = "") -> None:
    """Call ``progress`` (if any) with one :class:`FitProgress`."""
    if progress is not None:
        progress(FitProgress(stage=stage, done=int(done), total=total, detail=detail))


class Solver(Protocol):
    """A registered solver: row sources in, :class:`SolverResult` out.

    ``options`` are the fields of the solver's options dataclass; an unknown
    one raises :class:`~coar_dask.errors.RegressionError` naming the valid ones.
    """

    def __call__(self, train: RowSource, val: RowSource | None = None, *, device: Any = None,
                 progress: ProgressFn | None = None, **options: Any) -> SolverResult: ...


# --------------------------------------------------------------------------
# Options: one frozen dataclass per solver, each field described once
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionInfo:
    """How one option field appears outside Python.

    Attributes
    ----------
    name
        The field (and keyword) name, e.g. ``"early_stop_every"``.
    help
        One line of help text.
    flag
        The ``coar-dask fit`` flag, e.g. ``"--early-stop-every"`` (``None``:
        not on the command line).
    seed_key
        The seed's dotted config key, e.g. ``"early_stopping.check_every"``;
        also accepted as a flag alias ``--early_stopping.check_every``.
    type
        What the flag's text is converted with (``float``, ``int``, ``str``,
        or a parse function raising :class:`RegressionError`).
    action
        ``"store"`` or, for booleans, ``"store_true"`` / ``"store_false"``.
    parse
        Converts the flag's value to the option's, raising
        :class:`RegressionError` that names the flag (``None``: as is).
    from_seed
        Converts the seed config's value to the option's (e.g. the seed's
        ``manual_max_lambda: -1`` is ``max_lambda="auto"``).
    """

    name: str
    help: str
    flag: str | None = None
    seed_key: str | None = None
    type: Callable[[str], Any] = str
    action: str = "store"
    parse: Callable[[Any], Any] | None = None
    from_seed: Callable[[Any], Any] | None = None


def option(default: Any, help: str, *, flag: str | None = None, seed_key: str | None = None,
           type: Callable[[str], Any] = str, action: str = "store", parse: Callable[[Any], Any] | None = None,
           from_seed: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field of an options class, with the :class:`OptionInfo` that describes it."""
    info = dict(help=help, flag=flag, seed_key=seed_key, type=type, action=action, parse=parse,
                from_seed=from_seed)
    return field(default=default, metadata={"coar_option": info})


def option_infos(cls: type) -> tuple[OptionInfo, ...]:
    """The :class:`OptionInfo` of each field of options class ``cls``, in field order."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("coar_option", {"help": ""})
        out.append(OptionInfo(name=f.name, **meta))
    return tuple(out)


T = TypeVar("T")


def make_options(cls: type[T], solver: str, options: T | None = None, kwargs: Mapping[str, Any] | None = None) -> T:
    """``cls(**kwargs)`` (or ``options`` with ``kwargs`` replaced), an unknown name raising
    :class:`RegressionError` that lists the solver's options."""
    kwargs = dict(kwargs or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise RegressionError(
            f"solver {solver!r} has no option(s) {unknown}; its options are {names}. "
            f"(CLI: the flags of another solver were given; check --solver.)"
        )
    if options is None:
        return cls(**kwargs)
    return dataclasses.replace(options, **kwargs) if kwargs else options


def options_dict(options: Any) -> dict[str, Any]:
    """The options' plain values (numbers, strings), for metadata."""
    return {k: v for k, v in dataclasses.asdict(options).items()
            if isinstance(v, (int, float, str)) and v is not None}


# --------------------------------------------------------------------------
# Devices and threads
# --------------------------------------------------------------------------
#: Below this many flops per batch, CPU work runs on one thread. Measured on
#: 2 busy cores: a SAGA step of 6e6 flops (50 x 80 x 360) ran 50x faster on one
#: thread than on two (OpenMP barriers stall when the cores are shared).
SMALL_STEP_FLOPS = 1e8


@contextlib.contextmanager
def threads_for(flops_per_step: float, dev: Any) -> Iterator[None]:
    """One torch thread for tiny steps on CPU: thread wake-ups and barriers cost
    more than they save there (a hundredfold on a busy machine)."""
    import torch

    if dev.type != "cpu" or flops_per_step >= SMALL_STEP_FLOPS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_device(device: Any):
    """``torch.device(device or "cpu")``, refusing CUDA when torch sees no GPU.

    ``cuda:N`` on a process that sees one GPU (a Dask worker started with
    ``CUDA_VISIBLE_DEVICES=N``, where that GPU is ``cuda:0``) is its one GPU;
    an index beyond the GPUs of a process that sees several is refused.
    """
    import torch

    dev = torch.device(device or "cpu")
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise RegressionError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu.")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        if count == 1:
            logger.info("device %s: this process sees one GPU (cuda:0), which is that GPU", device)
            return torch.device("cuda", 0)
        raise RegressionError(f"device {str(device)!r}: torch sees {count} GPUs here, cuda:0 to cuda:{count - 1}; "
                              f"choose one of them (--device cuda:N).")
    return dev
