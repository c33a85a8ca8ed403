"""One executor for every task set: build blocks, fit slices, baseline blocks.

A task set is a module-level function and, per task, an index and its
arguments. :func:`run_tasks` runs them in this process (``client=None``) or
as Dask tasks on ``client``, with one submit / as-completed / cancel loop:
results come back with their own index (nothing is parsed from task keys),
and tasks not yet finished are cancelled when the loop ends early (an error,
Ctrl-C).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from coar_dask.errors import SchedulerLostError

__all__ = ["TaskSet", "run_tasks", "reduce_tasks"]

logger = logging.getLogger(__name__)

OnResult = Callable[[int, Any], None]
OnError = Callable[[int, BaseException], None]


@dataclass(frozen=True)
class TaskSet:
    """What to run: ``fn(*args)`` for each ``(index, args)`` in ``tasks``.

    Attributes
    ----------
    fn
        A module-level function (it must pickle).
    tasks
        ``(index, args)`` pairs; indices are unique.
    key
        Dask task key of index ``i`` (shown in the dashboard).
    resources
        Dask worker resources each task needs (e.g. ``{"GPU": 1}``), or None.
    retries
        Dask retries per task (a lost worker costs one task).
    """

    fn: Callable[..., Any]
    tasks: Sequence[tuple[int, tuple[Any, ...]]]
    key: Callable[[int], str]
    resources: Mapping[str, float] | None = None
    retries: int = 0

    def __len__(self) -> int:
        return len(self.tasks)


def _indexed(fn: Callable[..., Any], index: int, *args: Any) -> tuple[int, Any]:
    """The Dask task: ``fn(*args)`` paired with its own index."""
    return index, fn(*args)


def run_tasks(
    taskset: TaskSet,
    client: Any | None = None,
    *,
    on_result: OnResult,
    on_error: OnError | None = None,
    local_errors: tuple[type[BaseException], ...] = (Exception,),
) -> None:
    """Run every task of ``taskset``, calling ``on_result(index, result)`` as each finishes.

    A failing task calls ``on_error(index, exc)`` (which may raise to stop the
    set) or, without ``on_error``, raises at once. In this process only
    ``local_errors`` go to ``on_error``; on Dask every task error does (the
    worker has already caught it). Unfinished Dask tasks are cancelled when
    this returns or raises.
    """
    if client is None:
        _run_local(taskset, on_result, on_error, local_errors)
    else:
        _run_dask(taskset, client, on_result, on_error)


def _run_local(taskset: TaskSet, on_result: OnResult, on_error: OnError | None,
               local_errors: tuple[type[BaseException], ...]) -> None:
    for index, args in taskset.tasks:
        try:
            result = taskset.fn(*args)
        except local_errors as exc:
            if on_error is None:
                raise
            on_error(index, exc)
            continue
        on_result(index, result)


def _run_dask(taskset: TaskSet, client: Any, on_result: OnResult, on_error: OnError | None) -> None:
    from distributed import as_completed

    futures = {
        client.submit(_indexed, taskset.fn, index, *args, key=taskset.key(index),
                      resources=dict(taskset.resources) if taskset.resources else None,
                      retries=taskset.retries, pure=False): index
        for index, args in taskset.tasks
    }
    try:
        for future in as_completed(list(futures)):
            try:
                index, result = future.result()
            except Exception as exc:  # noqa: BLE001 - the task's own error, raised again here
                if _scheduler_lost(client, exc):  # every unfinished task fails alike: say it once
                    raise SchedulerLostError("lost the connection to the Dask scheduler (it stopped, crashed or "
                                             "is unreachable)") from None
                if on_error is None:
                    raise
                on_error(futures[future], exc)
                continue
            on_result(index, result)
    finally:
        if client.status == "running":
            client.cancel([f for f in futures if not f.done()])


def _scheduler_lost(client: Any, exc: BaseException) -> bool:
    """Whether ``exc`` of a task says that the client lost its scheduler, not that the task failed."""
    status = getattr(client, "status", "running")
    return "scheduler-connection-lost" in str(exc) or status not in ("running", "newly-created")



def reduce_tasks(
    taskset: TaskSet,
    combine: Callable[[Any, Any], Any],
    client: Any | None = None,
    *,
    on_done: Callable[[int], None] | None = None,
) -> Any:
    """``combine`` of every task's result, as a tree on the workers; one result comes back.

    In this process the results are combined as they come (one running
    total: memory for two results). On Dask, as soon as two results (task
    or partial sums) are ready, a ``combine`` task sums them on a worker, so
    the sums form a tree of depth about log2(tasks) and only the total
    travels to the client. ``combine`` must be associative and commutative
    (the order is the completion order). ``on_done(index)`` is called as
    each task finishes, with its index. A failing task raises here, and every
    unfinished task is cancelled.
    """
    if not taskset.tasks:
        raise ValueError("reduce_tasks needs at least one task.")
    if client is None:
        total = None
        for index, args in taskset.tasks:
            result = taskset.fn(*args)
            total = result if total is None else combine(total, result)
            if on_done:
                on_done(index)
        return total
    return _reduce_dask(taskset, combine, client, on_done)


def _reduce_dask(taskset: TaskSet, combine: Callable[[Any, Any], Any], client: Any,
                 on_done: Callable[[int], None] | None) -> Any:
    from distributed import as_completed

    opts = dict(resources=dict(taskset.resources) if taskset.resources else None, retries=taskset.retries)
    # Only futures not yet summed are held here: a partial sum's inputs are released once it is done.
    leaves = {client.submit(taskset.fn, *args, key=taskset.key(index), pure=False, **opts): index
              for index, args in taskset.tasks}
    live = set(leaves)
    leaf_index = {f.key: i for f, i in leaves.items()}
    del leaves
    ready: list[Any] = []
    sums = 0
    try:
        pending = as_completed(list(live))
        for future in pending:
            if future.status == "error":
                future.result()  # raises the task's own error
            if on_done and future.key in leaf_index:
                on_done(leaf_index[future.key])
            ready.append(future)
            if len(ready) == 2:
                sums += 1
                summed = client.submit(combine, *ready, key=f"{taskset.key(0)}-sum-{sums}", pure=False, **opts)
                live.difference_update(ready)
                ready = []
                live.add(summed)
                pending.add(summed)
        (last,) = ready
        return last.result()
    finally:  # the total is already here: release every partial sum too, not only unfinished tasks
        client.cancel(list(live))
