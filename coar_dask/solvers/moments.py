"""Streamed sums of a row source (the least-squares moments) and their exchange between processes.

:class:`Moments` keeps ``n``, ``sum x``, ``sum y'``, ``sum y'^2``, ``X^T Y'`` and
``X^T X`` (or its diagonal) of outputs shifted by a per-target reference;
:func:`stream_moments` sums a row source's batches into one;
:meth:`Moments.state` / :func:`add_states` / :meth:`Moments.from_state` move
partial sums between Dask workers (row-parallel fits); :class:`PrecomputedRows`
hands summed moments to a solver in place of reading its rows.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from coar_dask.errors import RegressionError
from coar_dask.solvers.base import ProgressFn, RowSource, report
from coar_dask.solvers.rows import iter_batches

__all__ = [
    "EXACT_GRAM_ROWS",
    "full_precision",
    "compute_dtype",
    "Moments",
    "stream_moments",
    "first_batch_shift",
    "add_states",
    "pack_gram",
    "unpack_gram",
    "PrecomputedRows",
    "constant_columns",
]


#: Rows of 0/1 masks whose Gram sums stay exact in float32 (its counts reach at most this).
EXACT_GRAM_ROWS = 2**24


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

        dt = np.dtype(np.float64) if self.precise else np.promote_types(compute_dtype(x), compute_dtype(y))
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


def constant_columns(m: Moments) -> list[int]:
    """The features that do not vary over ``m``'s rows (a component never, or always, ablated in them):
    the rows say nothing about their weights."""
    import torch

    if m.gram:
        m._flush()
        sq = torch.diagonal(m.xx)
    else:
        sq = m.dxx
    mean = m.sx / max(m.n, 1)
    var = sq / max(m.n, 1) - mean * mean
    return torch.nonzero(var <= 1e-12 * torch.clamp(mean.abs(), min=1.0) ** 2).flatten().tolist()
