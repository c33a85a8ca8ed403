"""Exact least squares or ridge with an intercept, over streamed row blocks.

Streams ``X^T X`` and ``X^T Y`` once and solves through a Cholesky or an
eigendecomposition; when ``P`` is too large for a ``P x P`` matrix,
conjugate gradients on the normal equations (one pass over the rows per
iteration). The ridge penalty can be chosen per example on the validation
rows (``ridge_grid``). Options: :class:`LstsqOptions`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from coar_dask.core.memory import (GPU_MEMORY_FRACTION, available_host_bytes, cg_batch_rows, choose_fit_method,
                                   fit_bytes)
from coar_dask.errors import RegressionError
from coar_dask.solvers.base import (
    ProgressFn,
    RowSource,
    SolverResult,
    make_options,
    option,
    report,
    threads_for,
    torch_device,
)
from coar_dask.solvers.metrics import no_variance, pearson_centred, validation_metrics
from coar_dask.solvers.moments import Moments, compute_dtype, full_precision, stream_moments
from coar_dask.solvers.prior import Prior, as_prior, prior_scale, toward
from coar_dask.solvers.rows import ConcatRows, batch_rows_for, iter_batches

__all__ = ["LstsqOptions", "lstsq", "sums_rows_apart", "ridge_grid_values", "moment_metrics", "MAX_GRAM_BYTES", "gram_fits_device",
           "gram_max_features"]

logger = logging.getLogger(__name__)

#: Largest ``P x P`` float64 matrix the ``lstsq`` Gram method forms by default;
#: above it, ``method="auto"`` uses conjugate gradients.
MAX_GRAM_BYTES = 4 * 2**30

def memory_budget(dev: Any) -> float:
    """Bytes a fit on ``dev`` may use: on CUDA :data:`~coar_dask.core.memory.GPU_MEMORY_FRACTION` of
    ``torch.cuda.mem_get_info()``'s free memory, on the CPU the memory the system has available."""
    import torch

    if torch.device(dev).type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(dev))
        return GPU_MEMORY_FRACTION * float(free)
    return float(available_host_bytes())


def gram_fits_device(P: int, dev: Any, *, grid: bool, K: int = 1, rows: int | None = None) -> bool:
    """Whether the Gram method's peak (:func:`coar_dask.core.memory.fit_bytes`: about 4.4 ``P x P``
    float64 matrices on the CPU, 3.8 on CUDA, 7.0 with a ridge grid or refit, plus 3.7 ``P x K``)
    fits :func:`memory_budget` of ``dev``. ImageNet ResNet-50 (P = 22,720, K = 50,000) needs about
    61 GB: not on a GPU with 16 GB free."""
    import torch

    rows = rows or batch_rows_for(P, K)
    need = fit_bytes("gram", P, K, rows=rows, grid=grid, device=torch.device(dev).type).total
    return need <= memory_budget(dev)


