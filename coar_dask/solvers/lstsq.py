"""Solvers for the per-example linear models, over streamed row blocks.

A solver takes a *row source*: any object with ``n_rows``, ``n_features``,
``n_targets`` and ``blocks()`` yielding ``(X, Y)`` numpy blocks (X: masks as
0/1, shape (b, P); Y: outputs, shape (b, K)) -- a
:class:`~coar_dask.fit.fit.StoreRows`, a :class:`~coar_dask.formats.beton.BetonRows`
or anything shaped like them. Solvers hold one batch of rows plus their own
state, never the whole dataset, so memory does not grow with the number of
rows (SAGA's per-row gradient table is the one exception, and it is named
and sized where it is made: :mod:`coar_dask.solvers.saga`).

Registered solvers (:data:`SOLVERS`, chosen by name with :func:`get_solver`):

``lstsq`` (default)
    Exact least squares or ridge with an intercept. Streams ``X^T X`` and
    ``X^T Y`` once and solves through an eigendecomposition; when ``P`` is
    too large for a ``P x P`` matrix, conjugate gradients on the normal
    equations (one pass over the rows per iteration). The ridge penalty can
    be chosen per example on the validation rows (``ridge_grid``).
``saga``
    fast_l1's SAGA lasso path, in torch on any device (:func:`coar_dask.solvers.saga.saga`).
``fast_l1``
    The real fast_l1 package on a CUDA GPU (:func:`coar_dask.solvers.saga.fast_l1`).

Every solver has the signature ``solver(train, val=None, *, device=None,
progress=None, **options)``, returns weights in *mask units* (the prediction
for a mask ``m``, 1 = kept, is ``m @ weight + bias``) and, when validation rows
are given, reports their per-target MSE and Pearson correlation in
``info["val_mse"]`` and ``info["val_correlation"]``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from coar_dask.errors import RegressionError

__all__ = [
    "RowSource",
    "SolverResult",
    "FitProgress",
    "ProgressFn",
    "lstsq",
    "validation_metrics",
    "ridge_grid_values",
    "batch_rows_for",
    "iter_batches",
    "ConcatRows",
    "SOLVERS",
    "get_solver",
    "solver_options",
]

logger = logging.getLogger(__name__)

#: Default size of one batch of rows handed to the BLAS (X and Y, float32).
_BATCH_BYTES = 16 * 2**20
#: Largest ``P x P`` float64 matrix the ``lstsq`` Gram method forms by default;
#: above it, ``method="auto"`` uses conjugate gradients.
MAX_GRAM_BYTES = 4 * 2**30


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


def _report(progress: ProgressFn | None, stage: str, done: int, total: int | None, detail: str = "") -> None:
    if progress is not None:
        progress(FitProgress(stage=stage, done=int(done), total=total, detail=detail))


#: Below this many flops per batch, CPU work runs on one thread. Measured on
#: 2 busy cores: a SAGA step of 6e6 flops (50 x 80 x 360) ran 50x faster on one
#: thread than on two (OpenMP barriers stall when the cores are shared).
_SMALL_STEP_FLOPS = 1e8


@contextlib.contextmanager
def _threads_for(flops_per_step: float, dev: Any) -> Iterator[None]:
    """One torch thread for tiny steps on CPU: thread wake-ups and barriers cost
    more than they save there (a hundredfold on a busy machine)."""
    import torch

    if dev.type != "cpu" or flops_per_step >= _SMALL_STEP_FLOPS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(device: Any):
    import torch

    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RegressionError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu.")
    return dev


# --------------------------------------------------------------------------
# Streaming rows
# --------------------------------------------------------------------------
def batch_rows_for(n_features: int, n_targets: int, batch_bytes: int = _BATCH_BYTES) -> int:
    """Rows per batch so that a float32 batch of X and Y takes about ``batch_bytes``.

    >>> batch_rows_for(2304, 1000)
    1269
    """
    row = 4 * (int(n_features) + int(n_targets))
    return int(max(64, batch_bytes // max(row, 1)))


def _rebatch(blocks: Iterable[tuple[np.ndarray, np.ndarray]], rows: int, pool: int = 0
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup consecutive blocks into batches of exactly ``rows`` rows (the last may be smaller).

    A row source's blocks are a store's chunks (often 100 rows); the BLAS is
    much faster on thousands. With ``pool > 0`` the batches are written into
    ``pool`` preallocated buffers used in turn, so streaming allocates nothing
    once they exist (fresh ~30 MB arrays per batch fragment the heap, and the
    process's memory creeps up with the number of rows); a batch is then only
    valid until ``pool - 1`` further batches have been drawn.
    """
    buffers: list[tuple[np.ndarray, np.ndarray]] = []
    drawn = 0
    cur: tuple[np.ndarray, np.ndarray] | None = None
    fill = 0
    for x, y in blocks:
        x, y = np.asarray(x), np.asarray(y)
        if x.shape[0] != y.shape[0]:
            raise RegressionError(f"a row block has {x.shape[0]} rows of X but {y.shape[0]} of Y.")
        start = 0
        while start < x.shape[0]:
            if cur is None:
                if pool and len(buffers) == pool:
                    cur = buffers[drawn % pool]
                else:
                    cur = (np.empty((rows, *x.shape[1:]), x.dtype), np.empty((rows, *y.shape[1:]), y.dtype))
                    if pool:
                        buffers.append(cur)
                fill = 0
            take = min(rows - fill, x.shape[0] - start)
            cur[0][fill : fill + take] = x[start : start + take]
            cur[1][fill : fill + take] = y[start : start + take]
            fill += take
            start += take
            if fill == rows:
                yield cur
                drawn += 1
                cur = None
    if cur is not None and fill:
        yield cur[0][:fill], cur[1][:fill]


