"""A bridge to the real fast_l1 package (MadryLab), CUDA only: the seed's own solver.

Options: :class:`FastL1Options` (those of the lasso path, shared with
:func:`coar_dask.solvers.saga.saga`, the same algorithm in torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from coar_dask.errors import MissingDependencyError, RegressionError
from coar_dask.solvers.base import ProgressFn, RowSource, SolverResult, make_options, option, report, torch_device
from coar_dask.solvers.saga import LassoPathOptions, check_path_rows, table_nbytes
from coar_dask.solvers.metrics import validation_metrics
from coar_dask.solvers.rows import ConcatRows, EpochRows

logger = logging.getLogger(__name__)

__all__ = ["FastL1Options", "fast_l1", "FAST_L1_INSTALL", "fast_l1_install", "FAST_L1_PATCH", "check_fast_l1_patched"]


@dataclass(frozen=True)
class FastL1Options(LassoPathOptions):
    """Settings of :func:`fast_l1`: those of :class:`~coar_dask.solvers.saga.LassoPathOptions`, and

    Parameters
    ----------
    max_epochs
        Epochs per stage (path, refit) after which fast_l1 is stopped (its own
        loop has no bound): the targets keep their current weights and the
        best penalties found so far.
    """

    max_epochs: int = option(1000, "saga: epochs per stage before giving up (default 1000)", flag="--max-epochs",
                             type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, (int, np.integer)) \
                or self.max_epochs < 1:
            raise self._bad("max_epochs", "an integer >= 1")


FAST_L1_INSTALL = "pip install git+https://github.com/MadryLab/fast_l1 cupy-cuda{major}x"


def fast_l1_install(cuda: str | None = None) -> str:
    """The install command for fast_l1 and the cupy wheel matching ``cuda`` (default: the CUDA
    torch was built for, ``torch.version.cuda``): CUDA 12.x -> ``cupy-cuda12x``, 13.x -> ``cupy-cuda13x``.

    >>> fast_l1_install("13.0")
    'pip install git+https://github.com/MadryLab/fast_l1 cupy-cuda13x'
    """
    if cuda is None:
        import torch

        cuda = torch.version.cuda
    if not cuda:
        return (FAST_L1_INSTALL.format(major="<N>") + " (cupy for your CUDA major version N; this torch is a "
                "CPU build, and fast_l1 needs a CUDA build of torch)")
    return FAST_L1_INSTALL.format(major=str(cuda).split(".")[0])

#: The line of fast_l1's ``train_saga`` (regressor.py, at its first early-stop check) that indexes a CPU
#: tensor with a CUDA mask, which current PyTorch refuses, and its fix; and the table lookup that needs
#: CPU indices (this bridge feeds them, so only a caller passing CUDA ``idx`` needs the second fix).
FAST_L1_PATCH = (
    ("inds_to_swap = inds_to_swap[still_opt_outer[inds_to_swap]]",
     "inds_to_swap = inds_to_swap[still_opt_outer[inds_to_swap].cpu()]"),
    ("a_table[idx, :num_keep]", "a_table[idx.cpu(), :num_keep]"),
)


def check_fast_l1_patched(regressor: Any) -> None:
    """Refuse an unpatched fast_l1, whose ``train_saga`` fails at its first early-stop check on current
    PyTorch ("indices should be either on cpu or on the same device as the indexed tensor"), after the
    whole first stretch of epochs; say which two lines to change (MadryLab/datamodels#3)."""
    import inspect

    try:
        source = inspect.getsource(regressor.train_saga)
    except (OSError, TypeError, AttributeError):
        return  # no source to read (a compiled or patched build): let it run
    if FAST_L1_PATCH[0][0] not in " ".join(source.split()):
        return
    fixes = "; ".join(f"'{old}' -> '{new}'" for old, new in FAST_L1_PATCH)
    raise RegressionError(
        f"the installed fast_l1 ({getattr(regressor, '__file__', 'fast_l1/regressor.py')}) indexes a CPU tensor "
        f"with a CUDA mask in train_saga, which current PyTorch refuses at its first early-stop check; patch its "
        f"two lines in train_saga: {fixes} -- or use --solver saga, the same algorithm in torch."
    )


class _EpochBound(KeyboardInterrupt):
    """Raised by the loader when fast_l1 starts one epoch too many.

    fast_l1's ``train_saga`` loops until every target is done, with no bound;
    the only way out it offers is ``KeyboardInterrupt``, after which it
    un-permutes its columns and returns the best penalties found. A subclass
    tells the bound from a real Ctrl-C.
    """


def _import_fast_l1() -> Any:
    try:
        from fast_l1 import regressor  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MissingDependencyError(
            f"solver 'fast_l1' needs the fast_l1 package (and cupy, an NVIDIA GPU), which cannot be imported "
            f"({exc}). Install it with: {fast_l1_install()} -- or use --solver saga, the same algorithm in torch "
            f"on CPU or GPU."
        ) from None
    return regressor


class _FastL1Loader:
    """What fast_l1 iterates: ``(X, y, idx)`` CUDA tensors in batches of exactly ``batch_size`` rows.

    fast_l1 preallocates its buffers from the first batch, so every batch must
    have that size (the seed's loaders assert the same).
    """

    #: Passes ``train_saga`` makes over its loader before its first epoch (``get_num_examples``, ``next(iter())``
    #: for the shapes, ``calc_stats``).
    SETUP_PASSES = 3

    def __init__(self, source: RowSource, batch_size: int, device: Any, *, seed: int, cache_bytes: int,
                 max_epochs: int | None = None):
        if source.n_rows % batch_size:
            raise RegressionError(
                f"fast_l1 needs a batch size that divides the number of rows ({source.n_rows}); "
                f"{batch_size} does not. Choose batch_size dividing num_train and num_train + num_val "
                f"(as the seed's configs do), or use --solver saga."
            )
        self.device = device
        self.rows = EpochRows(source, batch_size, seed=seed, cache_bytes=cache_bytes)
        self.epoch = 0
        self.max_epochs = max_epochs
        self.bound_hit = False

    def bound(self, max_epochs: int | None) -> "_FastL1Loader":
        """Count passes from now on, and stop ``train_saga`` after ``max_epochs`` epochs (``None``: no bound)."""
        self.epoch, self.max_epochs, self.bound_hit = 0, max_epochs, False
        return self

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        import torch

        self.epoch += 1
        if self.max_epochs is not None and self.epoch > self.max_epochs + self.SETUP_PASSES:
            self.bound_hit = True
            raise _EpochBound
        for idx, x, y in self.rows.batches(self.epoch):
            # idx stays on the CPU: fast_l1 indexes its pinned host table with it
            yield (x.to(self.device, torch.float32), y.to(self.device, torch.float32), idx.cpu())

    def __len__(self) -> int:
        return -(-self.rows.n // self.rows.batch_size)


def run_train_saga(regressor: Any, weight: Any, bias: Any, loader: _FastL1Loader, val_loader: Any, *,
                   max_epochs: int, **kwargs: Any) -> tuple[Any, bool]:
    """``regressor.train_saga`` stopped after ``max_epochs`` epochs; returns ``(best_lambdas, stopped)``."""
    loader.bound(max_epochs)
    if val_loader is not None:
        val_loader.bound(None)
    best = regressor.train_saga(weight, bias, loader, val_loader, **kwargs)
    stopped = loader.bound_hit
    loader.bound(None)
    if stopped:
        logger.warning("fast_l1 stopped at max_epochs=%d before every target finished its path; raise "
                       "max_epochs (--max-epochs) or lr, or use --solver lstsq for plain least squares", max_epochs)
    return best, stopped


def fast_l1(
    train: RowSource,
    val: RowSource | None = None,
    *,
    device: Any = None,
    progress: ProgressFn | None = None,
    options: FastL1Options | None = None,
    **kwargs: Any,
) -> SolverResult:
    """Fit with the real fast_l1 package, as the seed's ``run_regression.py`` does.

    Needs fast_l1 (and cupy) importable, patched for current PyTorch (see
    :func:`check_fast_l1_patched`), and a CUDA GPU; otherwise raises
    :class:`~coar_dask.errors.MissingDependencyError` or
    :class:`~coar_dask.errors.RegressionError` saying what to do. The path
    runs on the training rows with validation-based early stopping, then
    fast_l1 refits on train + validation rows at the best penalties, and the
    weights (fast_l1 returns them in standardised units) are converted to
    mask units. Each stage stops after ``max_epochs`` epochs. Options
    (:class:`FastL1Options`) as in :func:`~coar_dask.solvers.saga.saga`; the
    batch size must divide the numbers of train and train + validation rows.
    """
    import torch

    regressor = _import_fast_l1()
    if not torch.cuda.is_available():
        raise RegressionError(
            "solver 'fast_l1' runs only on an NVIDIA GPU (it uses cupy kernels), and torch sees no CUDA device. "
            "Use --solver saga (the same algorithm, on CPU) or --solver lstsq."
        )
    if device is not None and torch.device(device).type != "cuda":
        raise RegressionError(f"solver 'fast_l1' runs only on CUDA; device={device!r} was asked for. Use --device cuda.")
    check_fast_l1_patched(regressor)
    cfg = make_options(FastL1Options, "fast_l1", options, kwargs)
    has_val = check_path_rows(cfg.k, train, val)
    dev = torch_device(device or "cuda")  # cuda:N remapped on a process that sees one GPU
    if dev.index is not None:
        torch.cuda.set_device(dev)  # fast_l1's cupy kernels and buffers use the current device: make it ours
    n, P, K = int(train.n_rows), int(train.n_features), int(train.n_targets)
    B = int(min(cfg.batch_size or 2500, n))
    loader = dict(seed=cfg.seed, cache_bytes=cfg.cache_bytes)
    train_loader = _FastL1Loader(train, B, dev, **loader)
    val_loader = _FastL1Loader(val, B, dev, **loader) if has_val else None
    mode = cfg.start_mode()
    if mode == "auto":
        start = regressor.calc_max_lambda(train_loader)
    else:
        start = torch.full((K,), float(mode), dtype=torch.float32, device=dev)
    weight = torch.zeros(P, K, dtype=torch.float32, device=dev)
    bias = torch.zeros(K, dtype=torch.float32, device=dev)
    report(progress, "fast_l1", 0, 2 if has_val else 1, "lambda path")
    stop = dict(early_stop_freq=cfg.early_stop_every, early_stop_eps=cfg.early_stop_eps, max_epochs=cfg.max_epochs)
    best, stopped = run_train_saga(regressor, weight, bias, train_loader, val_loader, lr=cfg.lr or 1e-3, start_lams=start,
                                   lam_decay=cfg.lam_decay, num_lambdas=cfg.k, **stop)
    stats_loader = train_loader
    lam = best if has_val else start
    if has_val:
        report(progress, "fast_l1", 1, 2, "refit on train + validation")
        full = _FastL1Loader(ConcatRows(train, val), B, dev, seed=cfg.seed + 1, cache_bytes=cfg.cache_bytes)
        stopped |= run_train_saga(regressor, weight, bias, full, None, lr=cfg.lr or 1e-3, start_lams=best, lam_decay=1.0,
                                  num_lambdas=1, **stop)[1]
        stats_loader = full
    mu, sd = regressor.calc_stats(stats_loader)
    mu, sd = mu.float().to(dev), sd.float().to(dev)
    w_mask = torch.where(sd[:, None] > 0, weight / torch.where(sd > 0, sd, torch.ones_like(sd))[:, None],
                         torch.zeros_like(weight))
    b_mask = bias - mu @ w_mask
    report(progress, "fast_l1", 2 if has_val else 1, 2 if has_val else 1, "done")
    result = SolverResult(
        weight=np.ascontiguousarray(w_mask.cpu().numpy(), dtype=np.float32),
        bias=np.ascontiguousarray(b_mask.cpu().numpy(), dtype=np.float32),
        lam=np.ascontiguousarray(torch.as_tensor(lam).float().cpu().numpy().reshape(-1), dtype=np.float32),
        info={"solver": "fast_l1", "n_train": n, "batch_size": B, "saga_table_bytes": table_nbytes(n, K),
              "fast_l1_max_epochs_reached": int(stopped)},
    )
    if has_val:
        # fast_l1 returns the refit weights only: these metrics are in-sample for the validation rows.
        result.info.update(validation_metrics(result, val))
        result.info["val_metrics_after_refit"] = 1
    return result