def gram_max_features(free_bytes: float, *, grid: bool, max_gram_bytes: int = MAX_GRAM_BYTES, K: int = 1,
                      device: str = "cuda") -> int:
    """Largest P for which ``method="auto"`` takes the Gram path with ``free_bytes`` free
    (:data:`~coar_dask.core.memory.GPU_MEMORY_FRACTION` of it usable on CUDA) and ``K`` targets.

    Examples
    --------
    >>> gram_max_features(80e9, grid=False), gram_max_features(16e9, grid=True)
    (23170, 16007)
    """
    budget = (GPU_MEMORY_FRACTION if device == "cuda" else 1.0) * free_bytes
    lo, hi = 0, int((max_gram_bytes / 8) ** 0.5)
    while lo < hi:  # the peak grows with P
        mid = (lo + hi + 1) // 2
        if fit_bytes("gram", mid, K, rows=batch_rows_for(mid, K), grid=grid, device=device).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class LstsqOptions:
    """Options of :func:`lstsq`.

    Parameters
    ----------
    ridge
        The penalty ``lam`` for every target (0: plain least squares).
    ridge_grid
        Choose ``lam`` per target among these values by validation MSE
        (needs validation rows): a sequence, ``"0,1,10"``, or
        ``"auto"``/``"auto:N"`` (see :func:`ridge_grid_values`). Overrides ``ridge``.
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
        O(P K) memory. Each target keeps its best iterate and stops once its
        residual grows (rounding in float32). With fewer rows than
        components (and no ridge) many weights fit exactly and a warning is
        logged: ``"gram"`` returns the minimum-norm solution in mask units
        (least ``sum_j w_j^2``), ``"cg"`` the one in standardised units
        (least ``sum_j var_j w_j^2``, as :func:`~coar_dask.solvers.saga.saga`
        at lambda 0): both fit the training rows, they differ on new masks. ``"auto"``: ``"gram"`` when a ``P x P`` float64 matrix
        fits in ``max_gram_bytes`` and, on CUDA, the Gram method's peak fits
        the GPU's free memory (:func:`gram_fits_device`).
    rcond
        Eigenvalues below ``rcond`` times the largest are treated as zero.
    cg_tol, cg_max_iter
        Conjugate gradients stop when every target's residual norm is below
        ``cg_tol`` times its right-hand side's (default 1e-10 for float64
        rows, 1e-6 for float32), or after ``cg_max_iter`` iterations.
    batch_rows
        Rows per BLAS batch (default: about 16 MiB of rows).
    prior
        Shrink toward this attribution instead of toward zero: ``lam ||w - w0||^2``
        (:mod:`coar_dask.solvers.prior`; a :class:`~coar_dask.solvers.prior.Prior` or a (P, K)
        array). Gram method only, no ``refit``. ``fit(store, prior="gp"|"loo"|FILE)`` makes one.
    prior_scale
        Shrink toward ``c w0`` with ``c`` per target fitted on the training rows
        (:func:`~coar_dask.solvers.prior.prior_scale`) rather than toward ``w0`` itself.
    """

    ridge: float = option(0.0, "lstsq: ridge penalty (default 0: plain least squares)", flag="--ridge", type=float)
    ridge_grid: Sequence[float] | str | None = option(
        None, "lstsq: choose the ridge penalty per example on the validation rows among these, e.g. 0,1,10,100 or "
        "auto (auto:N for N values)", flag="--ridge-grid", type=str)
    refit: bool = option(False, "lstsq: refit on train + validation rows (after choosing penalties with "
                         "--ridge-grid)", flag="--refit", action="store_true")
    method: str = option("auto", "lstsq: gram (X^T X, eigh), cg (conjugate gradients, for huge P) or auto",
                         flag="--method", type=str)
    rcond: float = option(1e-10, "eigenvalues below rcond times the largest count as zero")
    cg_tol: float | None = option(None, "conjugate gradients' relative residual tolerance")
    cg_max_iter: int = option(500, "conjugate gradients' iteration limit")
    max_gram_bytes: int = option(MAX_GRAM_BYTES, "largest P x P matrix method='auto' forms")
    batch_rows: int | None = option(None, "rows per BLAS batch")
    prior: Prior | None = option(
        None, "lstsq: shrink toward a prior attribution instead of zero: gp (gradient x parameter), loo "
        "(leave-one-out, kept in STORE-loo) or an attributions file; choose the penalty with --ridge-grid auto",
        flag="--prior", type=str)
    prior_scale: bool = option(True, "lstsq: scale the prior per target on the training rows")

    def __post_init__(self) -> None:
        object.__setattr__(self, "prior", as_prior(self.prior))
        if self.prior is not None and (self.refit or self.method == "cg"):
            raise RegressionError("a prior needs method 'gram' (or 'auto') and no refit: its penalty is chosen "
                                  "on the validation rows; drop --refit / --method cg.")
        if not (self.ridge >= 0 and np.isfinite(self.ridge)):
            raise RegressionError(f"ridge must be a finite number >= 0; found {self.ridge}.")
        if self.method not in ("auto", "gram", "cg"):
            raise RegressionError(f"method must be 'auto', 'gram' or 'cg'; found {self.method!r}.")
        if self.cg_max_iter < 1:
            raise RegressionError(f"cg_max_iter must be >= 1; found {self.cg_max_iter}.")


