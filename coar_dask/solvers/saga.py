"""fast_l1's SAGA lasso path, re-implemented in torch for any device; and a bridge to fast_l1 itself.

The seed fits attributions with fast_l1 (MadryLab), a CUDA-only SAGA solver
for L1-regularised least squares. :func:`saga` is the same algorithm in plain
torch, on CPU or GPU:

1. Standardise the features with the training rows' mean and (population)
   standard deviation; constant features are held at zero.
2. For each target k, ``lambda_max[k] = max_j |Xs_j^T (y_k - mean y_k)| / n``
   (the smallest penalty whose lasso solution is all zero) unless a penalty is
   given (the seed's ``manual_max_lambda``; its configs use 0, i.e. plain
   least squares).
3. Minimise ``1/(2n) ||Xs w + b - y||^2 + lam ||w||_1`` by mini-batch SAGA
   with a proximal (soft-threshold) step, per target, along the geometric
   path ``lam_max * eps^(i/k)``, ``i = 0..k-1``. Every ``early_stop_every``
   epochs a target whose weights moved less than ``early_stop_eps`` in the
   last epoch (``max_j sd_j^2 dw_j^2``, fast_l1's glmnet-style criterion),
   and whose bias moved less too (``db^2``), counts one lambda done, its
   validation MSE is recorded, and it moves to the
   next lambda; it stops after ``k`` lambdas, or once its validation MSE got
   worse after at least ``min_lambdas`` lambdas.
4. Refit on train + validation rows at each target's best lambda, warm
   started from the best path weights.
5. Return weights in mask units (``prediction = mask @ weight + bias``).

Differences from fast_l1, on purpose:

- ``lambda_max`` is computed on the standardised features the path is
  solved on (fast_l1 uses the raw masks, which starts the path ``sd_j``
  times lower), from moments of the outputs shifted by a per-target
  reference, so it does not depend on the outputs' offset;
- fast_l1 starts its path at lambda = 0 (plain least squares is a
  candidate there); here the path runs from the first penalty
  (``lambda_max`` or ``max_lambda``) down to ``eps`` times it, and plain
  least squares is ``k=1`` with ``max_lambda=0`` (or ``--solver lstsq``);
- fast_l1 stops a target for a worse validation error only when it has more
  than one nonzero weight; here a worse validation MSE after ``min_lambdas``
  lambdas stops it whatever its number of nonzero weights;
- the bias starts at the training mean of the outputs (the exact bias of
  the standardised problem, whose features have mean zero) instead of 0,
  and the stopping test counts its change (``db^2 < early_stop_eps``) as
  well as the weights' (fast_l1 ignores the bias: with every mask kept and
  outputs averaging 5.01 it returned a bias of 0.71 after 3 epochs);
- validation correlations use shifted sums, and a target whose prediction
  or outputs do not vary gets NaN (fast_l1's one-pass formula gives +-1);
- the refit warm-starts from the best weights rather than the last ones;
- a target left without a converged lambda after ``max_epochs`` keeps its
  current weights and is reported.

Memory: SAGA keeps the last residual of every row and target, a table of
``n x K`` float32 (45,000 x 10,000 is 1.8 GB). It is the only state that grows
with the rows, and it stays in host memory (pinned when the device is CUDA),
or in a memory-mapped temporary file when larger than ``max_table_bytes``:
never on the GPU. Everything else is ``O(P K)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from coar_dask.errors import RegressionError
from coar_dask.solvers.base import (
    ProgressFn,
    RowSource,
    SolverResult,
    make_options,
    option,
    options_dict,
    report,
    threads_for,
    torch_device,
)
from coar_dask.solvers.metrics import pearson_from_sums
from coar_dask.solvers.moments import Moments
from coar_dask.solvers.rows import ConcatRows, EpochRows, iter_batches

__all__ = [
    "LassoPathOptions",
    "SagaOptions",
    "SagaConfig",
    "saga",
    "table_nbytes",
    "lambda_path",
    "auto_lr",
    "parse_max_lambda",
    "check_path_rows",
    "MAX_TABLE_BYTES",
    "CACHE_BYTES",
]

logger = logging.getLogger(__name__)

#: Largest SAGA table kept in RAM by ``table="auto"``; larger ones are memory-mapped files.
MAX_TABLE_BYTES = 4 * 2**30
#: Rows are cached in RAM between epochs (like FFCV's ``os_cache``) when they take less than this.
CACHE_BYTES = 2**30


def parse_max_lambda(value: Any) -> float | str:
    """``"auto"`` or a number, from a flag's text (``--max-lambda``)."""
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RegressionError(f"--max-lambda must be a number or 'auto'; found {value!r}.") from None


