"""Row-parallel least squares: moments of row groups on the workers, summed as a tree, one solve.

With P small and rows many (CIFAR: P = 2,304, 50,000 rows) a least-squares
fit is bound by reading and decoding rows. Its sufficient statistics --
``n``, ``sum x``, ``sum y'``, ``sum y'^2``, ``X^T X`` and ``X^T Y'``, with
``y' = y - shift`` as :class:`~coar_dask.solvers.moments.Moments` keeps
them -- add up over rows, so each Dask task sums one contiguous group of
blocks (:func:`group_moments`), the partial sums are added pairwise on the
workers (:func:`coar_dask.runtime.executor.reduce_tasks`), and the client
solves once with the ``lstsq`` solver's Gram path, exactly as in-process
(:func:`coar_dask.fit.core.solve` with the summed moments in place of the
training rows). Every group uses the shift of the training rows' first
batch, the one an in-process fit takes, so the result equals the in-process
fit to float rounding (the float32 batch products are grouped differently).

The choice against target slices is the plan's
(:func:`coar_dask.fit.plan.plan_fit`), by the solver's registry entry
(``row_parallel``): for ``lstsq``, on the CPU with its method ``gram`` (or
``auto`` with the ``P x P`` matrix within ``max_gram_bytes``); otherwise target
slices, each streaming every row (conjugate gradients need many passes over
the rows; SAGA's state is per target).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from coar_dask.core.store import Store, open_store
from coar_dask.errors import CoarError, RegressionError
from coar_dask.fit.core import FitPart, solve
from coar_dask.fit.plan import FitPlan
from coar_dask.fit.rows import StoreRows
from coar_dask.runtime.executor import TaskSet, reduce_tasks
from coar_dask.solvers.base import FitProgress
from coar_dask.solvers.moments import (Moments, PrecomputedRows, add_states, constant_columns, first_batch_shift,
                                      stream_moments)

__all__ = ["plan_row_groups", "group_moments", "execute_rows", "GROUPS_PER_THREAD"]

logger = logging.getLogger(__name__)

#: Row groups per worker thread. Each partial sum is ``8 (P^2 + P K)`` bytes
#: (60 MB at P = 2,304, K = 1,000) and every pairwise sum moves one between
#: workers, so more groups cost more than the balance they buy.
GROUPS_PER_THREAD = 1


def plan_row_groups(rows: np.ndarray, rows_per_chunk: int, groups: int) -> list[np.ndarray]:
    """Split sorted ``rows`` into at most ``groups`` contiguous groups that never split a block.

    Examples
    --------
    >>> [g.tolist() for g in plan_row_groups(np.array([0, 1, 5, 6, 11, 12]), 5, 2)]
    [[0, 1, 5, 6], [11, 12]]
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return []
    block_ids = rows // int(rows_per_chunk)
    starts = np.flatnonzero(np.r_[True, np.diff(block_ids) > 0])  # first row of each block
    parts = np.array_split(starts, min(int(groups), starts.size))
    return [rows[p[0]: (nxt[0] if nxt.size else rows.size)] for p, nxt in zip(parts, parts[1:] + [np.array([])])]


def group_moments(plan: FitPlan, rows: np.ndarray, shift: np.ndarray) -> dict[str, Any]:
    """The task: :meth:`Moments.state` of ``rows`` of the plan's store (every block digest-checked),
    in ``shift``'s frame."""
    import torch

    s = plan.settings
    store = open_store(plan.store_path, read_only=True)
    source = StoreRows(store, rows, s.x_name, s.y_name, plan.target_range)
    m = stream_moments(source, torch.device("cpu"), gram=True, rows=s.options.get("batch_rows"), progress=None,
                       shift=shift)
    return m.state()


def _summed(plan: FitPlan, train: StoreRows, client: Any, groups: int,
            progress: Callable[[Any], None] | None) -> PrecomputedRows:
    """``train`` with its moments summed in ``groups`` row groups on ``client`` (here without one)."""
    import torch

    batch = plan.settings.options.get("batch_rows")
    shift = first_batch_shift(train, batch)
    parts = plan_row_groups(train.rows, train.store.rows_per_chunk, groups)
    tasks = TaskSet(group_moments, [(i, (plan, g, shift)) for i, g in enumerate(parts)],
                    key=lambda i: f"coar-moments-{i}-{plan.token}", retries=1)
    done = {"rows": 0, "groups": 0}

    def on_done(index: int) -> None:  # rows streamed, like an in-process fit's "moments" stage
        done["rows"] += len(parts[index])
        done["groups"] += 1
        if progress:
            progress(FitProgress("moments", done["rows"], int(train.n_rows), plan.target_range,
                                 f"{done['groups']}/{len(parts)} row groups on the workers"))

    try:
        state = reduce_tasks(tasks, add_states, client, on_done=on_done)
    except CoarError:
        raise
    except Exception as exc:  # noqa: BLE001 - a task's own error, raised again on the client
        raise RegressionError(f"summing the moments of {len(parts)} row groups failed on the cluster "
                              f"({type(exc).__name__}: {exc}); fit in target slices (slices=N) to "
                              f"see which rows, or without a client.") from exc
    summed = PrecomputedRows(train, Moments.from_state(state, torch.device("cpu")))
    summed.constant = constant_columns(summed.moments)  # read by solve, before the solver centres the sums
    return summed


def execute_rows(plan: FitPlan, client: Any | None = None, *, progress: Callable[[Any], None] | None = None,
                 groups: int | None = None, store: Store | None = None) -> FitPart:
    """Run a ``"rows"`` plan: the training rows' moments summed on ``client``'s workers (in this process
    without a client), then one solve here.

    ``groups``: row groups (tasks); default :data:`GROUPS_PER_THREAD` per worker thread.

    Examples
    --------
    >>> plan = plan_fit("store", FitSettings(num_val=500), client=client, execution="rows")  # doctest: +SKIP
    >>> part = execute_rows(plan, client)                                                    # doctest: +SKIP
    """
    if plan.execution != "rows":
        raise RegressionError(f"execute_rows runs a plan whose execution is 'rows'; this one's is {plan.execution!r}.")
    if groups is None:
        threads = sum(client.nthreads().values()) if client is not None else 1
        groups = GROUPS_PER_THREAD * max(threads, 1)
    logger.info("%r", plan)
    store = store if store is not None else open_store(plan.store_path, read_only=True)
    part = solve(plan, plan.target_range, progress, store=store,
                 prepare=lambda train: _summed(plan, train, client, groups, progress))
    n_groups = len(plan_row_groups(plan.train_rows, store.rows_per_chunk, groups))
    part.result.info.update(parallel="rows", row_groups=n_groups)
    return part