def sums_rows_apart(options: Mapping[str, Any], n_features: int, device: str | None) -> bool:
    """Whether ``lstsq`` with ``options`` can take moments summed apart (row groups on Dask workers,
    added as a tree) and solve once: on the CPU by its Gram path, i.e. ``method="gram"``, or
    ``"auto"`` with the ``P x P`` float64 matrix within ``max_gram_bytes`` (conjugate gradients
    need a pass over the rows per iteration)."""
    if device is not None and not str(device).startswith("cpu"):
        return False
    opts = LstsqOptions(**options)
    P = int(n_features)
    return opts.method == "gram" or (opts.method == "auto" and P * P * 8 <= opts.max_gram_bytes)


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
    device: Any = None,
    progress: ProgressFn | None = None,
    options: LstsqOptions | None = None,
    **kwargs: Any,
) -> SolverResult:
    """Exact least squares (or ridge) with an intercept, streamed over row blocks.

    Solves ``min_{w,b} ||Y - X w - b||^2 + lam ||w||^2`` for each target column
    (the intercept is not penalised).

    Parameters
    ----------
    train, val
        Row sources (see :class:`~coar_dask.solvers.base.RowSource`). ``val``
        is only read for the validation metrics and the choice of the penalty.
    device
        ``"cpu"`` (default) or ``"cuda"``: where the products and the solve run.
    progress
        Called with a :class:`~coar_dask.solvers.base.FitProgress` per batch,
        CG iteration or grid value.
    options, **kwargs
        An :class:`LstsqOptions`, and/or its fields as keywords (``ridge``,
        ``ridge_grid``, ``refit``, ``method``, ``rcond``, ``cg_tol``,
        ``cg_max_iter``, ``max_gram_bytes``, ``batch_rows``).

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
    opts = make_options(LstsqOptions, "lstsq", options, kwargs)
    ridge_grid = opts.ridge_grid
    has_val = val is not None and val.n_rows > 0
    if ridge_grid is not None and not has_val:
        raise RegressionError(
            "choosing the ridge penalty (ridge_grid) needs validation rows; pass num_val > 0 (CLI: --num-val N)."
        )
    if opts.refit and not has_val:
        raise RegressionError("refit=True refits on train + validation rows; pass num_val > 0 (CLI: --num-val N).")
    dev = torch_device(device)
    P = int(train.n_features)
    method = opts.method
    if method == "auto":
        grid = ridge_grid is not None or opts.refit
        method = choose_fit_method(P, int(train.n_targets), memory_budget(dev), grid=grid, device=dev.type,
                                   rows=opts.batch_rows or batch_rows_for(P, int(train.n_targets)),
                                   max_gram_bytes=opts.max_gram_bytes)
    if method == "cg" and opts.prior is not None:
        raise RegressionError(f"a prior needs the Gram method; P = {P} is too large for a P x P matrix here "
                              f"(max_gram_bytes {opts.max_gram_bytes}): fit without --prior or raise it.")
    if method == "cg" and opts.refit and ridge_grid is None:
        ridge_grid = [float(opts.ridge)]  # one candidate: the grid path does the refit
    logger.info("lstsq (%s) on %d rows x %d features -> %d targets, device %s",
                method, train.n_rows, P, train.n_targets, dev)
    if opts.prior is None:
        _warn_underdetermined(int(train.n_rows), P, method, opts.ridge if ridge_grid is None else 0.0)
    solve = _lstsq_gram if method == "gram" else _lstsq_cg
    K = int(train.n_targets)
    step = 2.0 * min(int(train.n_rows), opts.batch_rows or batch_rows_for(P, K)) * P * (P + K)
    with threads_for(step, dev):
        result = solve(train, val if has_val else None, ridge=float(opts.ridge), ridge_grid=ridge_grid,
                       refit=opts.refit, dev=dev, rcond=opts.rcond, cg_tol=opts.cg_tol,
                       cg_max_iter=int(opts.cg_max_iter), rows=opts.batch_rows, progress=progress,
                       prior=_prior_columns(opts.prior, train), prior_scale=opts.prior_scale)
    if opts.prior is not None:
        result.info.update(prior=opts.prior.name, prior_sha256=opts.prior.digest)
    return result


def _prior_columns(prior: Prior | None, train: RowSource) -> np.ndarray | None:
    """The prior's columns for ``train``'s targets (a store's target slice, or all of them)."""
    if prior is None:
        return None
    start, stop = getattr(train, "target_slice", None) or (prior.target_start,
                                                           prior.target_start + int(train.n_targets))
    return prior.columns(int(train.n_features), int(start), int(stop))


def _warn_underdetermined(n: int, P: int, method: str, ridge: float) -> None:
    """Warn (the CLI shows warnings) when fewer rows than unknowns leave many exact fits."""
    if n > P or ridge > 0:
        return
    units = ("minimum-norm solution in mask units (least sum_j w_j^2)" if method == "gram" else
             "minimum-norm solution in standardised units (least sum_j var_j w_j^2, as saga at lambda 0)")
    logger.warning(
        "lstsq: %d training rows for %d components and an intercept: the system is underdetermined and "
        "many weights fit the rows exactly; method %r returns the %s. Build more rows (masks), or use a "
        "ridge penalty (--ridge or --ridge-grid auto) for a unique answer.", n, P, method, units)


def moment_metrics(vm: Moments, weight, bias) -> dict[str, Any]:
    """Validation MSE and Pearson correlation of ``p = x @ weight + bias`` from validation moments
    (no pass over the rows), from centred moments so that no offset cancels: with ``e = y - p``,
    ``sum e^2 = n mean(e)^2 + Cyy - 2 w.Cxy + w^T Cxx w``, ``cov = w.Cxy``, ``var p = w^T Cxx w``.
    A target with no variance in ``p`` or ``y`` gets correlation NaN (counted in
    ``val_correlation_nan``)."""
    n = vm.n
    w, b = weight.double().to(vm.sx.device), bias.double().to(vm.sx.device)
    cxx, cxy = vm.centred()
    cyy = vm.centred_yy()
    mx, my = vm.sx / n, vm.shifted_mean_y()
    mean_e = my - mx @ w - (b - vm.shift)
    wxy = (w * cxy).sum(0)
    wxxw = (w * (cxx @ w)).sum(0)
    del cxx, cxy
    sse = (cyy - 2 * wxy + wxxw).clamp(min=0) + n * mean_e**2
    to_np = lambda t: t.cpu().numpy()  # noqa: E731
    mean_p = to_np(mx @ w + b)
    flat = no_variance(to_np(wxxw / n), 0.0, mean_p) | no_variance(to_np(cyy / n), to_np(my), to_np(vm.shift + my))
    corr = pearson_centred(to_np(wxy / n), to_np(wxxw / n), to_np(cyy / n), flat)
    return {"val_mse": (to_np(sse) / n).tolist(), "val_correlation": corr.tolist(),
            "val_correlation_nan": int(np.isnan(corr).sum())}


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
    """Eigendecomposition of the centred Gram matrix; small ones on one thread
    (see :data:`coar_dask.solvers.base.SMALL_STEP_FLOPS`)."""
    import torch

    with threads_for(float(cxx.shape[0]) ** 3, cxx.device):
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
    with threads_for(float(A.shape[0]) ** 3, A.device):
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


def _shift_to_prior(tm: Moments, vm: Moments | None, prior: np.ndarray, scale: bool, info: dict[str, Any]):
    """Move ``tm`` and ``vm`` to the residual targets ``y - X (c w0)`` (:mod:`coar_dask.solvers.prior`);
    returns ``c w0``."""
    import torch

    w0 = torch.from_numpy(np.asarray(prior, dtype=np.float64)).to(tm.sx.device)
    if scale:
        cxx, cxy = tm.centred()
        c = prior_scale(cxx, cxy, w0)
        del cxx, cxy
        w0 = w0 * c
        info["prior_scale"] = c.cpu().numpy().tolist()
    toward(tm, w0)
    if vm is not None:
        toward(vm, w0)
    return w0


def _lstsq_gram(train, val, *, ridge, ridge_grid, refit, dev, rcond, rows, progress, prior=None, prior_scale=True,
                **_: Any) -> SolverResult:
    import torch

    K = train.n_targets
    tm = stream_moments(train, dev, gram=True, rows=rows, progress=progress)
    vm = None
    if ridge_grid is not None or refit:
        vm = stream_moments(val, dev, gram=True, rows=rows, progress=progress, stage="moments (validation)",
                             precise=True, shift=tm.shift)
    info: dict[str, Any] = {"solver": "lstsq", "method": "gram", "n_train": tm.n, "refit": bool(refit)}
    w0 = None if prior is None else _shift_to_prior(tm, vm, prior, prior_scale, info)
    mx, my = tm.means()
    cxx, cxy = tm.centred(inplace=not refit)  # the refit adds tm's raw sums to vm's
    if ridge_grid is None:
        lam = torch.full((K,), ridge, dtype=torch.float64, device=dev)
        w, info["rank"], info["factorization"] = _direct_solve(cxx, cxy, ridge, rcond)
        del cxx
        b = my - mx @ w
        if w0 is not None:
            w = w + w0  # b = mean(y - X w0) - mx v = my - mx (v + w0)
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
        if w0 is not None:
            w = w + w0
            toward(vm, w0, sign=-1.0)  # back to the outputs themselves, for the metrics
        if not refit:
            return _finish(w, b, lam, info, val, rows=rows, dtype=tm.dtype, metrics=moment_metrics(vm, w, b))
    metrics = moment_metrics(vm, w, b)  # of the train-only fit: held out
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


def _grid_mse(tm: Moments, vm: Moments, evals, evecs, C, grid: list[float], rcond: float,
              progress: ProgressFn | None):
    """Validation MSE ``(len(grid), K)`` of the train fits at each penalty, from moments alone.

    With ``e = y - x w - b`` and ``b = my - mx w`` (train means), ``e = y' - x' w``
    where ``'`` centres at the train means; so ``sum e^2 = sum y'^2 -
    2 diag(w^T X'^T Y') + diag(w^T X'^T X' w)``, and in the eigenbasis
    ``w = V s`` the last two need ``V^T X'^T Y'`` and ``V^T X'^T X' V`` once.
    """
    import torch

    mx, my = tm.sx / tm.n, tm.shifted_mean_y()  # vm shares tm's shift
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
        report(progress, "ridge", i + 1, len(grid), f"penalty {value:.3g}")
    return out


def _cg_tolerance(cg_tol: float | None, dtype: np.dtype | None) -> float:
    if cg_tol is not None:
        if not cg_tol > 0:
            raise RegressionError(f"cg_tol must be > 0; found {cg_tol}.")
        return float(cg_tol)
    return 1e-10 if dtype == np.float64 else 1e-6


class _NormalOperator:
    """``A V = Xc^T Xc V + lam V`` (``Xc``: X centred at the train means), one pass over the rows per call.

    Each batch is centred before the products: ``X^T X V - n mx mx^T V`` in
    float32 cancels most of its digits when masks are mostly ones (at alpha
    0.1 and P = 200 about a thousandfold), enough to stop CG from converging.
    """

    def __init__(self, source: RowSource, m: Moments, dev: Any, rows: int | None):
        P, K = int(source.n_features), int(source.n_targets)  # batches that outweigh the P x K iterate
        self.source, self.m, self.dev, self.rows = source, m, dev, rows or cg_batch_rows(P, K, batch_rows_for(P, K))
        self.mx = m.sx / m.n
        self.passes = 0

    def __call__(self, V, lam):
        import torch

        acc = torch.zeros_like(V)
        with full_precision():
            self._products(acc, V)
        self.passes += 1
        return acc + lam * V

    def _products(self, acc, V) -> None:
        import torch

        for x, _ in iter_batches(self.source, self.rows, reuse=True):
            dt = compute_dtype(x)
            tdt = torch.float64 if dt == np.float64 else torch.float32
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=dt)).to(self.dev)
            xt = xt - self.mx.to(tdt)
            acc += (xt.T @ (xt @ V.to(tdt))).double()