def _seed_max_lambda(value: Any) -> float | str:
    """The seed's ``manual_max_lambda``: -1 means each target's lambda_max."""
    return "auto" if value == -1 else float(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class LassoPathOptions:
    """Settings of fast_l1's lasso path, shared by :func:`saga` and :func:`coar_dask.solvers.fast_l1.fast_l1`
    (the seed's regression config, under clearer names).

    Parameters
    ----------
    lr
        Step size (seed: ``cfg.lr``; 1e-3 for CIFAR, 5e-4 for ViT). ``None``
        (default): ``1 / L`` for full-batch steps and ``1 / (3 L)`` for
        mini-batches (SAGA's safe step), ``L = (1 + sqrt(P / B))^2`` the
        largest eigenvalue of a batch's standardised Gram matrix for
        independent masks (:func:`auto_lr`). A fixed 1e-3 needs thousands of
        epochs where the batch is all the rows (digits: 1,000 epochs, no
        target converged).
    k
        Number of penalties on the path (seed: ``cfg.k``).
    eps
        Smallest / largest penalty on the path (seed: ``cfg.eps``).
    max_lambda
        Largest penalty (seed: ``cfg.manual_max_lambda``): a number for every
        target, ``"auto"`` for each target's ``lambda_max``, or ``None``
        (default) for the seed's behaviour: 0 (plain least squares) when
        ``k == 1``, ``lambda_max`` otherwise.
    batch_size
        Rows per SAGA step (seed: ``cfg.batch_size``); default
        ``min(n, 2500)``.
    early_stop_every, early_stop_eps
        Check frequency in epochs and weight-change tolerance (seed:
        ``early_stopping.check_every`` = 3 and ``early_stopping.eps`` = 1e-10).
    seed
        Seed of the row order of each epoch.
    cache_bytes
        Rows are cached in RAM between epochs when they take less than this.
    """

    lr: float | None = option(None, "saga: step size (default: 1/L of a batch's standardised Gram, 1/(3L) for "
                              "mini-batches; seed CIFAR 1e-3, ViT 5e-4)", flag="--lr", seed_key="cfg.lr", type=float)
    k: int = option(1, "saga: number of penalties on the lasso path (seed: 1)", flag="--k", seed_key="cfg.k",
                    type=int)
    eps: float = option(1e-4, "saga: smallest/largest penalty of the path (default 1e-4)", flag="--eps",
                        seed_key="cfg.eps", type=float)
    max_lambda: float | str | None = option(
        None, "saga: largest penalty: a number, or auto (lambda_max per example); default 0 when k=1 (the seed's "
        "manual_max_lambda 0), auto otherwise", flag="--max-lambda", seed_key="cfg.manual_max_lambda", type=str,
        parse=parse_max_lambda, from_seed=_seed_max_lambda)
    batch_size: int | None = option(None, "saga: rows per step (default min(rows, 2500))", flag="--batch-size",
                                    seed_key="cfg.batch_size", type=int)
    early_stop_every: int = option(3, "saga: check convergence every N epochs (seed: 3)", flag="--early-stop-every",
                                   seed_key="early_stopping.check_every", type=int)
    early_stop_eps: float = option(1e-10, "saga: weight-change tolerance (seed: 1e-10)", flag="--early-stop-eps",
                                   seed_key="early_stopping.eps", type=float)
    seed: int = option(0, "seed of each epoch's row order")
    cache_bytes: int = option(CACHE_BYTES, "rows are cached in RAM between epochs below this size")

    def _bad(self, name: str, expected: str) -> RegressionError:
        return RegressionError(f"saga option {name}={getattr(self, name)!r}: expected {expected}.")

    def __post_init__(self) -> None:
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise self._bad("lr", "a step size > 0, e.g. 1e-3 (the seed's CIFAR config)")
        if not _positive_int(self.k):
            raise self._bad("k", "an integer >= 1 (number of penalties on the path)")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps <= 1):
            raise self._bad("eps", "a ratio 0 < eps <= 1 of the smallest to the largest penalty, e.g. 1e-4")
        if self.max_lambda is not None and self.max_lambda != "auto":
            try:
                value = float(self.max_lambda)
            except (TypeError, ValueError):
                raise self._bad("max_lambda", "a number >= 0, 'auto' or None") from None
            if not (np.isfinite(value) and value >= 0):
                raise self._bad("max_lambda", "a number >= 0, 'auto' or None")
        if self.batch_size is not None and (not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1):
            raise self._bad("batch_size", "a positive number of rows, e.g. 2500")
        if not _positive_int(self.early_stop_every):
            raise self._bad("early_stop_every", "an integer >= 1")
        if not (isinstance(self.early_stop_eps, (int, float)) and self.early_stop_eps > 0):
            raise self._bad("early_stop_eps", "a tolerance > 0, e.g. 1e-10 (the seed's)")

    @property
    def lam_decay(self) -> float:
        """Ratio of consecutive penalties on the path: ``eps ** (1 / k)``."""
        return float(np.exp(np.log(self.eps) / self.k))

    def start_mode(self) -> str | float:
        """``"auto"`` (lambda_max per target) or a fixed first penalty."""
        if self.max_lambda is None:
            return 0.0 if self.k == 1 else "auto"
        return "auto" if self.max_lambda == "auto" else float(self.max_lambda)


