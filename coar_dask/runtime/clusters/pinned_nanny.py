"""A Dask nanny whose worker process starts with its own ``CUDA_VISIBLE_DEVICES``.

Why: distributed (2026.8) applies a nanny's ``env`` inside the new worker
process (``WorkerProcess._run``: ``os.environ.update(env)``), after
multiprocessing's ``spawn`` has re-imported the user's ``__main__`` there. A
model module that touches CUDA at import time then initialised CUDA with the
parent's device list, and every worker of a local GPU cluster landed on GPU 0.
Only the environment of the parent at the moment of the spawn reaches the
child before any Python code runs (``distributed.nanny.pre-spawn-environ``
works that way, but is one setting for every nanny). :class:`PinnedNanny`
sets its device in this process's environment for the moment its worker
process is spawned, one nanny at a time, and restores it once the process
exists. The nanny's ``env`` still carries the same value, so a worker started
otherwise (``fork``) gets it too.

This module imports distributed; worker specs name the class by its path.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from distributed import Nanny

__all__ = ["PinnedNanny"]

#: One spawn of a pinned worker at a time in this process (across event loops).
_SPAWN_LOCK = threading.Lock()
#: How often a waiting nanny looks again (seconds); a spawn takes milliseconds.
_POLL_S = 0.005


def _async_process(nanny: Nanny) -> Any:
    """The nanny's current ``AsyncProcess`` (``None`` before the first start)."""
    worker_process = getattr(nanny, "process", None)
    return getattr(worker_process, "process", None)


class PinnedNanny(Nanny):
    """A ``distributed.Nanny`` whose worker process has ``env["CUDA_VISIBLE_DEVICES"]`` from its first instruction.

    Takes the keywords of ``distributed.Nanny``; the device is
    ``env["CUDA_VISIBLE_DEVICES"]`` (without one it is a plain nanny).
    Restarts (``Client.restart``, a memory kill) go through
    :meth:`instantiate` too, so a restarted worker keeps its device.
    """

    def __init__(self, *args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, env=env, **kwargs)
        self._device = None if env is None else env.get("CUDA_VISIBLE_DEVICES")

    async def instantiate(self) -> Any:
        if self._device is None:
            return await super().instantiate()
        while not _SPAWN_LOCK.acquire(blocking=False):
            await asyncio.sleep(_POLL_S)
        before = _async_process(self)
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(self._device)
            starting = asyncio.ensure_future(super().instantiate())
            # Hold the environment until the child process exists (its pid is known), not until it connects.
            while not starting.done():
                current = _async_process(self)
                if current is not None and current is not before and current.pid is not None:
                    break
                await asyncio.sleep(_POLL_S)
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
            _SPAWN_LOCK.release()
        return await starting
