"""Streaming rows into solvers: batches, read-ahead, concatenation, moments, correlation.

Solvers hold one batch of rows plus their own state, never the whole dataset,
so memory does not grow with the number of rows. Everything here is public
so that every solver (and :mod:`coar_dask.fit.evaluate`) uses the same
streaming and the same statistics.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

import numpy as np

from coar_dask.errors import RegressionError
from coar_dask.solvers.base import ProgressFn, RowSource, SolverResult, report

__all__ = [
    "full_precision",
    "BATCH_BYTES",
    "PREFETCH_DEPTH",
    "batch_rows_for",
    "rebatch",
    "prefetch",
    "iter_batches",
    "ConcatRows",
    "compute_dtype",
    "Moments",
    "stream_moments",
    "first_batch_shift",
    "add_states",
    "PrecomputedRows",
    "PearsonAccumulator",
    "NO_VARIANCE_RTOL",
    "pearson_from_sums",
    "pearson_centred",
    "no_variance",
    "correlation_summary",
    "validation_metrics",
    "EpochRows",
]

#: Default size of one batch of rows handed to the BLAS (X and Y, float32).
BATCH_BYTES = 16 * 2**20


def batch_rows_for(n_features: int, n_targets: int, batch_bytes: int = BATCH_BYTES) -> int:
    """Rows per batch so that a float32 batch of X and Y takes about ``batch_bytes``.

    >>> batch_rows_for(2304, 1000)
    1269
    """
    row = 4 * (int(n_features) + int(n_targets))
    return int(max(64, batch_bytes // max(row, 1)))


def rebatch(blocks: Iterable[tuple[np.ndarray, np.ndarray]], rows: int, pool: int = 0
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


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
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


_read_ahead = prefetch  # iter_batches' keyword ``prefetch`` shadows the function
#: Rows of 0/1 masks whose Gram sums stay exact in float32 (its counts reach at most this).
EXACT_GRAM_ROWS = 2**24
#: Batches read ahead by :func:`iter_batches`.
PREFETCH_DEPTH = 1


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
    pool = PREFETCH_DEPTH + 3 if reuse else 0

    def checked() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in rebatch(source.blocks(), rows, pool):
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
    return _read_ahead(it, PREFETCH_DEPTH) if prefetch else it


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



class full_precision:
    """Float32 matmuls at full precision inside, whatever the user set (restored on exit).

    With TF32 matmuls enabled (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision("high")``), a float32 product on an
    Ampere/Hopper GPU rounds its inputs to 10-bit mantissas: ``X^T Y'`` of
    shifted outputs would lose three decimal digits. Masks are 0/1 and the
    shifted outputs small, so full float32 products are exact enough.
    Process-wide settings: the solvers run one per worker process.
    """

    def __enter__(self) -> "full_precision":
        import torch

        self._saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_float32_matmul_precision(self._saved[0])
        torch.backends.cuda.matmul.allow_tf32 = self._saved[1]


def compute_dtype(x: np.ndarray) -> np.dtype:
    # Masks are 0/1, so float32 products of a batch are exact counts; float64
    # input is kept float64 (and accumulations are float64 either way).
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _reference(y: np.ndarray) -> np.ndarray:
    """Per-column reference of a first batch of outputs: its mean rounded to 8 significant bits
    (a column constant in the batch: its value).

    A coarse reference keeps ``y - ref`` exact in float32 and on the outputs' own grid (float16
    outputs stay on theirs, on which float32 products and sums are exact, as they are unshifted),
    while removing the offset; a constant column becomes exactly zero.
    """
    yb = np.asarray(y, dtype=np.float64)
    frac, exp = np.frexp(yb.mean(0))
    ref = np.ldexp(np.round(frac * 256.0) / 256.0, exp)
    return np.where(yb.min(0) == yb.max(0), yb[0], ref)


class Moments:
    """Streamed sums of a row source: n, sum x, sum y', sum y'^2, X^T Y' and
    either X^T X (``gram=True``) or its diagonal, accumulated in float64.

    ``y' = y - shift`` is the outputs shifted by a per-target reference:
    the first batch's mean rounded to 8 significant bits (see
    :func:`_reference`), or ``shift`` when given (validation rows take the training rows' shift, so that both
    sums live in one frame). Per-batch products run in float32 (exact for
    0/1 masks); on uncentred outputs their rounding error grows with
    ``|mean(y)|`` and survives the centring (``X^T Y - n mx my^T`` cancels
    it into the result), so a raw logit around 700 in a float16 store moved
    least-squares weights by 0.3-1.6. Shifting costs one subtraction per
    batch; float64 products cost about twice the BLAS time and twice the
    batch memory (``benchmarks/regression.py --moments-only``). Everything
    centred (:meth:`centred`, :meth:`means`) is independent of the shift.

    On CPU the Gram matrix comes from BLAS ``syrk`` (half the work of a
    general product); on CUDA from torch.
    """

    def __init__(self, P: int, K: int, dev: Any, *, gram: bool, xy: bool = True, precise: bool = False,
                 shift: Any = None):
        import torch

        self.shift = None if shift is None else torch.as_tensor(shift, dtype=torch.float64).to(dev).clone()
        self._ybuf: np.ndarray | None = None
        self._ref: dict[np.dtype, np.ndarray] = {}
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
        self._acc_rows, self._acc = 0, None  # Gram rows summed in a scratch buffer, not yet in xx

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        with full_precision():  # TF32 would round y' to 10 bits in X^T Y'
            self._update(x, y)

    def release(self) -> None:
        """Free the per-batch scratch buffers (a float32 ``P x P`` among them) once the rows are summed."""
        self._flush()
        self._buffers.clear()
        self._ybuf = None

    def _flush(self) -> None:
        """Add the Gram rows summed in the batch precision (CPU path) into the float64 ``xx``."""
        if self._acc_rows:
            import torch

            self.xx += torch.from_numpy(self._acc)  # Fortran-ordered: torch keeps its strides
            self._acc_rows = 0

    def _update(self, x: np.ndarray, y: np.ndarray) -> None:
        import torch

        dt = np.dtype(np.float64) if self.precise else compute_dtype(x)
        self.dtype = dt if self.dtype is None else np.promote_types(self.dtype, dt)
        x = np.ascontiguousarray(x, dtype=dt)
        y = self._shifted(y, dt)
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
        if self._scipy_blas():
            self._update_cpu(x, y, xt.dtype)
            return
        if self.xy is not None:
            self.xy += torch.mm(xt.T, yt, out=self._scratch("xy", (xt.shape[1], yt.shape[1]), xt.dtype))
        if self.gram:
            self.xx += torch.mm(xt.T, xt, out=self._scratch("xx", (xt.shape[1], xt.shape[1]), xt.dtype))

    def _scipy_blas(self) -> bool:
        """Whether the products run on scipy's BLAS (on the CPU) rather than torch (CUDA)."""
        return self.dev.type == "cpu"

    def _update_cpu(self, x: np.ndarray, y: np.ndarray, tdtype: Any) -> None:
        """The products by scipy's BLAS alone (:mod:`coar_dask.solvers._blas`, the GIL released):
        ``syrk`` for the Gram (half a general product's work), ``gemm`` for ``X^T Y'``. One BLAS
        thread pool: torch's and scipy's pools taking turns spin-wait against each other (on 2
        cores a batch took 1.6x longer with ``torch.mm`` for ``X^T Y'``).

        The Gram sums stay in the batch precision over up to :data:`EXACT_GRAM_ROWS` rows before
        they are added into float64: entries of ``X^T X`` of 0/1 masks are counts, exact in float32
        below 2**24, so the sum is the same, and the float64 addition (14% of the time of a 40,000-row
        fit when it ran per batch) runs once per 16 million rows.
        """
        import torch

        from coar_dask.solvers._blas import gemm_tn, syrk_upper

        if self.xy is not None:
            # (Y'^T X) in Fortran order (K x P) is X^T Y' in C order (P x K): no copy of either input.
            c = self._scratch("xy", (y.shape[1], x.shape[1]), tdtype, fortran=True).numpy().T
            gemm_tn(y.T, x.T, c)
            self.xy += torch.from_numpy(c.T)
        if self.gram:
            c = self._scratch("xx", (x.shape[1], x.shape[1]), tdtype, fortran=True).numpy().T
            same = self._acc is not None and self._acc.dtype == c.dtype and self._acc.ctypes.data == c.ctypes.data
            if self._acc_rows and (not same or self._acc_rows + x.shape[0] > EXACT_GRAM_ROWS):
                self._flush()
            self._acc = c
            syrk_upper(x.T, c, beta=1.0 if self._acc_rows else 0.0)  # upper triangle of c, summed
            self._acc_rows += x.shape[0]

    def _shifted(self, y: np.ndarray, dt: np.dtype) -> np.ndarray:
        """``y - shift`` in ``dt``, in a reused buffer (the shift is set from the first batch)."""
        import torch

        if self.shift is None:
            self.shift = torch.from_numpy(_reference(y)).to(self.dev)
        ref_dt = self._ref.get(dt)
        if ref_dt is None:
            ref_dt = self._ref[dt] = self.shift.cpu().numpy().astype(dt)
        buf = self._ybuf
        if buf is None or buf.dtype != dt or buf.shape[1:] != y.shape[1:] or buf.shape[0] < y.shape[0]:
            buf = self._ybuf = np.empty(y.shape, dtype=dt)
        out = buf[: y.shape[0]]
        np.subtract(y, ref_dt, out=out, casting="same_kind" if y.dtype.kind == "f" else "unsafe")
        return out

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

    def add(self, other: "Moments") -> "Moments":
        """Sums of both (e.g. train + validation)."""
        self._flush()
        other._flush()
        import torch

        if self.shift is not None and other.shift is not None and not torch.equal(self.shift, other.shift):
            raise RegressionError("Moments.add: the two sums have different output shifts; stream the second "
                                  "with shift=first.shift.")
        out = Moments.__new__(Moments)
        out.dev, out.gram, out.dtype, out.precise = self.dev, self.gram and other.gram, self.dtype, False
        out.shift = self.shift if self.shift is not None else other.shift
        out._ybuf, out._ref = None, {}
        out.n = self.n + other.n
        out._buffers, out._acc_rows, out._acc = {}, 0, None
        for name in ("sx", "sy", "syy", "dxx"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.xx = self.xx + other.xx if out.gram else None
        out.xy = self.xy + other.xy if self.xy is not None and other.xy is not None else None
        return out

    _STATE = ("sx", "sy", "syy", "dxx", "xx", "xy", "shift")

    def state(self) -> dict[str, Any]:
        """The sums as plain numpy, to send between processes; :meth:`from_state` inverts it.

        Float64, except the Gram matrix: its upper triangle, row by row (:func:`pack_gram`), in float32
        when that is lossless (the counts of 0/1 masks below 2**24 rows) -- a quarter of the bytes
        of the float64 matrix that a row-parallel fit would move between workers.
        """
        self._flush()
        out: dict[str, Any] = {"n": int(self.n), "gram": bool(self.gram),
                               "dtype": None if self.dtype is None else np.dtype(self.dtype).str}
        for name in self._STATE:
            value = getattr(self, name)
            out[name] = None if value is None else value.cpu().numpy()
        if out["xx"] is not None:
            out["xx"] = pack_gram(out["xx"])
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any], dev: Any) -> "Moments":
        import torch

        out = cls.__new__(cls)
        out.dev, out.gram, out.precise, out.n = dev, bool(state["gram"]), False, int(state["n"])
        out.dtype = None if state["dtype"] is None else np.dtype(state["dtype"])
        out._ybuf, out._ref, out._buffers, out._acc_rows, out._acc = None, {}, {}, 0, None
        for name in cls._STATE:
            value = state[name]
            if name == "xx" and value is not None:
                value = unpack_gram(value, int(np.asarray(state["sx"]).size))
            setattr(out, name, None if value is None else torch.from_numpy(np.asarray(value)).to(dev))
        return out

    def full_gram(self):
        """X^T X as a full symmetric matrix (the CPU path accumulates the upper triangle)."""
        self._flush()
        import torch

        if self.dev.type == "cpu":
            full = torch.triu(self.xx)
            full += torch.triu(self.xx, 1).T
            return full
        return self.xx.clone()

    def means(self):
        """Means of x and of y (y's in its own units, shift added back)."""
        return self.sx / self.n, self.shift + self.sy / self.n

    def shifted_mean_y(self):
        """Mean of ``y' = y - shift``: the frame of ``sy``, ``syy`` and ``xy``."""
        return self.sy / self.n

    def centred_yy(self):
        """``sum (y - my)^2`` per target."""
        import torch

        my = self.shifted_mean_y()
        return torch.clamp(self.syy - self.n * my * my, min=0)

    def centred(self, inplace: bool = False):
        """Centred Gram ``sum (x - mx)(x - mx)^T`` and cross moments ``sum (x - mx)(y - my)^T``.

        ``inplace=True`` centres in the sums' own memory (on CUDA, no second
        ``P x P`` matrix) and leaves these moments without their products
        (``xx`` and ``xy`` become ``None``): for a caller that needs them no more.
        """
        mx, my = self.sx / self.n, self.shifted_mean_y()
        cxx = self.xx if inplace and self.dev.type != "cpu" else self.full_gram()
        cxx.addr_(mx, mx, alpha=-self.n)
        cxy = self.xy if inplace else self.xy.clone()
        cxy.addr_(mx, my, alpha=-self.n)
        if inplace:
            self.xx = self.xy = None
        return cxx, cxy