@dataclass(frozen=True)
class SagaOptions(LassoPathOptions):
    """Settings of :func:`saga`: those of :class:`LassoPathOptions`, and

    Parameters
    ----------
    min_lambdas
        Lambdas tried before a worse validation MSE may stop a target's path
        (fast_l1's ``min_lams_to_try``).
    max_epochs
        Epochs per stage (path, refit) after which unfinished targets stop.
    refit
        Refit on train + validation rows at the chosen penalties (the seed does).
    table
        Where the ``n x K`` table lives: ``"memory"``, ``"disk"`` (a
        memory-mapped file in ``table_dir``) or ``"auto"``.
    table_dir, max_table_bytes
        Directory of a memory-mapped table; largest table ``"auto"`` keeps in RAM.
    """

    min_lambdas: int = option(10, "lambdas tried before a worse validation MSE may stop a path")
    max_epochs: int = option(1000, "saga: epochs per stage before giving up (default 1000)", flag="--max-epochs",
                             type=int)
    refit: bool = option(True, "saga: skip the seed's refit on train + validation rows", flag="--no-refit",
                         action="store_false")
    table: str = option("auto", "where SAGA's rows x targets table lives: auto, memory or disk")
    table_dir: str | None = option(None, "directory of a memory-mapped table")
    max_table_bytes: int = option(MAX_TABLE_BYTES, "largest table kept in RAM by table='auto'")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _positive_int(self.max_epochs):
            raise self._bad("max_epochs", "an integer >= 1")
        if not isinstance(self.min_lambdas, (int, np.integer)) or self.min_lambdas < 0:
            raise self._bad("min_lambdas", "an integer >= 0")
        if self.table not in ("auto", "memory", "disk"):
            raise self._bad("table", "'auto', 'memory' or 'disk'")


#: The former name of :class:`SagaOptions`.
SagaConfig = SagaOptions


def auto_lr(n_features: int, batch_rows: int, n_rows: int) -> float:
    """SAGA's default step on standardised features: ``1 / L`` when a batch is every row (gradient descent),
    ``1 / (3 L)`` for mini-batches, with ``L = (1 + sqrt(P / B))^2`` (largest eigenvalue of ``Xb^T Xb / B``
    for ``B`` rows of ``P`` independent standardised features).

    >>> round(auto_lr(100, 400, 400), 3), round(auto_lr(100, 400, 4000), 3)
    (0.444, 0.148)
    """
    L = (1.0 + np.sqrt(n_features / max(batch_rows, 1))) ** 2
    return float(1.0 / L if batch_rows >= n_rows else 1.0 / (3.0 * L))


