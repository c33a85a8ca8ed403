"""Peak memory of each stage, in bytes, from the sizes alone: the one memory model.

Memory is planned, not discovered: the Gram/CG choice of ``lstsq``
(``method="auto"``), the number of target slices a fit needs, the GPU-worker
check and ``coar-dask plan`` all ask these functions, and
``benchmarks/memory_model.py`` holds them against peaks measured in fresh
processes (peak RSS growth on the CPU, ``torch.cuda.max_memory_allocated`` on
CUDA).

Pure arithmetic: no torch, no numpy at import. Sizes: ``P`` components
(features), ``K`` examples (targets), ``n`` rows, ``rows`` rows per streamed
batch (:func:`coar_dask.solvers.rows.batch_rows_for`).

Where the counts come from (float64 ``P x P`` / ``P x K`` matrices alive at
the solver's peak, read off the code and checked by the benchmark):

- ``gram`` on the CPU: the float64 Gram ``X^T X``, the float32 batch sum kept
  by the moments, the symmetric copy and its ``triu`` temporary while
  centring, then the Cholesky input and factor (:data:`GRAM_P2`);
  ``X^T Y`` and its centred copy, the solve's gathered right-hand side, its
  result and the returned weights (:data:`GRAM_PK`). On CUDA the Gram is
  centred in place (:data:`GRAM_P2_CUDA`).
- ``gram`` with a ridge grid or refit: validation moments, eigenvectors,
  LAPACK's ``syevd`` workspace and ``_grid_mse``'s products
  (:data:`GRAM_GRID_P2`).
- ``cg``: the moments, the right-hand side, iterate, residual, search
  direction, preconditioned residual, the best iterate, and the
  operator's float32/float64 temporaries per batch (:data:`CG_PK`).
- ``saga``: the ``n x K`` float32 residual table plus float32 ``P x K``
  weights, averages and copies (:data:`SAGA_PK`).

Examples
--------
>>> from coar_dask.core.memory import fit_bytes, human
>>> human(fit_bytes("gram", 22_720, 50_000, rows=64).total)   # ImageNet ResNet-50, CPU
'51.9 GB'
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

from coar_dask.errors import RegressionError

__all__ = [
    "MemoryEstimate",
    "GRAM_P2", "GRAM_P2_CUDA", "GRAM_PK", "GRAM_GRID_P2", "GRAM_GRID_PK", "CG_PK", "CG_BATCH_BYTES", "SAGA_PK", "SAGA_CACHE_BYTES", "ACTIVATION_FACTOR",
    "FOLD_COPIES",
    "GPU_MEMORY_FRACTION", "PREFETCH_BUFFERS",
    "batch_bytes", "fit_bytes", "partial_sum_bytes", "slice_bytes", "slices_needed", "choose_fit_method",
    "cg_batch_rows", "build_worker_bytes", "client_bytes", "evaluate_bytes", "human", "available_host_bytes",
]

F64, F32 = 8, 4

#: Float64 ``P x P`` matrices at the Gram method's peak on the CPU (see the module's notes).
GRAM_P2 = 4.4
#: ... on CUDA, where the centred Gram reuses the sums' memory.
GRAM_P2_CUDA = 3.8
#: Float64 ``P x K`` matrices at the Gram method's peak.
GRAM_PK = 3.7
#: Float64 ``P x P`` and ``P x K`` matrices at the Gram method's peak with a ridge grid or a refit.
GRAM_GRID_P2, GRAM_GRID_PK = 7.0, 5.5
#: Float64 ``P x K`` matrices at the conjugate-gradient method's peak.
CG_PK = 11.0
#: Float32 rows per batch of the CG operator at most (:func:`cg_batch_rows`).
CG_BATCH_BYTES = 512 * 2**20
#: Float32 ``P x K`` matrices SAGA holds (weights, best and output copies, gradient averages).
SAGA_PK = 10.0
#: Rows SAGA caches in memory between epochs, per row source (``SagaOptions.cache_bytes``' default).
SAGA_CACHE_BYTES = 2**30
#: Live activations of an inference pass, as multiples of the largest hooked activation (a residual
#: block's input, its convolution's output, the sum, and the next block's input; measured 4.2-4.3 on
#: the benchmark's BatchNorm-folded ResNets, 5.1 on the unfolded ones: their BatchNorm outputs).
ACTIVATION_FACTOR = 4.0
#: Parameter copies a BatchNorm model adds on a build worker: the engine's folded copy, and the deep
#: copy ``torch.fx.experimental.optimization.fuse`` folds, held in reference cycles until Python's
#: cyclic garbage collector runs (measured: 2.0 x the parameters resident after the first block).
FOLD_COPIES = 2
#: Fraction of a device's free memory a plan may use (CUDA keeps workspace of its own).
GPU_MEMORY_FRACTION = 0.9
#: Row buffers alive while streaming: the consumer's, the read-ahead queue's, and the one being filled.
PREFETCH_BUFFERS = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one stage, as named parts (their sum is the peak).

    Examples
    --------
    >>> e = MemoryEstimate("fit", "cg", (("state", 10), ("batch", 5)))
    >>> e.total, e.to_dict()["parts"]
    (15, {'state': 10, 'batch': 5})
    """

    stage: str
    method: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return int(sum(b for _, b in self.parts))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "method": self.method, "bytes": self.total, "parts": dict(self.parts)}

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {human(b)}" for name, b in self.parts)
        return f"{self.stage}/{self.method}: {human(self.total)} ({parts})"


