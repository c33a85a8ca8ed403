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
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any


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
    """Ignore SIGINT in this worker process (called by distributed at worker start)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet = _QuietClose(worker)
    for name in ("distributed.worker.state_machine", "distributed.worker"):
        logging.getLogger(name).addFilter(quiet)
