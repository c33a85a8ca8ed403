"""Fit target slices as separate Dask tasks and assemble them in order.

The K outputs of a store are independent regressions, so they split into
contiguous *target slices* (the seed's ``target_start_ind:target_end_ind``),
each fitted by one task that streams the same train/validation rows (the
plan's: :func:`coar_dask.fit.plan.plan_fit` chose them once).
:func:`execute_slices` runs a ``"slices"`` plan in this process
(``client=None``) or as one Dask task per slice (GPU-annotated,
``resources={"GPU": 1}``, when the device is CUDA), on any cluster of
:func:`coar_dask.runtime.clusters.cluster_client`, and returns the solved
parts in target order for :func:`coar_dask.fit.core.assemble`. The result
equals a single fit of all targets.

Progress: tasks running on Dask workers send :class:`~coar_dask.solvers.base.FitProgress`
events (epochs, lambdas, CG iterations) to the client under the topic
:data:`PROGRESS_TOPIC`; the client passes them, and one ``"slices"`` event per
finished slice, to the ``progress`` callback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Callable

from coar_dask.errors import RegressionError
from coar_dask.fit.core import FitPart, solve
from coar_dask.fit.plan import FitPlan
from coar_dask.runtime.executor import TaskSet, run_tasks
from coar_dask.runtime.gpu import check_gpu_workers
from coar_dask.solvers.base import FitProgress

__all__ = ["fit_slice", "execute_slices", "PROGRESS_TOPIC"]

logger = logging.getLogger(__name__)

#: Topic of the worker events that carry a slice's progress to the client.
PROGRESS_TOPIC = "coar-dask-fit-progress"
#: At most one progress event per slice per this many seconds (the last one always goes).
_EVENT_INTERVAL = 0.5


class _EventSender:
    """Progress callback of a task on a Dask worker: worker events, at most one per interval."""

    def __init__(self, worker: Any, index: int):
        self.worker, self.index = worker, index
        self.last = 0.0
        self.pending: dict[str, Any] | None = None

    def __call__(self, p: Any) -> None:
        msg = {**asdict(p), "target_slice": list(p.target_slice) if p.target_slice else None, "slice_index": self.index}
        now = time.monotonic()
        if now - self.last >= _EVENT_INTERVAL:
            self.worker.log_event(PROGRESS_TOPIC, msg)
            self.last, self.pending = now, None
        else:
            self.pending = msg

    def flush(self) -> None:
        if self.pending is not None:
            self.worker.log_event(PROGRESS_TOPIC, self.pending)
            self.pending = None


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def fit_slice(plan: FitPlan, index: int, progress: Callable[[Any], None] | None = None) -> FitPart:
    """Fit slice ``index`` of ``plan`` -> :class:`~coar_dask.fit.core.FitPart`.

    The task function (module-level, so it pickles). On a Dask worker its
    progress goes to the client as worker events.
    """
    sender = None
    if progress is None:
        worker = _current_worker()
        if worker is not None:
            sender = progress = _EventSender(worker, index)
    try:
        return solve(plan, plan.slices[index], progress)
    finally:
        if sender is not None:
            sender.flush()


def _forward(progress: Callable[[Any], None]) -> Callable[[Any], None]:
    def handler(event: Any) -> None:
        _, msg = event
        try:
            sl = msg.get("target_slice")
            progress(FitProgress(stage=msg["stage"], done=int(msg["done"]), total=msg.get("total"),
                                 target_slice=tuple(sl) if sl else None, detail=msg.get("detail", "")))
        except Exception:  # noqa: BLE001 - a progress display must never break the fit
            logger.debug("progress callback failed", exc_info=True)

    return handler


def execute_slices(plan: FitPlan, client: Any | None = None, *, progress: Callable[[Any], None] | None = None,
                   retries: int = 1) -> list[FitPart]:
    """Run a ``"slices"`` plan: in this process (``client=None``) or one Dask task per slice.

    Returns the solved parts in target order (:func:`coar_dask.fit.core.assemble` joins them).
    """
    total = len(plan.slices)
    logger.info("%r", plan)
    parts: list[Any] = [None] * total
    # in this process the slices report progress directly; on workers, as events
    extra = (progress,) if client is None else ()
    taskset = TaskSet(fit_slice, [(i, (plan, i, *extra)) for i in range(total)], key=plan.task_key,
                      resources={"GPU": 1} if plan.gpu and client is not None else None, retries=retries)
    if taskset.resources:
        check_gpu_workers(client, "slice", RegressionError, "--device cpu")
    done = 0

    def on_result(i: int, part: Any) -> None:
        nonlocal done
        parts[i] = part
        done += 1
        if progress:
            progress(FitProgress("slices", done, total, plan.target_range, f"{done}/{total} slices"))

    def on_error(i: int, exc: BaseException) -> None:
        raise RegressionError(
            f"fitting target slice {plan.slices[i][0]}:{plan.slices[i][1]} failed on the cluster "
            f"({type(exc).__name__}: {exc})."
        ) from exc

    subscribed = progress is not None and client is not None
    if subscribed:
        client.subscribe_topic(PROGRESS_TOPIC, _forward(progress))
    try:
        run_tasks(taskset, client, on_result=on_result, on_error=on_error if client is not None else None)
    finally:
        if subscribed:
            try:
                client.unsubscribe_topic(PROGRESS_TOPIC)
            except Exception:  # noqa: BLE001 - the client may be closing
                pass
    return parts