def _est(stage: str, method: str, parts: Iterable[tuple[str, float]]) -> MemoryEstimate:
    return MemoryEstimate(stage, method, tuple((name, int(math.ceil(b))) for name, b in parts))


def human(nbytes: float) -> str:
    """``nbytes`` in decimal units, e.g. ``'12.4 GB'``.

    >>> human(1.5e9), human(2048)
    ('1.5 GB', '2.0 kB')
    """
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def batch_bytes(P: int, K: int, rows: int, *, n: int = 0, x_itemsize: int = 1, y_itemsize: int = 2,
                precise: bool = False) -> int:
    """Bytes of the streamed rows: :data:`PREFETCH_BUFFERS` batches of ``rows`` rows as stored
    (bool masks, float16 outputs by default; fewer when ``n`` rows fill fewer), plus one batch
    converted for the BLAS (float32, or float64 with ``precise``: masks, their squares, and the
    outputs' shifted copy and square)."""
    cast = F64 if precise else F32
    buffers = min(PREFETCH_BUFFERS, -(-int(n) // max(1, int(rows)))) if n else PREFETCH_BUFFERS
    used = min(int(rows), int(n)) if n else int(rows)
    return int(buffers * rows * (P * x_itemsize + K * y_itemsize) + used * (2 * P * cast + 2 * K * cast))


def fit_bytes(method: str, P: int, K: int, *, rows: int, n: int = 0, n_val: int = 0, grid: bool = False,
              device: str = "cpu", x_itemsize: int = 1, y_itemsize: int = 2) -> MemoryEstimate:
    """Peak bytes of one solver fitting ``K`` targets on ``P`` features.

    Parameters
    ----------
    method
        ``"gram"``, ``"cg"`` or ``"saga"``.
    P, K
        Features (components) and targets (examples) of this fit (a target slice's ``K``).
    rows
        Rows per streamed batch.
    n
        Training rows (SAGA's residual table grows with them; the others only while fewer than
        :data:`PREFETCH_BUFFERS` batches; 0: many); ``n_val`` validation rows (SAGA caches both).
    grid
        A ridge grid or a refit (the Gram method then holds validation sums and an eigenbasis).
    device
        ``"cpu"`` or ``"cuda"``: the Gram method centres in place on CUDA.

    Examples
    --------
    >>> fit_bytes("cg", 82_944, 5_000, rows=64).total > 35e9    # ViT-B/16: 38 GB, not 3.3 GB
    True
    """
    P, K = int(P), int(K)
    batch = ("rows", batch_bytes(P, K, rows, n=n, x_itemsize=x_itemsize, y_itemsize=y_itemsize))
    cuda = str(device).startswith("cuda")
    if method == "gram":
        p2 = GRAM_GRID_P2 if grid else (GRAM_P2_CUDA if cuda else GRAM_P2)
        pk = GRAM_GRID_PK if grid else GRAM_PK
        return _est("fit", "gram", [("P x P float64", p2 * F64 * P * P), ("P x K float64", pk * F64 * P * K),
                                    batch])
    if method == "cg":
        op = cg_batch_rows(P, K, rows)
        return _est("fit", "cg", [("P x K float64", CG_PK * F64 * P * K),
                                  ("operator rows", batch_bytes(P, K, op, n=n, x_itemsize=x_itemsize,
                                                                y_itemsize=y_itemsize))])
    if method == "saga":
        row = F32 * (P + K)  # cached as float32 (measured: 2-3x the stored bool/float16 bytes)
        cache = min(int(n) * row, SAGA_CACHE_BYTES) + min(int(n_val) * row, SAGA_CACHE_BYTES)
        return _est("fit", "saga", [("residual table n x K float32", F32 * int(n) * K),
                                    ("P x K float32", SAGA_PK * F32 * P * K),
                                    ("moments X^T Y", (F64 + F32) * P * K), ("row cache", cache), batch])
    raise RegressionError(f"no memory model for method {method!r}; use 'gram', 'cg' or 'saga'.")


def partial_sum_bytes(P: int, K: int, *, rows: int, n: int = 0) -> MemoryEstimate:
    """One row group of a row-parallel fit (``coar_dask.fit.moments``): its float64 Gram and
    ``X^T Y`` with their float32 batch sums, and the packed state it sends (the Gram's upper
    triangle in float64, then float32 when lossless; ``X^T Y`` as it is): ``2 P^2 + 8 P K`` bytes on
    the wire."""
    P, K = int(P), int(K)
    return _est("fit", "partial-sum", [("sums", (F64 + F32) * P * P + (F64 + F32) * P * K),
                                       ("packed state", (F64 + F32) * P * (P + 1) / 2),
                                       ("rows", batch_bytes(P, K, rows, n=n))])


def slice_bytes(method: str, P: int, K: int, slices: int, **kwargs: Any) -> MemoryEstimate:
    """Peak of one of ``slices`` target slices (``fit --slices``): a fit of ``ceil(K / slices)`` targets."""
    return fit_bytes(method, P, -(-int(K) // max(1, int(slices))), **kwargs)


def slices_needed(method: str, P: int, K: int, budget: float, *, max_slices: int | None = None,
                  **kwargs: Any) -> int | None:
    """Fewest target slices whose each fits in ``budget`` bytes (``None``: not even one target does).

    >>> slices_needed("cg", 82_944, 5_000, 20e9, rows=64)
    2
    """
    top = int(max_slices or K)
    if fit_bytes(method, P, 1, **kwargs).total > budget:
        return None
    lo, hi = 1, max(1, top)
    if slice_bytes(method, P, K, hi, **kwargs).total > budget:
        return None
    while lo < hi:  # bytes fall as the slices rise
        mid = (lo + hi) // 2
        if slice_bytes(method, P, K, mid, **kwargs).total <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def choose_fit_method(P: int, K: int, budget: float, *, rows: int, grid: bool = False, device: str = "cpu",
                      max_gram_bytes: float | None = None) -> str:
    """``method="auto"`` of ``lstsq``: ``"gram"`` when its peak fits ``budget`` bytes (and a ``P x P``
    float64 matrix is at most ``max_gram_bytes``), else ``"cg"`` when that fits; never a method that
    does not fit: otherwise a :class:`~coar_dask.errors.RegressionError` says how many target slices
    would.

    >>> choose_fit_method(2_304, 10_000, 24e9, rows=1_000)
    'gram'
    >>> choose_fit_method(22_720, 1_000, 16e9, rows=64)    # ResNet-50's Gram needs 18.9 GB
    'cg'
    """
    gram = fit_bytes("gram", P, K, rows=rows, grid=grid, device=device)
    if (max_gram_bytes is None or F64 * P * P <= max_gram_bytes) and gram.total <= budget:
        return "gram"
    cg = fit_bytes("cg", P, K, rows=rows, device=device)
    if cg.total <= budget:
        return "cg"
    slices = slices_needed("cg", P, K, budget, rows=rows, device=device)
    fix = (f"split the targets: fit --slices {slices} (each slice then needs about "
           f"{human(slice_bytes('cg', P, K, slices, rows=rows).total)})" if slices else
           "no number of target slices fits: use a machine or GPU with more memory")
    raise RegressionError(
        f"lstsq: neither method fits in the {human(budget)} available for P = {P:,} components and K = {K:,} "
        f"targets: gram needs {human(gram.total)}, cg {human(cg.total)} (coar_dask.core.memory); {fix}.")


def cg_batch_rows(P: int, K: int, rows: int, *, budget: float = CG_BATCH_BYTES) -> int:
    """Rows per batch of the CG operator ``Xc^T (Xc V)``, at least ``rows`` (the streaming default).

    Each batch moves the ``P x K`` iterate (a float32 copy, a float32 product and its float64 sum:
    ``16 P K`` bytes) for ``4 rows P`` bytes of rows, so a batch should carry about ``K`` rows (where
    the two match), within ``budget`` bytes of float32 rows. The streaming default's 64-row batches
    at P = 82,944, K = 5,000 (ViT-B/16) moved 6.6 GB per 21 MB of rows; 1,526 rows cut that 24x.

    >>> cg_batch_rows(82_944, 5_000, 64), cg_batch_rows(100, 10, 9_000)
    (1526, 9000)
    """
    cap = int(budget // max(1, F32 * (int(P) + int(K))))
    return int(max(int(rows), min(int(K), cap)))


def build_worker_bytes(*, param_bytes: int, example_bytes: int, n_examples: int, examples_per_pass: int,
                       masks_per_pass: int, activation_elements: int, activation_itemsize: int = 4,
                       outputs_per_example: int = 1000, device: str = "cpu",
                       batchnorm: bool = True) -> dict[str, MemoryEstimate]:
    """A build worker's peak: ``{"device": ..., "host": ...}`` (one process on the CPU: both add up).

    The model's parameters; with BatchNorm (``batchnorm``), the engine's folded copy, made when its
    runner starts whatever the masks per pass, and the copy ``torch.fx``'s ``fuse`` deep-copies to fold
    it (:data:`FOLD_COPIES`); one pass's inputs (``masks_per_pass x examples_per_pass`` rows), its live
    activations (:data:`ACTIVATION_FACTOR` times the largest hooked activation ``activation_elements``
    per row, one more with ``masks_per_pass`` 1 on a BatchNorm model: the unfolded model's BatchNorm
    outputs) and logits; the examples stay in host memory.

    Examples
    --------
    >>> e = build_worker_bytes(param_bytes=10, example_bytes=4, n_examples=8, examples_per_pass=8,
    ...                        masks_per_pass=2, activation_elements=1, outputs_per_example=0)
    >>> e["device"].to_dict()["parts"]["model"], build_worker_bytes(
    ...     param_bytes=10, example_bytes=4, n_examples=8, examples_per_pass=8, masks_per_pass=2,
    ...     activation_elements=1, outputs_per_example=0, batchnorm=False)["device"].to_dict()["parts"]["model"]
    (30, 10)
    """
    rows = int(masks_per_pass) * int(examples_per_pass)
    copies = 1 + (FOLD_COPIES if batchnorm else 0)
    live = ACTIVATION_FACTOR + (1 if batchnorm and int(masks_per_pass) == 1 else 0)
    device_parts = [("model", copies * int(param_bytes)), ("inputs", rows * int(example_bytes)),
                    ("activations", live * rows * int(activation_elements) * activation_itemsize),
                    ("logits", rows * int(outputs_per_example) * F32)]
    host = [("examples", int(n_examples) * int(example_bytes))]
    if str(device).startswith("cuda"):
        return {"device": _est("build", "worker", device_parts), "host": _est("build", "worker host", host)}
    both = _est("build", "worker", device_parts + host)
    return {"device": both, "host": both}


def client_bytes(P: int, K: int, *, slices: int = 1) -> MemoryEstimate:
    """The client assembling attributions (``coar_dask.fit.core.assemble``): every slice's float32
    weights, their concatenation, and ``torch.save``'s serialised copy, each ``4 P K`` bytes
    whatever the number of slices."""
    P, K = int(P), int(K)
    return _est("client", "assemble+save", [("slices' weights", F32 * P * K), ("weight P x K float32", F32 * P * K),
                                            ("saved copy", F32 * P * K)])


def evaluate_bytes(P: int, K: int, *, rows: int) -> MemoryEstimate:
    """Evaluation: the attributions (float32 ``P x K``, their float64 copy), one batch of held-out
    rows, its predictions and the per-example correlation sums."""
    P, K = int(P), int(K)
    return _est("evaluate", "correlation", [("weights", (F32 + F64) * P * K), ("rows", batch_bytes(P, K, rows)),
                                            ("predictions", 2 * F64 * int(rows) * K)])


def available_host_bytes() -> int:
    """Memory this machine can give a new allocation now: ``MemAvailable`` of ``/proc/meminfo``
    (Linux), else the free pages (``os.sysconf``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