def check_path_rows(k: int, train: RowSource, val: RowSource | None) -> bool:
    """Whether ``val`` has rows; raises when a path (``k > 1``) has none to choose its penalties on,
    or ``train`` has no rows."""
    has_val = val is not None and val.n_rows > 0
    if k > 1 and not has_val:
        raise RegressionError(
            f"a lambda path (k={k}) chooses each target's penalty on validation rows; pass num_val > 0 "
            f"(CLI: --num-val N), or k=1 with a fixed max_lambda."
        )
    if int(train.n_rows) == 0:
        raise RegressionError("no rows to fit on: the store has no completed rows in the chosen split.")
    return has_val


def lambda_path(lambda_max: float, k: int, eps: float) -> np.ndarray:
    """The ``k`` penalties the path visits: ``lambda_max * eps ** (i / k)``, ``i = 0..k-1``.

    Like fast_l1, the smallest visited is ``eps ** ((k-1)/k)`` of the largest.

    >>> lambda_path(1.0, 3, 1e-3).round(6).tolist()
    [1.0, 0.1, 0.01]
    """
    decay = np.exp(np.log(eps) / k)
    return float(lambda_max) * decay ** np.arange(k)


def table_nbytes(n_rows: int, n_targets: int) -> int:
    """Bytes of SAGA's residual table: ``n_rows x n_targets`` float32.

    >>> table_nbytes(45_000, 10_000) / 1e9
    1.8
    """
    return 4 * int(n_rows) * int(n_targets)



def _make_table(n: int, K: int, cfg: SagaOptions, dev: Any) -> tuple[Any, Any]:
    """The zeroed ``n x K`` float32 residual table in host memory (or a memory-mapped file),
    and the temporary directory to clean up (or ``None``)."""
    import torch

    nbytes = table_nbytes(n, K)
    where = cfg.table if cfg.table != "auto" else ("memory" if nbytes <= cfg.max_table_bytes else "disk")
    if where == "memory":
        pin = dev.type == "cuda"
        table = torch.zeros(n, K, dtype=torch.float32, pin_memory=pin)
        logger.info("SAGA gradient table: %d rows x %d targets float32 = %.1f MiB in host memory%s",
                    n, K, nbytes / 2**20, " (pinned)" if pin else "")
        return table, None
    tmp = tempfile.TemporaryDirectory(prefix="coar-dask-saga-", dir=cfg.table_dir)
    path = os.path.join(tmp.name, "table.f32")
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, K))
    logger.info("SAGA gradient table: %d rows x %d targets float32 = %.1f MiB, memory-mapped at %s",
                n, K, nbytes / 2**20, path)
    return torch.from_numpy(mm), (tmp, mm)


# --------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------
class _Standardiser:
    """Mean and population standard deviation of the features (and, on demand, lambda_max)."""

    def __init__(self, source: RowSource, dev: Any, need_lambda_max: bool, progress: ProgressFn | None):
        import torch

        m = Moments(source.n_features, source.n_targets, dev, gram=False, xy=need_lambda_max)
        total = int(source.n_rows)
        for x, y in iter_batches(source):
            m.update(x, y)
            report(progress, "moments", m.n, total, f"{m.n}/{total} rows")
        if m.n == 0:
            raise RegressionError("no rows to fit on: the store has no completed rows in the chosen split.")
        self.n = m.n
        mu = m.sx / m.n
        var = torch.clamp(m.dxx / m.n - mu**2, min=0)
        sd = torch.sqrt(var)
        ok = sd > 1e-12 * max(float(sd.max()), 1e-300) if sd.numel() else sd > 0
        self.mu = mu.float()
        # Mean of the outputs: the exact bias of the standardised problem (its features have mean
        # zero on these rows), so SAGA starts its bias there.
        self.ymean = m.means()[1].float()
        self.sd = torch.where(ok, sd, torch.zeros_like(sd)).float()
        self.inv_sd = torch.where(ok, 1.0 / torch.where(ok, sd, torch.ones_like(sd)), torch.zeros_like(sd)).float()
        self.lambda_max = None
        if need_lambda_max:
            ybar = m.shifted_mean_y()  # xy and sy are of the shifted outputs: the centring removes the shift
            inner = (m.xy - m.n * torch.outer(mu, ybar)) * self.inv_sd.double()[:, None]
            self.lambda_max = (inner.abs().max(dim=0).values / m.n).float()

    def apply(self, x):
        import torch

        return (x.to(self.mu.device, torch.float32, non_blocking=True) - self.mu) * self.inv_sd


