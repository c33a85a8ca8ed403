"""Fit attributions: stream a store's completed rows into a solver.

The public entry point is :func:`fit`. It returns :class:`Attributions`,
whose ``weight`` is ``(P, K)`` in *mask units*: the predicted output of
example ``k`` for a mask ``m`` (1 = component kept, 0 = ablated) is
``m @ weight[:, k] + bias[k]``. A positive weight means keeping the
component raises the output (ablating it lowers it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from coar_dask._version import __version__
from coar_dask.errors import RegressionError, StoreMismatchError
from coar_dask.solvers.lstsq import SOLVERS, FitProgress, get_solver, solver_options
from coar_dask.core.store import Store, open_store

__all__ = [
    "StoreRows",
    "Attributions",
    "fit",
    "split_rows",
    "infer_names",
    "check_solver_options",
    "add_fit_solver_arguments",
    "solver_options_from_args",
]

logger = logging.getLogger(__name__)

SIGN_CONVENTION = (
    "weights in mask units: prediction = mask @ weight + bias, mask 1 = kept; "
    "a positive weight means keeping the component raises the output"
)


def infer_names(store: Store, x_name: str | None = None, y_name: str | None = None) -> tuple[str, str]:
    """The mask array (``x_name``) and output array (``y_name``) of a store.

    Defaults: the one bool array is the masks, the one other array the outputs.
    """
    names = store.spec.names
    if x_name is None:
        bools = [a.name for a in store.spec.schema if a.np_dtype == np.bool_]
        if len(bools) != 1:
            raise RegressionError(
                f"cannot tell which array holds the masks among {list(names)}; pass x_name "
                f"(CLI: --x-name)."
            )
        x_name = bools[0]
    if y_name is None:
        others = [n for n in names if n != x_name]
        if len(others) != 1:
            raise RegressionError(
                f"cannot tell which array holds the outputs among {others}; pass y_name "
                f"(CLI: --y-name)."
            )
        y_name = others[0]
    for label, name in (("x_name", x_name), ("y_name", y_name)):
        if name not in names:
            raise RegressionError(f"{label}={name!r} is not an array of the store; it has {list(names)}.")
    return x_name, y_name


class StoreRows:
    """A row source over chosen rows of a store: yields ``(X, Y)`` float32 blocks.

    Parameters
    ----------
    store
        An opened store.
    rows
        Row indices to read (any order; read block by block in row order).
    x_name, y_name
        Mask and output arrays.
    target_slice
        ``(start, stop)`` of the output columns to keep, like the seed's
        ``target_start_ind``/``target_end_ind``.
    """

    def __init__(
        self,
        store: Store,
        rows: np.ndarray,
        x_name: str,
        y_name: str,
        target_slice: tuple[int, int] | None = None,
    ):
        self.store = store
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.x_name, self.y_name = x_name, y_name
        k_total = int(np.prod(store.spec[y_name].shape))
        start, stop = target_slice or (0, k_total)
        if not 0 <= start < stop <= k_total:
            raise RegressionError(
                f"target slice [{start}, {stop}) is outside the {k_total} outputs of {y_name!r}."
            )
        self.target_slice = (int(start), int(stop))
        self.n_rows = int(self.rows.size)
        self.n_features = int(np.prod(store.spec[x_name].shape))
        self.n_targets = stop - start

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        s0, s1 = self.target_slice
        for _, data in self.store.iter_completed([self.x_name, self.y_name], rows=self.rows):
            x = data[self.x_name].reshape(len(data[self.x_name]), -1).astype(np.float32)
            y = data[self.y_name].reshape(len(data[self.y_name]), -1)[:, s0:s1].astype(np.float32)
            yield x, y


def split_rows(
    rows: np.ndarray, num_train: int | None, num_val: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split completed rows into train and validation rows, seeded.

    ``num_train=None`` takes every row not used for validation.
    """
    rows = np.asarray(rows, dtype=np.int64)
    num_val = int(num_val or 0)
    if num_train is None:
        num_train = rows.size - num_val
    if num_train <= 0 or num_val < 0 or num_train + num_val > rows.size:
        raise RegressionError(
            f"asked for {num_train} train + {num_val} validation rows but the store has only "
            f"{rows.size} completed rows; build more rows or lower num_train/num_val."
        )
    perm = np.random.default_rng(seed).permutation(rows)
    return np.sort(perm[:num_train]), np.sort(perm[num_train : num_train + num_val])