def stream_moments(
    source: RowSource, dev: Any, *, gram: bool, rows: int | None, progress: ProgressFn | None, stage: str = "moments",
    precise: bool = False, shift: Any = None,
) -> Moments:
    """Moments of ``source``; ``precise=True`` computes every product in float64 (for validation
    rows, whose MSE comes out of a cancellation of much larger sums); ``shift``: the outputs'
    reference (default: from the first batch; see :class:`Moments`)."""
    summed = source.moments if isinstance(source, PrecomputedRows) else None
    if summed is not None and (summed.gram or not gram) and not precise and shift is None:
        report(progress, stage, summed.n, int(source.n_rows), f"{summed.n}/{int(source.n_rows)} rows (summed)")
        source.moments = None  # used once: the solver may centre them in place
        return summed
    m = Moments(source.n_features, source.n_targets, dev, gram=gram, precise=precise, shift=shift)
    total = int(source.n_rows)
    for x, y in iter_batches(source, rows, reuse=True):
        m.update(x, y)
        report(progress, stage, m.n, total, f"{m.n}/{total} rows")
    m.release()
    if m.n == 0:
        raise RegressionError("no rows to fit on: the store has no completed rows in the chosen split.")
    return m


def first_batch_shift(source: RowSource, rows: int | None = None) -> np.ndarray:
    """The outputs' shift :func:`stream_moments` would take from ``source``'s first batch of ``rows``
    rows: moments summed apart (row-parallel fits) use it so that every part has the same frame."""
    for _, y in iter_batches(source, rows, prefetch=False):
        return _reference(y)
    raise RegressionError("no rows to fit on: the store has no completed rows in the chosen split.")