class _Stage:
    """One run of fast_l1's ``train_saga``: a path of penalties per target, with early stopping.

    Finished targets leave the active set, so later epochs only compute the
    rest (fast_l1 swaps them to the end for the same reason).
    """

    def __init__(self, rows: EpochRows, val: EpochRows | None, std: _Standardiser, W0, b0, lam0, *, num_lambdas: int,
                 lam_decay: float, cfg: SagaOptions, dev: Any, stage: str, progress: ProgressFn | None):
        import torch

        self.rows, self.val, self.std, self.cfg, self.dev = rows, val, std, cfg, dev
        self.stage, self.progress = stage, progress
        self.num_lambdas, self.lam_decay = int(num_lambdas), float(lam_decay)
        P, K = rows.P, rows.K
        self.K = K
        f32 = dict(dtype=torch.float32, device=dev)
        # Results for every target (written when a target improves or finishes).
        self.out_W = W0.clone()
        self.out_b = b0.clone()
        self.out_lam = lam0.clone()
        self.best_mse = torch.full((K,), float("inf"), **f32)
        self.best_corr = torch.full((K,), float("nan"), **f32)
        self.has_best = torch.zeros(K, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(K, dtype=torch.bool, device=dev)
        self.lambdas_done = torch.zeros(K, dtype=torch.long, device=dev)
        # State of the active targets (compacted).
        self.act = torch.arange(K, device=dev)
        self.W = W0.clone()
        self.b = b0.clone()
        self.lam = lam0.clone()
        self.gavg = torch.zeros(P, K, **f32)
        self.bavg = torch.zeros(K, **f32)
        self.last_mse = torch.full((K,), float("inf"), **f32)
        self.epochs = 0

    # -- per batch ---------------------------------------------------------
    def _gather(self, table, idx):
        if self.act.numel() == self.K:
            return table.index_select(0, idx)
        return table[idx[:, None], self.act_cpu[None, :]]

    def _scatter(self, table, idx, r) -> None:
        if self.act.numel() == self.K:
            table.index_copy_(0, idx, r)
        else:
            table[idx[:, None], self.act_cpu[None, :]] = r

    def _epoch(self, table, epoch: int) -> None:
        import torch

        n = float(self.rows.n)
        lr = self.cfg.lr
        thresholds = lr * self.lam
        shrink = bool((thresholds > 0).any())
        cuda = self.dev.type == "cuda"
        all_active = self.act.numel() == self.K
        for idx, xb, yb in self.rows.batches(epoch):
            B = float(idx.shape[0])
            x = self.std.apply(xb)
            y = yb if all_active else yb[:, self.act_cpu]
            y = y.to(self.dev, non_blocking=True)
            a_prev = self._gather(table, idx).to(self.dev, non_blocking=True)
            r = torch.addmm(self.b - y, x, self.W)  # residual x w + b - y
            d = r - a_prev
            G = x.T @ d
            db = d.sum(0)
            # SAGA: step along (this batch's new - old gradient) + average of the table's gradients.
            self.W.add_(G, alpha=-lr / B).add_(self.gavg, alpha=-lr)
            self.b.add_(db, alpha=-lr / B).add_(self.bavg, alpha=-lr)
            self.gavg.add_(G, alpha=1.0 / n)
            self.bavg.add_(db, alpha=1.0 / n)
            if shrink:  # proximal step of the L1 penalty: soft-threshold
                self.W.sub_(torch.clamp(self.W, -thresholds, thresholds))
            self._scatter(table, idx, r.cpu() if cuda else r)

    def _evaluate(self):
        """Validation MSE and Pearson correlation of the active targets (NaN for a target whose
        prediction or outputs do not vary: sums of values shifted by the first row's)."""
        import torch

        Ka = self.act.numel()
        f64 = dict(dtype=torch.float64, device=self.dev)
        sq, sp, sa, spp, saa, spa, scale_p, scale_a = (torch.zeros(Ka, **f64) for _ in range(8))
        n = 0
        cp = ca = None
        all_active = Ka == self.K
        for _, xb, yb in self.val.batches(None):
            x = self.std.apply(xb)
            y = (yb if all_active else yb[:, self.act_cpu]).to(self.dev).double()
            p = torch.addmm(self.b, x, self.W).double()
            if cp is None:
                cp, ca = p[0].clone(), y[0].clone()
            n += x.shape[0]
            sq += ((p - y) ** 2).sum(0)
            scale_p = torch.maximum(scale_p, p.abs().max(0).values)
            scale_a = torch.maximum(scale_a, y.abs().max(0).values)
            p -= cp
            y -= ca
            sp += p.sum(0)
            sa += y.sum(0)
            spp += (p * p).sum(0)
            saa += (y * y).sum(0)
            spa += (p * y).sum(0)
        sums = [t.cpu().numpy() for t in (sp, sa, spp, saa, spa, scale_p, scale_a)]
        corr = torch.from_numpy(pearson_from_sums(n, *sums)).to(self.dev)
        return (sq / max(n, 1)).float(), corr.float()

    def _keep(self, keep) -> None:
        """Drop the targets not in ``keep`` (a bool mask over the active ones) from the state."""
        self.act = self.act[keep]
        self.act_cpu = self.act.cpu()
        self.W = self.W[:, keep].contiguous()
        self.gavg = self.gavg[:, keep].contiguous()
        for name in ("b", "lam", "bavg", "last_mse"):
            setattr(self, name, getattr(self, name)[keep].contiguous())

    def _record(self, mask, mse=None, corr=None) -> None:
        """Write the current state of the active targets in ``mask`` as their result."""
        cols = self.act[mask]
        self.out_W[:, cols] = self.W[:, mask]
        self.out_b[cols] = self.b[mask]
        self.out_lam[cols] = self.lam[mask]
        self.has_best[cols] = True
        if mse is not None:
            self.best_mse[cols] = mse[mask]
            self.best_corr[cols] = corr[mask]

    def run(self, table) -> None:
        import torch

        cfg = self.cfg
        self.act_cpu = self.act.cpu()
        sd2 = (self.std.sd**2)[:, None]
        every = cfg.early_stop_every
        for t in range(cfg.max_epochs):
            prev, prev_b = self.W.clone(), self.b.clone()
            self._epoch(table, t)
            self.epochs = t + 1
            prev.sub_(self.W).pow_(2).mul_(sd2)
            # The bias's change counts too (fast_l1 ignores it): a bias still moving is not converged.
            done_inner = (prev_b - self.b) ** 2 < cfg.early_stop_eps
            if prev.shape[0]:
                done_inner &= prev.max(dim=0).values < cfg.early_stop_eps
            del prev, prev_b
            if t % every == every - 1:
                cols = self.act
                self.lambdas_done[cols] += done_inner.long()
                finished = self.lambdas_done[cols] == self.num_lambdas
                if self.val is not None:
                    mse, corr = self._evaluate()
                    got_worse = (mse > self.last_mse) & (self.lambdas_done[cols] >= cfg.min_lambdas)
                    better = (mse <= self.best_mse[cols]) & done_inner
                    self._record(better, mse, corr)
                else:
                    got_worse = torch.ones_like(done_inner)
                    self._record(done_inner)  # no validation rows: the last converged lambda is the result
                finished |= got_worse & done_inner
                if self.val is not None:
                    self.last_mse = torch.where(done_inner, mse, self.last_mse)
                self.converged[cols[finished]] = True
                self.lam = torch.where(done_inner & ~finished, self.lam * self.lam_decay, self.lam)
                if bool(finished.any()):
                    self._keep(~finished)
            self._progress()
            if self.act.numel() == 0:
                break
        if self.act.numel():
            self._give_up()

    def _give_up(self) -> None:
        """``max_epochs`` reached: unfinished targets without a result keep their current weights."""
        import torch

        logger.warning(
            "SAGA (%s) stopped at max_epochs=%d with %d of %d targets not converged (weights moved more than "
            "early_stop_eps=%.1e in the last epoch); raise max_epochs or lr, or use --solver lstsq for plain "
            "least squares", self.stage, self.cfg.max_epochs, self.act.numel(), self.K, self.cfg.early_stop_eps)
        missing = ~self.has_best[self.act]
        if self.val is not None:
            mse, corr = self._evaluate()
            self._record(missing, mse, corr)
        else:
            self._record(missing)
        self._keep(torch.zeros(self.act.numel(), dtype=torch.bool, device=self.dev))

    def _progress(self) -> None:
        if self.progress is None:
            return
        done = self.K - self.act.numel()
        mean_l = float(self.lambdas_done.float().mean()) if self.K else 0.0
        report(self.progress, self.stage, self.epochs, self.cfg.max_epochs,
               f"epoch {self.epochs}, {mean_l:.1f}/{self.num_lambdas} lambdas, {done}/{self.K} targets done")


def saga(
    train: RowSource,
    val: RowSource | None = None,
    *,
    device: Any = None,
    progress: ProgressFn | None = None,
    options: SagaOptions | None = None,
    **kwargs: Any,
) -> SolverResult:
    """fast_l1's SAGA lasso path with per-target early stopping, in torch on ``device``.

    ``options`` (a :class:`SagaOptions`) and/or its fields as keywords: the
    seed's regression config (``lr``, ``k``, ``eps``, ``max_lambda`` =
    ``manual_max_lambda``, ``batch_size``, ``early_stop_every`` =
    ``check_every``, ``early_stop_eps``) and SAGA's own; see the module
    docstring for the algorithm.

    Returns
    -------
    SolverResult
        ``weight`` (P, K) in mask units, ``bias`` (K,), ``lam`` (K,): each
        target's chosen penalty, in the units of the standardised problem
        ``1/(2n) ||Xs w + b - y||^2 + lam ||w||_1`` (as fast_l1's ``lam``).
        ``info`` holds ``val_mse`` and ``val_correlation`` of the path's fit
        at that penalty (before the refit, so they are held-out figures),
        epochs, convergence counts and the table size.

    Raises
    ------
    RegressionError
        On bad options, or ``k > 1`` without validation rows (the path's
        penalty is chosen on them).

    Examples
    --------
    >>> res = saga(train_rows, val_rows, k=20, eps=1e-3, lr=0.05)   # doctest: +SKIP
    """
    import torch

    cfg = make_options(SagaOptions, "saga", options, kwargs)
    dev = torch_device(device)
    has_val = check_path_rows(cfg.k, train, val)
    n, P, K = int(train.n_rows), int(train.n_features), int(train.n_targets)
    B = int(min(cfg.batch_size or 2500, n))
    auto_step = cfg.lr is None
    if auto_step:
        cfg = dataclasses.replace(cfg, lr=auto_lr(P, B, n))
    mode = cfg.start_mode()
    std = _Standardiser(train, dev, mode == "auto", progress)
    if mode == "auto":
        lam0 = std.lambda_max.clone()
    else:
        lam0 = torch.full((K,), float(mode), dtype=torch.float32, device=dev)
    info: dict[str, Any] = {
        "solver": "saga", "n_train": n, "batch_size": B,
        "saga_table_bytes": table_nbytes(n, K),
        "saga_config": options_dict(cfg),
        "lambda_start_mean": float(lam0.mean()) if K else 0.0,
    }
    logger.info("SAGA on %d rows x %d features -> %d targets (batch %d, lr %g, k=%d, eps %g, %s), device %s; "
                "gradient table %.1f MiB in host memory", n, P, K, B, cfg.lr, cfg.k, cfg.eps,
                "lambda_max per target" if mode == "auto" else f"lambda {mode:g}", dev, table_nbytes(n, K) / 2**20)
    rows = EpochRows(train, B, seed=cfg.seed, cache_bytes=cfg.cache_bytes)
    vrows = EpochRows(val, B, seed=cfg.seed, cache_bytes=cfg.cache_bytes) if has_val else None
    W0 = torch.zeros(P, K, dtype=torch.float32, device=dev)
    b0 = std.ymean.clone()
    path = _Stage(rows, vrows, std, W0, b0, lam0, num_lambdas=cfg.k, lam_decay=cfg.lam_decay, cfg=cfg, dev=dev,
                  stage="saga", progress=progress)
    _run_stage(path, n, B, cfg, dev)
    info.update(saga_epochs=path.epochs, saga_converged=int(path.converged.sum()),
                lambdas_done_mean=float(path.lambdas_done.float().mean()) if K else 0.0)
    if has_val:
        info["val_mse"] = path.best_mse.double().cpu().tolist()
        info["val_correlation"] = path.best_corr.double().cpu().tolist()
        info["val_correlation_nan"] = int(torch.isnan(path.best_corr).sum())
    W, b, lam = path.out_W, path.out_b, path.out_lam
    del rows, path
    if has_val and cfg.refit:
        if auto_step:
            cfg = dataclasses.replace(cfg, lr=auto_lr(P, min(B, n + val.n_rows), n + val.n_rows))
        W, b, std = _refit(ConcatRows(train, val), std, W, b, lam, B, cfg, dev, progress, info)
    return _mask_units(W, b, lam, std, info)


def _run_stage(stage: _Stage, n: int, B: int, cfg: SagaOptions, dev: Any) -> None:
    """Run one stage with its ``n x K`` table, removed afterwards."""
    table_, tmp = _make_table(n, stage.K, cfg, dev)
    try:
        with threads_for(4.0 * B * stage.rows.P * stage.K, dev):
            stage.run(table_)
    finally:
        del table_
        _cleanup(tmp)


def _refit(both: ConcatRows, std: _Standardiser, W, b, lam, B: int, cfg: SagaOptions, dev: Any,
           progress: ProgressFn | None, info: dict[str, Any]) -> tuple[Any, Any, _Standardiser]:
    """The seed's refit on train + validation rows at the chosen penalties, warm started from the path's weights
    (re-expressed in the standardisation of all the rows)."""
    std2 = _Standardiser(both, dev, False, progress)
    w_mask = W * std.inv_sd[:, None]
    W2 = w_mask * std2.sd[:, None]
    b2 = b - std.mu @ w_mask + std2.mu @ w_mask
    rows2 = EpochRows(both, min(B, both.n_rows), seed=cfg.seed + 1, cache_bytes=cfg.cache_bytes)
    stage = _Stage(rows2, None, std2, W2, b2, lam, num_lambdas=1, lam_decay=1.0, cfg=cfg, dev=dev,
                   stage="saga-refit", progress=progress)
    _run_stage(stage, both.n_rows, B, cfg, dev)
    info.update(n_refit=both.n_rows, saga_refit_epochs=stage.epochs, saga_refit_converged=int(stage.converged.sum()))
    return stage.out_W, stage.out_b, std2


def _mask_units(W, b, lam, std: _Standardiser, info: dict[str, Any]) -> SolverResult:
    """Weights of the standardised problem back in mask units."""
    w_mask = W * std.inv_sd[:, None]
    b_mask = b - std.mu @ w_mask
    return SolverResult(
        weight=np.ascontiguousarray(w_mask.cpu().numpy(), dtype=np.float32),
        bias=np.ascontiguousarray(b_mask.cpu().numpy(), dtype=np.float32),
        lam=np.ascontiguousarray(lam.cpu().numpy(), dtype=np.float32),
        info=info,
    )


def _cleanup(tmp: Any) -> None:
    if tmp is not None:
        directory, mm = tmp
        del mm
        directory.cleanup()