_DONE = object()


def _prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a thread, ``depth`` items ahead, so that reading and
    decompressing the next batch overlaps the BLAS work on this one.

    Memory: at most ``depth + 1`` items alive. Exceptions in the reader are
    re-raised here; closing this generator stops the reader.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=work, name="coar-dask-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


_PREFETCH_DEPTH = 1


def iter_batches(source: RowSource, rows: int | None = None, *, prefetch: bool = True, reuse: bool = False
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(X, Y)`` batches of ``source`` of ``rows`` rows each, read ahead in a thread.

    Checks that the blocks have the source's widths and finite targets. With
    ``reuse=True`` the batches live in a few recycled buffers: use each batch
    before drawing the next (memory then stays flat however many rows).
    """
    P, K = int(source.n_features), int(source.n_targets)
    rows = rows or batch_rows_for(P, K)
    # Buffers alive at once: the consumer's, the queue's, and the one being filled.
    pool = _PREFETCH_DEPTH + 3 if reuse else 0

    def checked() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in _rebatch(source.blocks(), rows, pool):
            x = x.reshape(x.shape[0], -1)
            y = y.reshape(y.shape[0], -1)
            if x.shape[1] != P or y.shape[1] != K:
                raise RegressionError(
                    f"the row source said {P} features x {K} targets but yielded blocks of "
                    f"{x.shape[1]} x {y.shape[1]}; it is inconsistent."
                )
            if not np.isfinite(y).all():
                raise RegressionError(
                    "the regression targets contain NaN or inf; run `coar-dask verify` on the store "
                    "and rebuild the affected blocks."
                )
            yield x, y

    it = checked()
    return _prefetch(it, _PREFETCH_DEPTH) if prefetch else it


class ConcatRows:
    """The rows of several row sources, one after the other (e.g. train + validation).

    Examples
    --------
    >>> both = ConcatRows(train, val)    # doctest: +SKIP
    """

    def __init__(self, *sources: RowSource):
        sources = tuple(s for s in sources if s is not None and s.n_rows > 0)
        if not sources:
            raise RegressionError("ConcatRows needs at least one row source with rows.")
        p, k = sources[0].n_features, sources[0].n_targets
        if any(s.n_features != p or s.n_targets != k for s in sources):
            raise RegressionError("ConcatRows: the row sources have different numbers of features or targets.")
        self.sources = sources
        self.n_rows = int(sum(s.n_rows for s in sources))
        self.n_features = int(p)
        self.n_targets = int(k)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in self.sources:
            yield from s.blocks()


# --------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------
def _compute_dtype(x: np.ndarray) -> np.dtype:
    # Masks are 0/1, so float32 products of a batch are exact counts; float64
    # input is kept float64 (and accumulations are float64 either way).
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


class _Moments:
    """Streamed sums of a row source: n, sum x, sum y, sum y^2, X^T Y and
    either X^T X (``gram=True``) or its diagonal, accumulated in float64.

    On CPU the Gram matrix comes from BLAS ``syrk`` (half the work of a
    general product); on CUDA from torch.
    """

    def __init__(self, P: int, K: int, dev: Any, *, gram: bool, xy: bool = True, precise: bool = False):
        import torch

        self.dev = dev
        self.gram = gram
        self.precise = precise
        self.n = 0
        f64 = dict(dtype=torch.float64, device=dev)
        self.sx = torch.zeros(P, **f64)
        self.sy = torch.zeros(K, **f64)
        self.syy = torch.zeros(K, **f64)
        self.xx = torch.zeros(P, P, **f64) if gram else None
        self.dxx = torch.zeros(P, **f64)
        self.xy = torch.zeros(P, K, **f64) if xy else None
        self.dtype: np.dtype | None = None
        self._buffers: dict[Any, Any] = {}

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        import torch

        dt = np.dtype(np.float64) if self.precise else _compute_dtype(x)
        self.dtype = dt if self.dtype is None else np.promote_types(self.dtype, dt)
        x = np.ascontiguousarray(x, dtype=dt)
        y = np.ascontiguousarray(y, dtype=dt)
        self.n += x.shape[0]
        xt = torch.from_numpy(x).to(self.dev)
        yt = torch.from_numpy(y).to(self.dev)
        # Per-batch sums in the batch's precision (exact for 0/1 masks), accumulated in float64;
        # products go to reused scratch buffers, so a batch allocates nothing large.
        self.sx += xt.sum(0).double()
        self.sy += yt.sum(0).double()
        self.syy += torch.mul(yt, yt, out=self._scratch("yy", tuple(yt.shape), yt.dtype)).sum(0).double()
        if not self.gram:
            self.dxx += torch.mul(xt, xt, out=self._scratch("xsq", tuple(xt.shape), xt.dtype)).sum(0).double()
        if self.xy is not None:
            self.xy += torch.mm(xt.T, yt, out=self._scratch("xy", (xt.shape[1], yt.shape[1]), xt.dtype))
        if self.gram:
            if self.dev.type == "cpu":
                from scipy.linalg import blas

                syrk = blas.dsyrk if dt == np.float64 else blas.ssyrk
                c = self._scratch("xx", (x.shape[1], x.shape[1]), xt.dtype, fortran=True).numpy().T
                # x.T is Fortran-ordered, so syrk reads it without a copy and writes into c.
                upper = syrk(1.0, x.T, beta=0.0, c=c, trans=0, lower=0, overwrite_c=1)
                self.xx += torch.from_numpy(upper)
            else:
                self.xx += torch.mm(xt.T, xt, out=self._scratch("xx", (xt.shape[1], xt.shape[1]), xt.dtype))

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: Any, fortran: bool = False):
        import torch

        key = (name, dtype)
        buf = self._buffers.get(key)
        want = shape[::-1] if fortran else shape
        if buf is not None and tuple(buf.shape) != tuple(want):
            if name in ("yy", "xsq") and buf.shape[0] >= want[0] and tuple(buf.shape[1:]) == tuple(want[1:]):
                return buf[: want[0]]  # the last, shorter batch
            buf = None
        if buf is None:
            # A Fortran-ordered matrix is the transpose of a C-ordered one.
            buf = torch.empty(want, dtype=dtype, device=self.dev)
            self._buffers[key] = buf
        return buf

    def add(self, other: "_Moments") -> "_Moments":
        """Sums of both (e.g. train + validation)."""
        out = _Moments.__new__(_Moments)
        out.dev, out.gram, out.dtype, out.precise = self.dev, self.gram and other.gram, self.dtype, False
        out.n = self.n + other.n
        out._buffers = {}
        for name in ("sx", "sy", "syy", "dxx"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.xx = self.xx + other.xx if out.gram else None
        out.xy = self.xy + other.xy if self.xy is not None and other.xy is not None else None
        return out

    def full_gram(self):
        """X^T X as a full symmetric matrix (the CPU path accumulates the upper triangle)."""
        import torch

        if self.dev.type == "cpu":
            full = torch.triu(self.xx)
            full += torch.triu(self.xx, 1).T
            return full
        return self.xx.clone()

    def means(self):
        return self.sx / self.n, self.sy / self.n

    def centred(self):
        """Centred Gram ``sum (x - mx)(x - mx)^T`` and cross moments ``sum (x - mx)(y - my)^T``."""
        mx, my = self.means()
        cxx = self.full_gram()
        cxx.addr_(mx, mx, alpha=-self.n)
        cxy = self.xy.clone()
        cxy.addr_(mx, my, alpha=-self.n)
        return cxx, cxy


def _stream_moments(
    source: RowSource, dev: Any, *, gram: bool, rows: int | None, progress: ProgressFn | None, stage: str = "moments",
    precise: bool = False,
) -> _Moments:
    """Moments of ``source``; ``precise=True`` computes every product in float64 (for validation
    rows, whose MSE comes out of a cancellation of much larger sums)."""
    m = _Moments(source.n_features, source.n_targets, dev, gram=gram, precise=precise)
    total = int(source.n_rows)
    for x, y in iter_batches(source, rows, reuse=True):
        m.update(x, y)
        _report(progress, stage, m.n, total, f"{m.n}/{total} rows")
    if m.n == 0:
        raise RegressionError("no rows to fit on: the store has no completed rows in the chosen split.")
    return m


# --------------------------------------------------------------------------
# lstsq
# --------------------------------------------------------------------------
def ridge_grid_values(grid: Any, scale: float = 1.0) -> list[float] | None:
    """Normalise a ridge grid: ``None``; a sequence of penalties; a string
    ``"0,1,10"``; or ``"auto"`` / ``"auto:N"`` (0 and N penalties, default 12,
    log-spaced from 1e-4 to 10 times ``scale``, the mean variance sum of a
    feature). Returned sorted from largest to smallest, so that ties between
    penalties are won by the larger one.

    >>> ridge_grid_values("0, 10, 1")
    [10.0, 1.0, 0.0]
    >>> len(ridge_grid_values("auto:5", scale=100.0))
    6
    """
    if grid is None:
        return None
    if isinstance(grid, str):
        text = grid.strip().lower()
        if text.startswith("auto"):
            count = 12
            if ":" in text:
                try:
                    count = int(text.split(":", 1)[1])
                except ValueError:
                    count = -1
            if count < 1:
                raise RegressionError(f"ridge grid {grid!r}: write 'auto' or 'auto:N' with N >= 1, e.g. 'auto:12'.")
            values = [0.0, *(float(scale) * np.logspace(-4, 1, count))]
        else:
            try:
                values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
            except ValueError:
                raise RegressionError(
                    f"ridge grid {grid!r} is not a list of numbers; write e.g. '0,1,10,100' or 'auto'."
                ) from None
    else:
        values = [float(v) for v in np.atleast_1d(np.asarray(grid, dtype=np.float64))]
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise RegressionError(f"ridge grid {grid!r} must hold one or more finite penalties >= 0.")
    return sorted(set(values), reverse=True)


def lstsq(
    train: RowSource,
    val: RowSource | None = None,
    *,
    ridge: float = 0.0,
    ridge_grid: Sequence[float] | str | None = None,
    refit: bool = False,
    method: str = "auto",
    device: Any = None,
    rcond: float = 1e-10,
    cg_tol: float | None = None,
    cg_max_iter: int = 500,
    max_gram_bytes: int = MAX_GRAM_BYTES,
    batch_rows: int | None = None,
    progress: ProgressFn | None = None,
) -> SolverResult:
    """Exact least squares (or ridge) with an intercept, streamed over row blocks.

    Solves ``min_{w,b} ||Y - X w - b||^2 + lam ||w||^2`` for each target column
    (the intercept is not penalised).

    Parameters
    ----------
    train, val
        Row sources (see :class:`RowSource`). ``val`` is only read for the
        validation metrics and the choice of the penalty.
    ridge
        The penalty ``lam`` for every target (0: plain least squares).
    ridge_grid
        Choose ``lam`` per target among these values by validation MSE
        (needs ``val``): a sequence, ``"0,1,10"``, or ``"auto"``/``"auto:N"``
        (see :func:`ridge_grid_values`). Overrides ``ridge``.
    refit
        After choosing the penalties, fit again on train + validation rows.
        The reported validation metrics stay those of the train-only fit.
    method
        ``"gram"``: accumulate ``X^T X`` (``P x P``, float64) and ``X^T Y`` in
        one pass and solve through an eigendecomposition; rank-deficient
        designs (a component never ablated in the sample) get the minimum-norm
        solution. Costs O(n P^2 + n P K) time, O(P^2 + P K) memory.
        ``"cg"``: Jacobi-preconditioned conjugate gradients on the normal
        equations, all targets at once; one pass over the rows per iteration,
        O(P K) memory. ``"auto"``: ``"gram"`` when a ``P x P`` float64 matrix
        fits in ``max_gram_bytes``.
    device
        ``"cpu"`` (default) or ``"cuda"``: where the products and the solve run.
    rcond
        Eigenvalues below ``rcond`` times the largest are treated as zero.
    cg_tol, cg_max_iter
        Conjugate gradients stop when every target's residual norm is below
        ``cg_tol`` times its right-hand side's (default 1e-10 for float64
        rows, 1e-6 for float32), or after ``cg_max_iter`` iterations.
    batch_rows
        Rows per BLAS batch (default: about 16 MiB of rows).
    progress
        Called with a :class:`FitProgress` per batch, CG iteration or grid value.

    Returns
    -------
    SolverResult
        ``weight`` (P, K) in mask units, ``bias`` (K,), ``lam`` (K,) the
        penalties used; ``info`` holds ``val_mse`` and ``val_correlation``
        when ``val`` has rows.

    Examples
    --------
    >>> result = lstsq(train_rows, val_rows, ridge_grid="auto")   # doctest: +SKIP
    >>> result.lam[:3], np.mean(result.info["val_correlation"])    # doctest: +SKIP
    """
    if ridge < 0 or not np.isfinite(ridge):
        raise RegressionError(f"ridge must be a finite number >= 0; found {ridge}.")
    if method not in ("auto", "gram", "cg"):
        raise RegressionError(f"method must be 'auto', 'gram' or 'cg'; found {method!r}.")
    if cg_max_iter < 1:
        raise RegressionError(f"cg_max_iter must be >= 1; found {cg_max_iter}.")
    has_val = val is not None and val.n_rows > 0
    if ridge_grid is not None and not has_val:
        raise RegressionError(
            "choosing the ridge penalty (ridge_grid) needs validation rows; pass num_val > 0 (CLI: --num-val N)."
        )
    if refit and not has_val:
        raise RegressionError("refit=True refits on train + validation rows; pass num_val > 0 (CLI: --num-val N).")
    dev = _device(device)
    P = int(train.n_features)
    if method == "auto":
        method = "gram" if P * P * 8 <= max_gram_bytes else "cg"
    if method == "cg" and refit and ridge_grid is None:
        ridge_grid = [float(ridge)]  # one candidate: the grid path does the refit
    logger.info("lstsq (%s) on %d rows x %d features -> %d targets, device %s",
                method, train.n_rows, P, train.n_targets, dev)
    solve = _lstsq_gram if method == "gram" else _lstsq_cg
    K = int(train.n_targets)
    step = 2.0 * min(int(train.n_rows), batch_rows or batch_rows_for(P, K)) * P * (P + K)
    with _threads_for(step, dev):
        return solve(train, val if has_val else None, ridge=float(ridge), ridge_grid=ridge_grid, refit=refit,
                     dev=dev, rcond=rcond, cg_tol=cg_tol, cg_max_iter=int(cg_max_iter), rows=batch_rows,
                     progress=progress)


def _moment_metrics(vm: "_Moments", weight, bias) -> dict[str, Any]:
    """Validation MSE and Pearson correlation of ``x @ weight + bias`` from validation moments
    (no pass over the rows): with ``p = x w + b``, ``sum p = sx.w + n b``, ``sum p^2 =
    diag(w^T XX w) + 2 b sx.w + n b^2`` and ``sum p y = diag(w^T XY) + b sy``."""
    import torch

    n = vm.n
    w, b = weight.double(), bias.double()
    xw = vm.sx @ w
    ww = (w * (vm.full_gram() @ w)).sum(0)
    sp = xw + n * b
    spp = ww + 2 * b * xw + n * b**2
    spa = (w * vm.xy).sum(0) + b * vm.sy
    mse = (vm.syy - 2 * spa + spp) / n
    cov = spa / n - (sp / n) * (vm.sy / n)
    vp = torch.clamp(spp / n - (sp / n) ** 2, min=0)
    va = torch.clamp(vm.syy / n - (vm.sy / n) ** 2, min=0)
    corr = torch.clamp(cov / torch.sqrt(vp * va), -1, 1)
    return {"val_mse": torch.clamp(mse, min=0).cpu().tolist(), "val_correlation": corr.cpu().tolist()}


def _finish(weight, bias, lam, info: dict[str, Any], val: RowSource | None, pre_refit: SolverResult | None = None,
            rows: int | None = None, dtype: np.dtype | None = None, metrics: dict[str, Any] | None = None
            ) -> SolverResult:
    # float32 like the seed's files, unless the rows themselves were float64.
    dt = np.float64 if dtype == np.float64 else np.float32
    result = SolverResult(
        weight=np.ascontiguousarray(weight.cpu().numpy(), dtype=dt),
        bias=np.ascontiguousarray(bias.cpu().numpy(), dtype=dt),
        lam=np.ascontiguousarray(lam.cpu().numpy(), dtype=np.float32),
        info=info,
    )
    if metrics is not None:
        result.info.update(metrics)
    elif val is not None:
        result.info.update(validation_metrics(pre_refit or result, val, rows=rows))
    return result


def _eigh(cxx):
    """Eigendecomposition of the centred Gram matrix; small ones on one thread (see :data:`_SMALL_STEP_FLOPS`)."""
    import torch

    with _threads_for(float(cxx.shape[0]) ** 3, cxx.device):
        return torch.linalg.eigh(cxx)


def _eig_weights(evals, evecs, C, lam, rcond: float):
    """``V diag(1/(e + lam)) C`` with ``lam`` a scalar, treating tiny ``e + lam`` as zero."""
    import torch

    d = evals + lam
    tol = rcond * max(float(evals.abs().max()), 1e-300)
    inv = torch.where(d > tol, 1.0 / d, torch.zeros_like(d))
    return evecs @ (inv[:, None] * C)


#: Cholesky is trusted when its smallest pivot (squared) is at least this
#: fraction of the largest; otherwise the eigendecomposition decides the rank.
_CHOLESKY_PIVOT_RATIO = 1e-8


def _direct_solve(cxx, cxy, lam: float, rcond: float):
    """``(cxx + lam I)^-1 cxy`` by Cholesky, about 25x cheaper than an eigendecomposition.

    Zero-variance features (a component never ablated in the sample) are
    left out and get zero weight, as the minimum-norm solution gives them.
    When what remains is singular or ill-conditioned, falls back to the
    eigendecomposition's minimum-norm solution.

    Returns ``(weights, rank, how)``.
    """
    import torch

    diag = torch.diagonal(cxx)
    keep = diag > rcond * max(float(diag.max()), 1e-300)
    idx = torch.nonzero(keep).flatten()
    A = cxx.clone() if bool(keep.all()) else cxx[idx][:, idx]
    A.diagonal().add_(lam)
    with _threads_for(float(A.shape[0]) ** 3, A.device):
        L, err = torch.linalg.cholesky_ex(A)
    if int(err) == 0 and idx.numel():
        piv = torch.diagonal(L) ** 2
        if float(piv.min()) >= _CHOLESKY_PIVOT_RATIO * float(piv.max()):
            w = torch.zeros_like(cxy)
            w[idx] = torch.cholesky_solve(cxy[idx], L)
            return w, int(idx.numel()), "cholesky"
    del L, A
    evals, evecs = _eigh(cxx)
    tol = rcond * max(float(evals.abs().max()), 1e-300)
    w = _eig_weights(evals, evecs, evecs.T @ cxy, lam, rcond)
    return w, int((evals + lam > tol).sum()), "eigh"


def _lstsq_gram(train, val, *, ridge, ridge_grid, refit, dev, rcond, rows, progress, **_: Any) -> SolverResult:
    import torch

    K = train.n_targets
    tm = _stream_moments(train, dev, gram=True, rows=rows, progress=progress)
    vm = None
    if ridge_grid is not None or refit:
        vm = _stream_moments(val, dev, gram=True, rows=rows, progress=progress, stage="moments (validation)",
                             precise=True)
    mx, my = tm.means()
    cxx, cxy = tm.centred()
    info: dict[str, Any] = {"solver": "lstsq", "method": "gram", "n_train": tm.n, "refit": bool(refit)}
    if ridge_grid is None:
        lam = torch.full((K,), ridge, dtype=torch.float64, device=dev)
        w, info["rank"], info["factorization"] = _direct_solve(cxx, cxy, ridge, rcond)
        del cxx
        b = my - mx @ w
        if not refit:
            return _finish(w, b, lam, info, val, rows=rows, dtype=tm.dtype)
        choice, grid = torch.zeros(K, dtype=torch.long, device=dev), [float(ridge)]
    else:
        evals, evecs = _eigh(cxx)
        del cxx
        C = evecs.T @ cxy
        tol = rcond * max(float(evals.abs().max()), 1e-300)
        info["rank"], info["factorization"] = int((evals > tol).sum()), "eigh"
        scale = float(torch.clamp(evals, min=0).sum()) / max(train.n_features, 1)
        grid = ridge_grid_values(ridge_grid, scale)
        mse = _grid_mse(tm, vm, evals, evecs, C, grid, rcond, progress)  # (L, K)
        choice = torch.argmin(mse, dim=0)  # grid is descending: ties go to the larger penalty
        lam = torch.tensor(grid, dtype=torch.float64, device=dev)[choice]
        w = torch.empty_like(C)
        for i, value in enumerate(grid):
            cols = torch.nonzero(choice == i).flatten()
            if cols.numel():
                w[:, cols] = _eig_weights(evals, evecs, C[:, cols], value, rcond)
        del evals, evecs, C
        b = my - mx @ w
        info["ridge_grid"] = list(grid)
        if not refit:
            return _finish(w, b, lam, info, val, rows=rows, dtype=tm.dtype, metrics=_moment_metrics(vm, w, b))
    metrics = _moment_metrics(vm, w, b)  # of the train-only fit: held out
    both = tm.add(vm)
    del tm, vm
    mx, my = both.means()
    cxx, cxy = both.centred()
    for i, value in enumerate(grid):  # one factorization per penalty that some target chose
        cols = torch.nonzero(choice == i).flatten()
        if cols.numel():
            w[:, cols] = _direct_solve(cxx, cxy[:, cols], value, rcond)[0]
    b = my - mx @ w
    info["n_refit"] = both.n
    return _finish(w, b, lam, info, val, rows=rows, dtype=both.dtype, metrics=metrics)


def _grid_mse(tm: _Moments, vm: _Moments, evals, evecs, C, grid: list[float], rcond: float,
              progress: ProgressFn | None):
    """Validation MSE ``(len(grid), K)`` of the train fits at each penalty, from moments alone.

    With ``e = y - x w - b`` and ``b = my - mx w`` (train means), ``e = y' - x' w``
    where ``'`` centres at the train means; so ``sum e^2 = sum y'^2 -
    2 diag(w^T X'^T Y') + diag(w^T X'^T X' w)``, and in the eigenbasis
    ``w = V s`` the last two need ``V^T X'^T Y'`` and ``V^T X'^T X' V`` once.
    """
    import torch

    mx, my = tm.means()
    n = vm.n
    xx = vm.full_gram() - torch.outer(vm.sx, mx) - torch.outer(mx, vm.sx) + n * torch.outer(mx, mx)
    xy = vm.xy - torch.outer(vm.sx, my) - torch.outer(mx, vm.sy) + n * torch.outer(mx, my)
    yy = vm.syy - 2 * my * vm.sy + n * my**2
    M = evecs.T @ xx @ evecs
    D = evecs.T @ xy
    del xx, xy
    out = torch.empty(len(grid), C.shape[1], dtype=torch.float64, device=C.device)
    tol = rcond * max(float(evals.abs().max()), 1e-300)
    for i, value in enumerate(grid):
        d = evals + value
        s = torch.where(d > tol, 1.0 / d, torch.zeros_like(d))[:, None] * C
        out[i] = (yy - 2 * (s * D).sum(0) + (s * (M @ s)).sum(0)) / n
        _report(progress, "ridge", i + 1, len(grid), f"penalty {value:.3g}")
    return out


def _cg_tolerance(cg_tol: float | None, dtype: np.dtype | None) -> float:
    if cg_tol is not None:
        if not cg_tol > 0:
            raise RegressionError(f"cg_tol must be > 0; found {cg_tol}.")
        return float(cg_tol)
    return 1e-10 if dtype == np.float64 else 1e-6


class _NormalOperator:
    """``A V = Xc^T Xc V + lam V`` (``Xc``: X centred at the train means), one pass over the rows per call."""

    def __init__(self, source: RowSource, m: _Moments, dev: Any, rows: int | None):
        self.source, self.m, self.dev, self.rows = source, m, dev, rows
        self.mx = m.sx / m.n
        self.passes = 0

    def __call__(self, V, lam):
        import torch

        acc = torch.zeros_like(V)
        for x, _ in iter_batches(self.source, self.rows, reuse=True):
            dt = _compute_dtype(x)
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=dt)).to(self.dev)
            tdt = torch.float64 if dt == np.float64 else torch.float32
            acc += (xt.T @ (xt @ V.to(tdt))).double()
        self.passes += 1
        return acc - self.m.n * torch.outer(self.mx, self.mx @ V) + lam * V


def _cg(op: _NormalOperator, rhs, lam, diag, x0, tol: float, max_iter: int, progress: ProgressFn | None,
        label: str = ""):
    """Jacobi-preconditioned conjugate gradients, one independent system per column.

    ``lam`` is a per-column penalty ``(K,)``; features with zero variance
    (``diag == 0``) are held at zero.
    """
    import torch

    keep = diag > 0
    minv = torch.where(keep, 1.0 / torch.where(keep, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    pre = lambda r: minv[:, None] * r / (1.0 + lam[None, :] * minv[:, None])  # noqa: E731 - Jacobi of diag + lam
    x = x0.clone() * keep[:, None]
    r = rhs * keep[:, None] - (op(x, lam) * keep[:, None] if bool(x.abs().max() > 0) else 0)
    z = pre(r)
    p = z.clone()
    rz = (r * z).sum(0)
    bnorm = torch.linalg.vector_norm(rhs, dim=0)
    bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    it = 0
    for it in range(1, max_iter + 1):
        rel = torch.linalg.vector_norm(r, dim=0) / bnorm
        active = rel > tol
        if not bool(active.any()):
            it -= 1
            break
        ap = op(p, lam) * keep[:, None]
        pap = (p * ap).sum(0)
        ok = active & (pap > 0)
        alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x += alpha * p
        r -= alpha * ap
        z = pre(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(ok & (rz > 0), rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
        _report(progress, "cg", it, max_iter, f"{label}max rel. residual {float(rel.max()):.2e}")
    rel = torch.linalg.vector_norm(r, dim=0) / bnorm
    return x, it, rel


def _lstsq_cg(train, val, *, ridge, ridge_grid, refit, dev, cg_tol, cg_max_iter, rows, progress, **_: Any) -> SolverResult:
    import torch

    tm = _stream_moments(train, dev, gram=False, rows=rows, progress=progress)
    mx, my = tm.means()
    cxy = tm.xy - tm.n * torch.outer(mx, my)
    diag = torch.clamp(tm.dxx - tm.n * mx**2, min=0)
    diag = torch.where(diag > 1e-12 * max(float(diag.max()), 1e-300), diag, torch.zeros_like(diag))
    tol = _cg_tolerance(cg_tol, tm.dtype)
    op = _NormalOperator(train, tm, dev, rows)
    K = train.n_targets
    info: dict[str, Any] = {"solver": "lstsq", "method": "cg", "n_train": tm.n, "cg_tol": tol}
    zeros = torch.zeros_like(cxy)
    if ridge_grid is None:
        lam = torch.full((K,), ridge, dtype=torch.float64, device=dev)
        w, iters, rel = _cg(op, cxy, lam, diag, zeros, tol, cg_max_iter, progress)
        _cg_log(info, iters, rel, tol)
        return _finish(w, my - mx @ w, lam, info, val, rows=rows, dtype=tm.dtype)

    grid = ridge_grid_values(ridge_grid, float(diag.mean()))
    best_mse = torch.full((K,), float("inf"), dtype=torch.float64, device=dev)
    best_w = zeros.clone()
    lam = torch.zeros(K, dtype=torch.float64, device=dev)
    w = zeros
    total_iters, worst = 0, 0.0
    for i, value in enumerate(grid):  # descending: warm starts go from smooth to rough
        lam_i = torch.full((K,), value, dtype=torch.float64, device=dev)
        w, iters, rel = _cg(op, cxy, lam_i, diag, w, tol, cg_max_iter, progress, f"penalty {value:.3g}, ")
        total_iters += iters
        worst = max(worst, float(rel.max()))
        b = my - mx @ w
        mse = torch.from_numpy(np.asarray(_stream_mse(w, b, val, rows))).to(dev)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        lam = torch.where(better, lam_i, lam)
        best_w[:, better] = w[:, better]
        _report(progress, "ridge", i + 1, len(grid), f"penalty {value:.3g}")
    info.update(ridge_grid=list(grid), refit=bool(refit))
    w = best_w
    b = my - mx @ w
    _cg_log(info, total_iters, torch.tensor([worst]), tol)
    if not refit:
        return _finish(w, b, lam, info, val, rows=rows, dtype=tm.dtype)
    pre = SolverResult(w.float().cpu().numpy(), b.float().cpu().numpy(), lam.float().cpu().numpy())
    both_src = ConcatRows(train, val)
    both = _stream_moments(both_src, dev, gram=False, rows=rows, progress=progress, stage="moments (refit)")
    mx, my = both.means()
    cxy = both.xy - both.n * torch.outer(mx, my)
    diag = torch.clamp(both.dxx - both.n * mx**2, min=0)
    w, iters, rel = _cg(_NormalOperator(both_src, both, dev, rows), cxy, lam, diag, w, tol, cg_max_iter, progress,
                        "refit, ")
    info["n_refit"] = both.n
    info["cg_iterations"] += iters
    return _finish(w, my - mx @ w, lam, info, val, pre_refit=pre, rows=rows, dtype=both.dtype)


def _cg_log(info: dict[str, Any], iters: int, rel, tol: float) -> None:
    worst = float(rel.max()) if rel.numel() else 0.0
    info["cg_iterations"] = int(iters)
    info["cg_max_residual"] = worst
    if worst > tol:
        logger.warning(
            "conjugate gradients stopped after %d iterations at relative residual %.2e > tolerance %.1e; "
            "raise cg_max_iter or use method='gram' when P x P fits in memory", iters, worst, tol)


def _stream_mse(weight, bias, val: RowSource, rows: int | None) -> np.ndarray:
    w = weight.double().cpu().numpy()
    b = bias.double().cpu().numpy()
    sq = np.zeros(w.shape[1])
    n = 0
    for x, y in iter_batches(val, rows, reuse=True):
        err = np.asarray(x, dtype=np.float64) @ w + b - y
        sq += (err * err).sum(0)
        n += x.shape[0]
    return sq / max(n, 1)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------
def validation_metrics(result: SolverResult, val: RowSource, rows: int | None = None) -> dict[str, Any]:
    """Per-target validation MSE and Pearson correlation, streamed over ``val``.

    Returns ``{"val_mse": [...], "val_correlation": [...]}`` (lists of K floats).
    """
    stats = _PearsonAccumulator(val.n_targets)
    sq = np.zeros(val.n_targets)
    w = result.weight.astype(np.float64)
    for X, Y in iter_batches(val, rows, reuse=True):
        # float64: the MSE is a small difference of large numbers when the fit is good.
        pred = np.asarray(X, dtype=np.float64) @ w + result.bias
        actual = np.asarray(Y, dtype=np.float64)
        stats.update(pred, actual)
        err = pred - actual
        sq += np.einsum("ij,ij->j", err, err, dtype=np.float64)
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
        self.sp += pred.sum(0, dtype=np.float64)
        self.sa += actual.sum(0, dtype=np.float64)
        self.spp += np.einsum("ij,ij->j", pred, pred, dtype=np.float64)
        self.saa += np.einsum("ij,ij->j", actual, actual, dtype=np.float64)
        self.spa += np.einsum("ij,ij->j", pred, actual, dtype=np.float64)

    def result(self) -> np.ndarray:
        n = max(self.n, 1)
        cov = self.spa / n - (self.sp / n) * (self.sa / n)
        vp = self.spp / n - (self.sp / n) ** 2
        va = self.saa / n - (self.sa / n) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / np.sqrt(np.clip(vp, 0, None) * np.clip(va, 0, None))
        return np.clip(r, -1.0, 1.0)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------
def _saga(*args: Any, **kwargs: Any) -> SolverResult:
    from coar_dask.solvers.saga import saga

    return saga(*args, **kwargs)


def _fast_l1(*args: Any, **kwargs: Any) -> SolverResult:
    from coar_dask.solvers.saga import fast_l1

    return fast_l1(*args, **kwargs)


_saga.__doc__ = "fast_l1's SAGA lasso path in torch; see :func:`coar_dask.solvers.saga.saga`."
_fast_l1.__doc__ = "The fast_l1 package on a CUDA GPU; see :func:`coar_dask.solvers.saga.fast_l1`."

SOLVERS: dict[str, Callable[..., SolverResult]] = {"lstsq": lstsq, "saga": _saga, "fast_l1": _fast_l1}


def get_solver(name: str) -> Callable[..., SolverResult]:
    """The solver registered under ``name``."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise RegressionError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}.") from None


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options solver ``name`` accepts (besides ``device`` and ``progress``)."""
    import inspect

    if name == "saga" or name == "fast_l1":
        from coar_dask.solvers import saga as _saga_module

        fn = getattr(_saga_module, name)
    else:
        fn = get_solver(name)
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("device", "progress"))