def add_states(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The sum of two :meth:`Moments.state` (same shift): the combine step of a tree reduction."""
    if not np.array_equal(a["shift"], b["shift"]):
        raise RegressionError("add_states: the two sums have different output shifts; compute both with one shift.")
    out = dict(a, n=a["n"] + b["n"], gram=a["gram"] and b["gram"])
    out["dtype"] = np.promote_types(a["dtype"], b["dtype"]).str if a["dtype"] and b["dtype"] else a["dtype"] or b["dtype"]
    for name in ("sx", "sy", "syy", "dxx", "xx", "xy"):
        out[name] = None if a[name] is None or b[name] is None else np.add(a[name], b[name], dtype=np.float64)
    if out["xx"] is not None:  # packed (pack_gram): float32 again when the sum allows it
        out["xx"] = _narrow(out["xx"])
    return out


def _narrow(values: np.ndarray) -> np.ndarray:
    """``values`` in float32 when that loses nothing (e.g. counts below 2**24), else float64."""
    narrow = values.astype(np.float32)
    return narrow if np.array_equal(narrow, values) else values


def pack_gram(xx: np.ndarray) -> np.ndarray:
    """The upper triangle of ``xx`` (``P x P``; its lower triangle is not read), row by row, as one
    vector: float32 when lossless, else float64. :func:`unpack_gram` inverts it.

    >>> pack_gram(np.array([[1.0, 2.0], [-7.0, 3.0]])).tolist()
    [1.0, 2.0, 3.0]
    """
    p = xx.shape[0]
    out = np.empty(p * (p + 1) // 2, dtype=np.float64)
    at = 0
    for i in range(p):  # a row slice at a time: no P x P index arrays
        out[at: at + p - i] = xx[i, i:]
        at += p - i
    return _narrow(out)


def unpack_gram(packed: np.ndarray, p: int) -> np.ndarray:
    """The symmetric float64 ``P x P`` matrix of a :func:`pack_gram` vector.

    >>> unpack_gram(np.array([1.0, 2.0, 3.0]), 2).tolist()
    [[1.0, 2.0], [2.0, 3.0]]
    """
    packed = np.asarray(packed)
    if packed.shape != (p * (p + 1) // 2,):
        raise RegressionError(f"a packed Gram matrix of {p} features has {p * (p + 1) // 2} values; found {packed.shape}.")
    out = np.empty((p, p), dtype=np.float64)
    at = 0
    for i in range(p):
        out[i, i:] = packed[at: at + p - i]
        out[i:, i] = packed[at: at + p - i]
        at += p - i
    return out


class PrecomputedRows:
    """A row source whose moments were summed elsewhere (e.g. per block on Dask workers).

    :func:`stream_moments` returns ``moments`` instead of reading the rows (once;
    other passes -- validation, conjugate gradients -- still read ``source``).
    """

    def __init__(self, source: RowSource, moments: Moments):
        if moments.n != source.n_rows:
            raise RegressionError(f"the summed moments count {moments.n} rows, the source {source.n_rows}.")
        self.source, self.moments = source, moments
        self.n_rows, self.n_features, self.n_targets = source.n_rows, source.n_features, source.n_targets

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.source.blocks()

    def __getattr__(self, name: str) -> Any:  # target_slice, rows, store of a StoreRows
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def validation_metrics(result: SolverResult, val: RowSource, rows: int | None = None) -> dict[str, Any]:
    """Per-target validation MSE and Pearson correlation, streamed over ``val``.

    Returns ``{"val_mse": [...], "val_correlation": [...], "val_correlation_nan": m}``
    (lists of K floats; a target whose prediction or outputs do not vary on
    ``val`` has correlation NaN, and ``m`` counts them).
    """
    stats = PearsonAccumulator(val.n_targets)
    sq = np.zeros(val.n_targets)
    w = result.weight.astype(np.float64)
    for X, Y in iter_batches(val, rows, reuse=True):
        # float64: the MSE is a small difference of large numbers when the fit is good.
        pred = np.asarray(X, dtype=np.float64) @ w + result.bias
        actual = np.asarray(Y, dtype=np.float64)
        stats.update(pred, actual)
        err = pred - actual
        sq += np.einsum("ij,ij->j", err, err, dtype=np.float64)
    corr = stats.result()
    return {"val_mse": (sq / max(stats.n, 1)).tolist(), "val_correlation": corr.tolist(),
            "val_correlation_nan": int(np.isnan(corr).sum())}


#: A column whose standard deviation is at most this fraction of its largest
#: magnitude has no variance: its values differ by rounding alone, and its
#: correlation is NaN (a one-pass formula would give +-1 or noise there).
NO_VARIANCE_RTOL = 1e-12


def pearson_from_sums(n: int, sp, sa, spp, saa, spa, scale_p=0.0, scale_a=0.0) -> np.ndarray:
    """Per-column Pearson correlation from sums of *shifted* values (``p - c_p``, ``a - c_a``, with
    ``c`` near the column's values, e.g. its first one; the sums' rounding error then scales with
    the spread, not the offset). ``scale_p``, ``scale_a``: the columns' largest ``|value|``; a column
    with no variance (see :data:`NO_VARIANCE_RTOL`) gives NaN.
    """
    n = max(int(n), 1)
    sp, sa, spp, saa, spa = (np.asarray(v, dtype=np.float64) for v in (sp, sa, spp, saa, spa))
    mp, ma = sp / n, sa / n
    vp = spp / n - mp * mp
    va = saa / n - ma * ma
    cov = spa / n - mp * ma
    return pearson_centred(cov, vp, va, no_variance(vp, mp, scale_p) | no_variance(va, ma, scale_a))


def no_variance(var, shifted_mean, scale) -> np.ndarray:
    """Whether a column's variance ``var`` (from sums of values shifted by ``c``, whose mean is
    ``shifted_mean``) is rounding alone: at most :data:`NO_VARIANCE_RTOL` of ``scale`` (the
    values' magnitude) squared, or within the cancellation error of ``E[(v-c)^2] - E[v-c]^2``."""
    var = np.asarray(var, dtype=np.float64)
    m2 = np.asarray(shifted_mean, dtype=np.float64) ** 2
    return (var <= (NO_VARIANCE_RTOL * np.asarray(scale, dtype=np.float64)) ** 2) | (var <= _CANCELLATION * m2)


#: Relative error of a variance computed as ``E[v^2] - E[v]^2`` in float64 (a few hundred ulps).
_CANCELLATION = 1e-13


def pearson_centred(cov, vp, va, flat) -> np.ndarray:
    """``cov / sqrt(vp va)`` clipped to [-1, 1], NaN where ``flat``."""
    cov, vp, va = (np.asarray(v, dtype=np.float64) for v in (cov, vp, va))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cov / np.sqrt(np.clip(vp, 0, None) * np.clip(va, 0, None)), -1.0, 1.0)
    return np.where(np.asarray(flat) | ~np.isfinite(r), np.nan, r)