@dataclass(frozen=True)
class Attributions:
    """Per-example attributions. ``weight`` (P, K), ``bias`` (K,), ``lam`` (K,).

    Sign convention: weights are in mask units, ``prediction = mask @ weight +
    bias`` with mask 1 = kept; a positive weight means keeping the component
    raises the output.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_examples(self) -> int:
        return int(self.weight.shape[1])

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted outputs ``(n, K)`` for masks ``(n, P)``."""
        return np.asarray(masks, dtype=np.float32) @ self.weight + self.bias

    def save(self, path: str | os.PathLike) -> Path:
        """Save as a torch file with keys ``weight``, ``bias``, ``lam``, ``metadata``
        (the seed's keys), loadable with ``torch.load(path, weights_only=True)``."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "weight": torch.from_numpy(np.ascontiguousarray(self.weight)),
                "bias": torch.from_numpy(np.ascontiguousarray(self.bias)),
                "lam": torch.from_numpy(np.ascontiguousarray(self.lam)),
                "metadata": dict(self.metadata),
            },
            tmp,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attributions":
        """Load a file written by :meth:`save` (or the seed's ``{weight, bias, lam}``)."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise RegressionError(f"attributions file {str(path)!r} does not exist.")
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
            # torch's own message spans several lines and suggests weights_only=False,
            # which would run arbitrary code: keep only its first line, and say why.
            text = str(exc).strip()
            if "Weights only load failed" in text:
                reason = "it holds Python objects other than tensors and plain data"
            else:
                reason = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'}"
            raise RegressionError(
                f"{str(path)!r} is not an attributions file this package can load safely ({reason}); "
                f"pass a file written by `coar-dask fit`."
            ) from None
        if not isinstance(data, dict) or not {"weight", "bias"} <= set(data):
            raise RegressionError(f"{str(path)!r} has no 'weight' and 'bias'; is it an attributions file?")
        weight = data["weight"].float().numpy()
        lam = data.get("lam")
        return cls(
            weight=weight,
            bias=data["bias"].float().numpy().reshape(-1),
            lam=np.zeros(weight.shape[1], np.float32) if lam is None else lam.float().numpy().reshape(-1),
            metadata=dict(data.get("metadata", {})),
        )

    def check_store(self, store: Store, x_name: str, y_name: str) -> None:
        """Raise if these attributions cannot describe ``store``'s rows."""
        p = int(np.prod(store.spec[x_name].shape))
        k = int(np.prod(store.spec[y_name].shape))
        s0, s1 = self.metadata.get("target_slice", (0, k))
        if p != self.n_components or (s1 - s0) != self.n_examples:
            raise StoreMismatchError(
                f"these attributions are {self.n_components} components x {self.n_examples} "
                f"examples, but store {str(store.path)!r} has {p} components x {k} outputs; "
                f"they come from another experiment."
            )
        fp, mine = store.meta.get("target_fingerprint"), self.metadata.get("target_fingerprint")
        if fp and mine and fp != mine:
            raise StoreMismatchError(
                f"these attributions were fitted for model/examples/components {mine[:12]}…, but store "
                f"{str(store.path)!r} holds rows of {fp[:12]}…; they come from another experiment. "
                f"Evaluate on a store built with the same model, examples and components."
            )


def check_solver_options(solver: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`RegressionError` naming the valid options if ``options`` has one ``solver`` lacks."""
    allowed = solver_options(solver)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RegressionError(
            f"solver {solver!r} has no option(s) {unknown}; its options are {list(allowed)}. "
            f"(CLI: the flags of another solver were given; check --solver.)"
        )


def fit(
    store: Store | str | os.PathLike,
    *,
    x_name: str | None = None,
    y_name: str | None = None,
    num_train: int | None = None,
    num_val: int | None = 0,
    split_seed: int = 0,
    solver: str = "lstsq",
    target_slice: tuple[int, int] | None = None,
    device: str | None = None,
    progress: Callable[[FitProgress], None] | None = None,
    slices: int | Sequence[tuple[int, int]] | None = None,
    client: Any | None = None,
    max_targets: int | None = None,
    **solver_options: Any,
) -> Attributions:
    """Fit per-example attributions on a store's completed rows.

    Parameters
    ----------
    store
        A store or its path.
    x_name, y_name
        Mask and output arrays (inferred when the store has one of each).
    num_train, num_val
        Rows for training and validation (seeded split of completed rows by
        ``split_seed``, like the seed's ``data.num_train``/``num_val``/``seed``);
        ``num_train=None`` uses every non-validation row.
    solver
        ``"lstsq"`` (exact least squares / ridge, default), ``"saga"``
        (fast_l1's lasso path in torch) or ``"fast_l1"`` (the real package,
        CUDA only); see :mod:`coar_dask.solvers.lstsq`.
    target_slice
        ``(start, stop)``: fit only these output columns.
    device
        ``"cpu"`` (default) or ``"cuda"``.
    progress
        Called with a :class:`~coar_dask.solvers.lstsq.FitProgress` (rows streamed,
        epochs, lambdas done, slices finished) -- hook a progress bar on it.
    slices, client, max_targets
        Split the targets into ``slices`` contiguous slices (or slices of at
        most ``max_targets``) fitted separately -- as Dask tasks on ``client``
        (GPU-annotated when ``device`` is CUDA), or one after the other in
        this process without a client -- and assembled in order
        (:mod:`coar_dask.fit.distributed`). Same result as one fit.
    **solver_options
        Passed to the solver, e.g. ``ridge=1.0``, ``ridge_grid="auto"``,
        ``lr=1e-3, k=1, batch_size=2500`` (see :func:`coar_dask.solvers.lstsq`,
        :func:`coar_dask.solvers.saga.saga`).

    Returns
    -------
    Attributions
        ``weight`` (P, K) in mask units, ``bias``, ``lam`` and metadata,
        including the validation MSE and correlation per example when
        ``num_val > 0``.

    Examples
    --------
    >>> attrs = fit("store", num_val=200)          # doctest: +SKIP
    >>> attrs.save("attributions.pt")              # doctest: +SKIP
    """
    if slices is not None or client is not None or max_targets is not None:
        from coar_dask.fit.distributed import fit_distributed

        return fit_distributed(
            store, slices=slices, client=client, progress=progress, max_targets=max_targets, x_name=x_name,
            y_name=y_name, num_train=num_train, num_val=num_val, split_seed=split_seed, solver=solver,
            target_slice=target_slice, device=device, **solver_options,
        )
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    x_name, y_name = infer_names(store, x_name, y_name)
    check_solver_options(solver, solver_options)
    completed = np.flatnonzero(store.completed_rows())
    train_rows, val_rows = split_rows(completed, num_train, num_val, split_seed)
    train = StoreRows(store, train_rows, x_name, y_name, target_slice)
    val = StoreRows(store, val_rows, x_name, y_name, target_slice) if val_rows.size else None
    logger.info("fitting %s on %d train / %d val rows, %d components x %d targets",
                solver, train.n_rows, 0 if val is None else val.n_rows, train.n_features, train.n_targets)
    if progress is not None:
        outer, sl = progress, train.target_slice

        def progress(p: FitProgress) -> None:
            outer(dataclasses.replace(p, target_slice=p.target_slice or sl))

    result = get_solver(solver)(train, val, device=device, progress=progress, **solver_options)
    metadata = {
        "package_version": __version__,
        "store": str(store.path),
        "spec_sha256": store.spec.sha256,
        "experiment_fingerprint": store.experiment_fingerprint or "",
        "target_fingerprint": store.meta.get("target_fingerprint") or "",
        "x_name": x_name,
        "y_name": y_name,
        "n_train": int(train.n_rows),
        "n_val": 0 if val is None else int(val.n_rows),
        "split_seed": int(split_seed),
        "solver": solver,
        "solver_options": {k: v for k, v in solver_options.items() if isinstance(v, (int, float, str, list))},
        "target_slice": list(train.target_slice),
        "sign_convention": SIGN_CONVENTION,
        **{k: v for k, v in result.info.items() if isinstance(v, (int, float, str, list, dict))},
    }
    return Attributions(result.weight, result.bias, result.lam, metadata)


# --------------------------------------------------------------------------
# Command line (``coar-dask fit``): the flags of the solvers
# --------------------------------------------------------------------------
#: flag -> (dest, type, help, solvers it applies to, seed config alias)
_SOLVER_FLAGS: tuple[tuple[str, str, Any, str, tuple[str, ...], str | None], ...] = (
    ("--ridge", "ridge", float, "lstsq: ridge penalty (default 0: plain least squares)", ("lstsq",), None),
    ("--ridge-grid", "ridge_grid", str,
     "lstsq: choose the ridge penalty per example on the validation rows among these, e.g. 0,1,10,100 or "
     "auto (auto:N for N values)", ("lstsq",), None),
    ("--method", "method", str, "lstsq: gram (X^T X, eigh), cg (conjugate gradients, for huge P) or auto",
     ("lstsq",), None),
    ("--lr", "lr", float, "saga: step size (seed CIFAR 1e-3, ViT 5e-4)", ("saga", "fast_l1"), "--cfg.lr"),
    ("--k", "k", int, "saga: number of penalties on the lasso path (seed: 1)", ("saga", "fast_l1"), "--cfg.k"),
    ("--eps", "eps", float, "saga: smallest/largest penalty of the path (default 1e-4)", ("saga", "fast_l1"),
     "--cfg.eps"),
    ("--max-lambda", "max_lambda", str,
     "saga: largest penalty: a number, or auto (lambda_max per example); default 0 when k=1 (the seed's "
     "manual_max_lambda 0), auto otherwise", ("saga", "fast_l1"), "--cfg.manual_max_lambda"),
    ("--batch-size", "batch_size", int, "saga: rows per step (default min(rows, 2500))", ("saga", "fast_l1"),
     "--cfg.batch_size"),
    ("--early-stop-every", "early_stop_every", int, "saga: check convergence every N epochs (seed: 3)",
     ("saga", "fast_l1"), "--early_stopping.check_every"),
    ("--early-stop-eps", "early_stop_eps", float, "saga: weight-change tolerance (seed: 1e-10)",
     ("saga", "fast_l1"), "--early_stopping.eps"),
    ("--max-epochs", "max_epochs", int, "saga: epochs per stage before giving up (default 1000)", ("saga",), None),
)


def add_fit_solver_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the solver flags of ``coar-dask fit`` to ``parser``.

    ``--solver``, ``--ridge``, ``--ridge-grid``, ``--refit``, ``--method``
    (lstsq); ``--lr``, ``--k``, ``--eps``, ``--max-lambda``, ``--batch-size``,
    ``--early-stop-every``, ``--early-stop-eps``, ``--max-epochs``,
    ``--no-refit`` (saga; with the seed's ``--cfg.*`` / ``--early_stopping.*``
    spellings as aliases); ``--slices N`` and ``--max-targets M``. Every
    option defaults to ``None`` (solver default); flags the parser already
    has (e.g. ``--solver``, ``--ridge``) are left as they are. Read them back
    with :func:`solver_options_from_args`.
    """
    g = parser.add_argument_group("solver", "how the per-example regressions are solved")

    def add(*flags: str, **kwargs: Any) -> None:
        try:
            g.add_argument(*flags, **kwargs)
        except argparse.ArgumentError:
            logger.debug("parser already has %s", flags[0])

    add("--solver", choices=sorted(SOLVERS), default="lstsq",
        help="lstsq (exact least squares/ridge, default), saga (fast_l1's lasso path in torch, CPU or GPU), "
             "fast_l1 (the fast_l1 package, CUDA only)")
    for flag, dest, typ, text, _, alias in _SOLVER_FLAGS:
        add(*(f for f in (flag, alias) if f), dest=dest, type=typ, default=None, help=text)
    add("--refit", dest="refit", action="store_true", default=None,
        help="lstsq: refit on train + validation rows (after choosing penalties with --ridge-grid)")
    add("--no-refit", dest="refit", action="store_false", default=None,
        help="saga: skip the seed's refit on train + validation rows")
    add("--slices", dest="slices", type=int, default=None,
        help="split the targets into N slices fitted as separate Dask tasks (GPU tasks with --device cuda)")
    add("--max-targets", dest="max_targets", type=int, default=None,
        help="at most M targets per slice (bounds SAGA's rows x targets table per task)")


def solver_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`fit` from the flags of :func:`add_fit_solver_arguments`.

    Always ``solver``; ``slices`` and ``max_targets`` when given; and the
    solver's options whose flags were given (so ``fit(store, **options)``
    uses the solver's defaults for the rest). A flag of another solver
    (``--lr`` with lstsq) raises :class:`RegressionError` saying so.

    Examples
    --------
    >>> p = argparse.ArgumentParser(); add_fit_solver_arguments(p)
    >>> solver_options_from_args(p.parse_args(["--solver", "saga", "--cfg.lr", "1e-3", "--slices", "4"]))
    {'solver': 'saga', 'lr': 0.001, 'slices': 4}
    """
    solver = getattr(args, "solver", None) or "lstsq"
    out: dict[str, Any] = {"solver": solver}
    for flag, dest, _, _, solvers, _ in _SOLVER_FLAGS:
        value = getattr(args, dest, None)
        if value is None or (dest == "ridge" and value == 0 and solver != "lstsq"):
            continue
        if solver not in solvers:
            raise RegressionError(f"{flag} is an option of solver {' / '.join(solvers)}, not {solver!r}; "
                                  f"drop it or pass --solver {solvers[0]}.")
        if dest == "max_lambda" and value != "auto":
            try:
                value = float(value)
            except ValueError:
                raise RegressionError(f"--max-lambda must be a number or 'auto'; found {value!r}.") from None
        out[dest] = value
    refit = getattr(args, "refit", None)
    if refit is not None:
        if solver not in ("lstsq", "saga"):
            raise RegressionError(f"--refit/--no-refit are options of lstsq and saga, not {solver!r}.")
        out["refit"] = bool(refit)
    if out.get("ridge") == 0.0:  # plain least squares: the solver's default too
        del out["ridge"]
    for name in ("slices", "max_targets"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise RegressionError(f"--{name.replace('_', '-')} must be >= 1; found {value}.")
            out[name] = int(value)
    return out
