"""A bridge to the real fast_l1 package (MadryLab), CUDA only: the seed's own solver.

Options: :class:`FastL1Options` (those of the lasso path, shared with
:func:`coar_dask.solvers.saga.saga`, the same algorithm in torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from coar_dask.errors import MissingDependencyError, RegressionError
from coar_dask.solvers.base import ProgressFn, RowSource, SolverResult, make_options, report
from coar_dask.solvers.saga import LassoPathOptions, check_path_rows, table_nbytes
from coar_dask.solvers.streaming import ConcatRows, EpochRows, validation_metrics

__all__ = ["FastL1Options", "fast_l1", "FAST_L1_INSTALL"]


@dataclass(frozen=True)
class FastL1Options(LassoPathOptions):
    """Settings of :func:`fast_l1`: those of :class:`~coar_dask.solvers.saga.LassoPathOptions`."""


FAST_L1_INSTALL = "pip install git+https://github.com/MadryLab/fast_l1 cupy-cuda12x"


def _import_fast_l1() -> Any:
    try:
        from fast_l1 import regressor  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MissingDependencyError(
            f"solver 'fast_l1' needs the fast_l1 package (and cupy, an NVIDIA GPU), which cannot be imported "
            f"({exc}). Install it with: {FAST_L1_INSTALL} -- or use --solver saga, the same algorithm in torch "
            f"on CPU or GPU."
        ) from None
    return regressor


class _FastL1Loader:
    """What fast_l1 iterates: ``(X, y, idx)`` CUDA tensors in batches of exactly ``batch_size`` rows.

    fast_l1 preallocates its buffers from the first batch, so every batch must
    have that size (the seed's loaders assert the same).
    """

    def __init__(self, source: RowSource, batch_size: int, device: Any, *, seed: int, cache_bytes: int):
        if source.n_rows % batch_size:
            raise RegressionError(
                f"fast_l1 needs a batch size that divides the number of rows ({source.n_rows}); "
                f"{batch_size} does not. Choose batch_size dividing num_train and num_train + num_val "
                f"(as the seed's configs do), or use --solver saga."
            )
        self.device = device
        self.rows = EpochRows(source, batch_size, seed=seed, cache_bytes=cache_bytes)
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        import torch

        self.epoch += 1
        for idx, x, y in self.rows.batches(self.epoch):
            yield (x.to(self.device, torch.float32), y.to(self.device, torch.float32), idx.to(self.device))

    def __len__(self) -> int:
        return -(-self.rows.n // self.rows.batch_size)


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

    Needs fast_l1 (and cupy) importable and a CUDA GPU; otherwise raises
    :class:`~coar_dask.errors.MissingDependencyError` or
    :class:`~coar_dask.errors.RegressionError` saying what to do. The path
    runs on the training rows with validation-based early stopping, then
    fast_l1 refits on train + validation rows at the best penalties, and the
    weights (fast_l1 returns them in standardised units) are converted to
    mask units. Options (:class:`FastL1Options`) as in
    :func:`~coar_dask.solvers.saga.saga`; the batch size must divide the
    numbers of train and train + validation rows.
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
    cfg = make_options(FastL1Options, "fast_l1", options, kwargs)
    has_val = check_path_rows(cfg.k, train, val)
    dev = torch.device(device or "cuda")
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
    stop = dict(early_stop_freq=cfg.early_stop_every, early_stop_eps=cfg.early_stop_eps)
    best = regressor.train_saga(weight, bias, train_loader, val_loader, lr=cfg.lr, start_lams=start,
                                lam_decay=cfg.lam_decay, num_lambdas=cfg.k, **stop)
    stats_loader = train_loader
    lam = best if has_val else start
    if has_val:
        report(progress, "fast_l1", 1, 2, "refit on train + validation")
        full = _FastL1Loader(ConcatRows(train, val), B, dev, seed=cfg.seed + 1, cache_bytes=cfg.cache_bytes)
        regressor.train_saga(weight, bias, full, None, lr=cfg.lr, start_lams=best, lam_decay=1.0, num_lambdas=1,
                             **stop)
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
        info={"solver": "fast_l1", "n_train": n, "batch_size": B, "saga_table_bytes": table_nbytes(n, K)},
    )
    if has_val:
        # fast_l1 returns the refit weights only: these metrics are in-sample for the validation rows.
        result.info.update(validation_metrics(result, val))
        result.info["val_metrics_after_refit"] = 1
    return result
