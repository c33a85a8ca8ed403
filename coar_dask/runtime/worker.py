"""Dask preload for the local worker processes that coar_dask starts.

Ctrl-C in a terminal sends SIGINT to the whole process group: the CLI and its
local workers. The CLI handles it (cancels the build, closes the cluster,
exits 130); a worker that also handled it would die mid-task and print
distributed's KeyboardInterrupt tracebacks. So local workers ignore SIGINT
and leave when their nanny closes them. A worker closed with a block still
running logs one "Async instruction ... ended with CancelledError" warning
per running task (distributed: "this should exclusively happen in
Worker.close()"), and a heartbeat may fail when the scheduler goes first;
both are the expected end of an interrupted build, so they are not shown.

Malloc: glibc reads ``MALLOC_*`` variables only when a process starts, and a
Dask nanny sets its worker's ``env`` (``coar_dask.runtime.clusters.WORKER_ENV``)
inside the worker process, after it started (only
``distributed.nanny.pre-spawn-environ`` is set before, and it holds dask's own
``MALLOC_TRIM_THRESHOLD_=65536``). :func:`apply_malloc_env` applies them with
``mallopt``: from :func:`dask_setup` (the nanny sets ``env`` before it
creates the worker, so before its preloads run), and from every build task
(:func:`coar_dask.runtime.build.run_block`, once per process) for workers
started without this preload, e.g. SLURM jobs. Either way, before the first
ablated forward pass.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["apply_malloc_env", "dask_setup"]

logger = logging.getLogger(__name__)

#: ``mallopt`` parameter numbers (glibc's malloc.h) of the variables applied.
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3,
            "MALLOC_MMAP_MAX_": -4, "MALLOC_ARENA_MAX": -8}
_MALLOC_APPLIED: dict[str, int] | None = None


def _in_dask_worker() -> bool:
    if "distributed" not in sys.modules:  # never imported: not a worker (and no need to import it)
        return False
    try:
        sys.modules["distributed"].get_worker()
    except (ValueError, AttributeError):
        return False
    return True


def apply_malloc_env(*, only_in_dask_worker: bool = True) -> dict[str, int]:
    """Apply the ``MALLOC_*`` environment variables of this process with ``mallopt`` (glibc; once).

    Why it matters: with dask's ``MALLOC_TRIM_THRESHOLD_=65536``, every
    activation above 128 KiB is a fresh ``mmap`` whose pages fault in and are
    zeroed on every forward pass; on the digits model that triples the CPU
    time per model (BENCHMARKS.md). Does nothing without glibc.

    Parameters
    ----------
    only_in_dask_worker
        Act only inside a Dask worker's task (default). Elsewhere the variables
        may be left over from a nanny that started workers from this process
        (it writes dask's ``MALLOC_TRIM_THRESHOLD_=65536`` into its own
        environment), which must not be applied.

    Returns
    -------
    dict
        The settings applied (``{env name: value}``).
    """
    global _MALLOC_APPLIED
    if only_in_dask_worker and not _in_dask_worker():
        return {}
    if _MALLOC_APPLIED is not None:
        return _MALLOC_APPLIED
    applied: dict[str, int] = {}
    mallopt = None
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
    for name, param in _MALLOPT.items():
        value = os.environ.get(name)
        if mallopt is None or value is None:
            continue
        try:
            number = int(value)
        except ValueError:
            logger.warning("ignoring %s=%r: not an integer", name, value)
            continue
        if mallopt(ctypes.c_int(param), ctypes.c_int(number)) == 1:
            applied[name] = number
        else:
            logger.warning("mallopt refused %s=%d", name, number)
    if applied:
        logger.info("malloc settings applied: %s", applied)
    _MALLOC_APPLIED = applied
    return applied


class _QuietClose(logging.Filter):
    """Drop the two records a worker logs when it is closed in the middle of a block."""

    def __init__(self, worker: Any):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Async instruction for") and message.endswith("ended with CancelledError"):
            return False  # only ever logged by Worker.close()
        closing = getattr(getattr(self.worker, "status", None), "name", "").startswith("clos")
        return not (closing and message.startswith("Failed to communicate with scheduler"))


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT and apply the malloc settings in this worker process (called by distributed at worker start).

    The nanny has set the worker's ``env`` by now (``os.environ.update`` in
    ``distributed.nanny.WorkerProcess._run``, before the worker and its
    preloads start), so its ``MALLOC_*`` variables are those to apply.
    """
    apply_malloc_env(only_in_dask_worker=False)  # a preload runs outside any task: get_worker() fails here
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet = _QuietClose(worker)
    for name in ("distributed.worker.state_machine", "distributed.worker"):
        logging.getLogger(name).addFilter(quiet)