#: A target's conjugate gradients stop when its residual has grown this many times above its best,
#: or has not improved for ``_CG_STALL`` iterations; the best iterate is returned. In float32
#: (and on singular systems, N < P) rounding ends CG's progress and the residual then climbs
#: without bound (7e-6 at iteration 61, 2.7e5 with |w| ~ 6e8 by iteration 500).
_CG_GROWTH = 1e3
_CG_STALL = 50


def _cg(op: _NormalOperator, rhs, lam, diag, x0, tol: float, max_iter: int, progress: ProgressFn | None,
        label: str = ""):
    """Jacobi-preconditioned conjugate gradients, one independent system per column.

    ``lam`` is a per-column penalty ``(K,)``; features with zero variance
    (``diag == 0``) are held at zero. Returns each column's best iterate (the
    smallest residual seen); a column stops at ``tol``, or once its residual
    grows (see :data:`_CG_GROWTH`). Started at zero, the iterates stay in the
    preconditioned Krylov space, so on a singular system (N < P) the result is
    the solution of least *standardised* norm ``sum_j var_j w_j^2``.
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
    best = _BestIterate(x, torch.linalg.vector_norm(r, dim=0) / bnorm)
    it = 0
    for it in range(1, max_iter + 1):
        rel = torch.linalg.vector_norm(r, dim=0) / bnorm
        active = best.update(x, rel, tol)
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
        report(progress, "cg", it, max_iter, f"{label}max rel. residual {float(rel.max()):.2e}")
    best.update(x, torch.linalg.vector_norm(r, dim=0) / bnorm, tol)
    if best.diverged:
        logger.warning("conjugate gradients: the residual of %d target(s) grew after its best (rounding, e.g. "
                       "float32 rows or N < P); returning each target's best iterate", best.diverged)
    return best.x, it, best.rel


class _BestIterate:
    """Each column's iterate with the smallest residual, and which columns are still running."""

    def __init__(self, x, rel):
        import torch

        self.x, self.rel = x.clone(), rel.clone()
        self.stall = torch.zeros_like(rel, dtype=torch.long)
        self.stopped = torch.zeros_like(rel, dtype=torch.bool)
        self.diverged = 0

    def update(self, x, rel, tol: float):
        """Record ``x`` where ``rel`` is a new best; return the columns that should keep iterating."""
        import torch

        better = (rel < self.rel) & ~self.stopped
        if bool(better.any()):
            self.x[:, better] = x[:, better]
            self.rel = torch.where(better, rel, self.rel)
        self.stall = torch.where(better, torch.zeros_like(self.stall), self.stall + 1)
        grew = ~self.stopped & (self.rel > tol) & ((rel > _CG_GROWTH * self.rel) | (self.stall > _CG_STALL))
        self.diverged += int(grew.sum())
        self.stopped |= grew | (self.rel <= tol)
        return ~self.stopped


def _lstsq_cg(train, val, *, ridge, ridge_grid, refit, dev, cg_tol, cg_max_iter, rows, progress, **_: Any) -> SolverResult:
    import torch

    tm = stream_moments(train, dev, gram=False, rows=rows, progress=progress)
    mx, my = tm.means()
    cxy = tm.xy - tm.n * torch.outer(mx, tm.shifted_mean_y())
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
        report(progress, "ridge", i + 1, len(grid), f"penalty {value:.3g}")
    info.update(ridge_grid=list(grid), refit=bool(refit))
    w = best_w
    b = my - mx @ w
    _cg_log(info, total_iters, torch.tensor([worst]), tol)
    if not refit:
        return _finish(w, b, lam, info, val, rows=rows, dtype=tm.dtype)
    pre = SolverResult(w.float().cpu().numpy(), b.float().cpu().numpy(), lam.float().cpu().numpy())
    both_src = ConcatRows(train, val)
    both = stream_moments(both_src, dev, gram=False, rows=rows, progress=progress, stage="moments (refit)")
    mx, my = both.means()
    cxy = both.xy - both.n * torch.outer(mx, both.shifted_mean_y())
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