def correlation_summary(correlations: Any) -> dict[str, Any]:
    """Mean and median over the examples with a correlation, and how many have none (NaN: a
    constant prediction or constant outputs)."""
    r = np.asarray(correlations, dtype=np.float64).ravel()
    ok = r[np.isfinite(r)]
    return {"mean": float(ok.mean()) if ok.size else float("nan"),
            "median": float(np.median(ok)) if ok.size else float("nan"),
            "n_nan": int(r.size - ok.size), "n": int(r.size)}


class PearsonAccumulator:
    """Streamed per-column Pearson correlation of predictions with actual values.

    Sums are of values shifted by each column's first row, so the result
    does not lose digits to a large common offset, and a constant column
    gives exactly zero variance: its correlation is NaN (see
    :func:`pearson_from_sums`).
    """

    def __init__(self, k: int):
        self.n = 0
        self.sp = np.zeros(k)
        self.sa = np.zeros(k)
        self.spp = np.zeros(k)
        self.saa = np.zeros(k)
        self.spa = np.zeros(k)
        self.scale_p = np.zeros(k)
        self.scale_a = np.zeros(k)
        self.cp: np.ndarray | None = None
        self.ca: np.ndarray | None = None

    def update(self, pred: np.ndarray, actual: np.ndarray) -> None:
        if pred.shape[0] == 0:
            return
        if self.cp is None:
            self.cp = np.array(pred[0], dtype=np.float64)
            self.ca = np.array(actual[0], dtype=np.float64)
        p = np.asarray(pred, dtype=np.float64) - self.cp
        a = np.asarray(actual, dtype=np.float64) - self.ca
        self.n += p.shape[0]
        self.scale_p = np.maximum(self.scale_p, np.abs(pred).max(0))
        self.scale_a = np.maximum(self.scale_a, np.abs(actual).max(0))
        self.sp += p.sum(0)
        self.sa += a.sum(0)
        self.spp += np.einsum("ij,ij->j", p, p)
        self.saa += np.einsum("ij,ij->j", a, a)
        self.spa += np.einsum("ij,ij->j", p, a)

    def result(self) -> np.ndarray:
        """Correlation per column; NaN where the prediction or the actual values do not vary."""
        return pearson_from_sums(self.n, self.sp, self.sa, self.spp, self.saa, self.spa, self.scale_p, self.scale_a)


