"""Row-parallel least squares: moments of row groups on the workers, summed as a tree, one solve.

With P small and rows many (CIFAR: P = 2,304, 50,000 rows) a least-squares
fit is bound by reading and decoding rows. Its sufficient statistics --
``n``, ``sum x``, ``sum y'``, ``sum y'^2``, ``X^T X`` and ``X^T Y'``, with
``y' = y - shift`` as :class:`~coar_dask.solvers.moments.Moments` keeps
them -- add up over rows, so each Dask task sums one contiguous group of
blocks (:func:`group_moments`), the partial sums are added pairwise on the
workers (:func:`coar_dask.runtime.executor.reduce_tasks`), and the client
solves once with the ``lstsq`` solver's Gram path, exactly as in-process
(:func:`coar_dask.fit.core.fit_store` with the summed moments in place of the
training rows). Every group uses the shift of the training rows' first
batch, the one an in-process fit takes, so the result equals the in-process
fit to float rounding (the float32 batch products are grouped differently).

The choice against target slices (:func:`rows_parallel_fits`): row groups when
the solver is ``lstsq`` on the CPU and its method is (or ``auto`` resolves
to) ``gram`` -- the ``P x P`` matrix fits in ``max_gram_bytes``; otherwise
target slices, each streaming every row (conjugate gradients need many passes
over the rows; SAGA's state is per target).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from coar_dask.core.store import Store, open_store
from coar_dask.errors import CoarError, RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.core import FitSettings, fit_store
from coar_dask.fit.rows import StoreRows
from coar_dask.runtime.executor import TaskSet, reduce_tasks
from coar_dask.solvers.base import FitProgress
from coar_dask.solvers.lstsq import LstsqOptions
from coar_dask.solvers.moments import Moments, PrecomputedRows, add_states, first_batch_shift, stream_moments

__all__ = ["rows_parallel_fits", "plan_row_groups", "group_moments", "fit_rows_parallel"]

logger = logging.getLogger(__name__)

#: Row groups per worker thread. Each partial sum is ``8 (P^2 + P K)`` bytes
#: (60 MB at P = 2,304, K = 1,000) and every pairwise sum moves one between
#: workers, so more groups cost more than the balance they buy.
GROUPS_PER_THREAD = 1


def rows_parallel_fits(store: Store, settings: FitSettings) -> bool:
    """Whether ``settings`` on ``store`` can be fitted row-parallel: ``lstsq`` on the CPU by its Gram path."""
    if settings.solver != "lstsq" or (settings.device and not str(settings.device).startswith("cpu")):
        return False
    opts = LstsqOptions(**settings.options)
    s = settings.resolve(store)
    P = int(np.prod(store.spec[s.x_name].shape))
    return opts.method == "gram" or (opts.method == "auto" and P * P * 8 <= opts.max_gram_bytes)


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


def group_moments(store_path: str, settings: FitSettings, rows: np.ndarray, shift: np.ndarray) -> dict[str, Any]:
    """The task: :meth:`Moments.state` of ``rows`` of the store (every block digest-checked), in ``shift``'s frame."""
    import torch

    store = open_store(store_path, read_only=True)
    source = StoreRows(store, rows, settings.x_name, settings.y_name, settings.target_slice)
    batch = settings.options.get("batch_rows")
    m = stream_moments(source, torch.device("cpu"), gram=True, rows=batch, progress=None, shift=shift)
    return m.state()


def _token(store: Store, settings: FitSettings) -> str:
    import hashlib

    return hashlib.sha256(f"{store.path}{settings!r}".encode()).hexdigest()[:10]


def fit_rows_parallel(store: Store | str, settings: FitSettings, client: Any | None = None, *,
                      progress: Callable[[Any], None] | None = None, groups: int | None = None) -> Attributions:
    """Fit ``settings`` with the training rows' moments summed on ``client``'s workers (in this
    process without a client), then one solve here.

    ``groups``: row groups (tasks); default :data:`GROUPS_PER_THREAD` per worker thread.
    Raises :class:`RegressionError` when the fit cannot run row-parallel (see :func:`rows_parallel_fits`).

    Examples
    --------
    >>> with cluster_client("local", n_workers=2) as client:        # doctest: +SKIP
    ...     attrs = fit_rows_parallel("store", FitSettings(num_val=500), client)
    """
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    if not rows_parallel_fits(store, settings):
        raise RegressionError(
            f"a row-parallel fit sums X^T X: it needs solver 'lstsq' on the CPU with method 'gram' (or 'auto' with "
            f"P x P within max_gram_bytes); found solver {settings.solver!r}, options {settings.options}. "
            f"Fit in target slices instead (slices=N).")
    if groups is None:
        threads = sum(client.nthreads().values()) if client is not None else 1
        groups = GROUPS_PER_THREAD * max(threads, 1)
    token = _token(store, settings)
    stats: dict[str, Any] = {}

    def summed(train: StoreRows, s: FitSettings) -> PrecomputedRows:
        import torch

        shift = first_batch_shift(train, s.options.get("batch_rows"))
        parts = plan_row_groups(train.rows, store.rows_per_chunk, groups)
        tasks = TaskSet(group_moments, [(i, (str(store.path), s, g, shift)) for i, g in enumerate(parts)],
                        key=lambda i: f"coar-moments-{i}-{token}", retries=1)

        done = {"rows": 0, "groups": 0}

        def on_done(index: int) -> None:  # rows streamed, like an in-process fit's "moments" stage
            done["rows"] += len(parts[index])
            done["groups"] += 1
            if progress:
                progress(FitProgress("moments", done["rows"], int(train.n_rows), s.target_slice,
                                     f"{done['groups']}/{len(parts)} row groups on the workers"))

        try:
            state = reduce_tasks(tasks, add_states, client, on_done=on_done)
        except CoarError:
            raise
        except Exception as exc:  # noqa: BLE001 - a task's own error, raised again on the client
            raise RegressionError(f"summing the moments of {len(parts)} row groups failed on the cluster "
                                  f"({type(exc).__name__}: {exc}); fit in target slices (slices=N) to "
                                  f"see which rows, or without a client.") from exc
        stats["row_groups"] = len(parts)
        return PrecomputedRows(train, Moments.from_state(state, torch.device("cpu")))

    attrs = fit_store(store, dataclasses.replace(settings, device=None), progress, prepare=summed)
    meta = {**attrs.metadata, "parallel": "rows", "row_groups": stats.get("row_groups", 0)}
    return dataclasses.replace(attrs, metadata=meta)