class EpochRows:
    """The rows of a source as torch batches ``(positions, X, Y)`` of exactly
    ``batch_size`` rows (the last batch of an epoch may be smaller).

    Small sources are cached in RAM (masks as bool) and visited in a fresh
    random order every epoch, like FFCV's ``OrderOption.RANDOM``; larger ones
    are streamed in source order and shuffled within a window of
    ``4 * batch_size`` rows or more.
    """

    def __init__(self, source: RowSource, batch_size: int, *, seed: int, cache_bytes: int):
        import torch

        self.source = source
        self.n = int(source.n_rows)
        self.P, self.K = int(source.n_features), int(source.n_targets)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.window = max(4 * self.batch_size, batch_rows_for(self.P, self.K))
        self.cached = self.n * (self.P + 4 * self.K) <= cache_bytes
        self.X = self.Y = None
        if self.cached:
            xs, ys, binary = [], [], True
            for x, y in iter_batches(source):
                binary = binary and bool(np.isin(x, (0, 1)).all())
                xs.append(torch.from_numpy(np.ascontiguousarray(x)))
                ys.append(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)))
            X = torch.cat(xs) if xs else torch.zeros(0, self.P)
            self.X = X.bool() if binary else X.float()
            self.Y = torch.cat(ys) if ys else torch.zeros(0, self.K)
            if self.X.shape[0] != self.n:
                raise RegressionError(f"the row source said {self.n} rows but yielded {self.X.shape[0]}.")

    def batches(self, epoch: int | None) -> Iterator[tuple[Any, Any, Any]]:
        """Batches of epoch ``epoch`` (shuffled); ``None``: in order, unshuffled."""
        import torch

        B = self.batch_size
        rng = None if epoch is None else np.random.default_rng([self.seed, int(epoch)])
        if self.cached:
            order = torch.arange(self.n) if rng is None else torch.from_numpy(rng.permutation(self.n))
            for i in range(0, self.n, B):
                idx = order[i : i + B]
                yield idx, self.X[idx], self.Y[idx]
            return
        offset = 0
        carry: tuple[Any, Any, Any] | None = None
        for x, y in iter_batches(self.source, self.window):
            pos = torch.arange(offset, offset + x.shape[0])
            offset += x.shape[0]
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
            if carry is not None:
                pos, xt, yt = torch.cat([carry[0], pos]), torch.cat([carry[1], xt]), torch.cat([carry[2], yt])
            if rng is not None:
                perm = torch.from_numpy(rng.permutation(pos.shape[0]))
                pos, xt, yt = pos[perm], xt[perm], yt[perm]
            full = (pos.shape[0] // B) * B
            for i in range(0, full, B):
                yield pos[i : i + B], xt[i : i + B], yt[i : i + B]
            carry = (pos[full:], xt[full:], yt[full:]) if full < pos.shape[0] else None
        if offset != self.n:
            raise RegressionError(f"the row source said {self.n} rows but yielded {offset}.")
        if carry is not None:
            yield carry

