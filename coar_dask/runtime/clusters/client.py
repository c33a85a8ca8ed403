"""One context manager, :func:`cluster_client`, over the registry of cluster kinds.

``local`` (:mod:`.local`), ``address`` (:mod:`.address`), and one kind per
batch system of :data:`~coar_dask.runtime.clusters.jobqueue.JOBQUEUE_KINDS`
(:mod:`.jobqueue`: SLURM, PBS, LSF, SGE, HTCondor through dask-jobqueue).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Sequence

import dask
import dask.config

from coar_dask.errors import ConfigError
from coar_dask.runtime.clusters.address import address_client
from coar_dask.runtime.clusters.jobqueue import JOBQUEUE_KINDS, JobqueueSettings, jobqueue_client, \
    resolve_jobqueue_settings
from coar_dask.runtime.clusters.local import local_client

__all__ = ["CLUSTER_KINDS", "cluster_kinds", "cluster_client"]

#: The kinds that are not batch systems.
_OWN_KINDS = ("local", "address")


def cluster_kinds() -> tuple[str, ...]:
    """Every kind :func:`cluster_client` knows: local, address, and the registered batch systems."""
    return (*_OWN_KINDS, *JOBQUEUE_KINDS)


#: The kinds at import time (batch systems registered later are in :func:`cluster_kinds`).
CLUSTER_KINDS = cluster_kinds()

#: distributed's loggers that log tracebacks while a client tries to reach a lost scheduler.
_RECONNECT_LOGGERS = ("distributed.client", "distributed.core", "distributed.comm.core", "distributed.utils")


class _LostSchedulerNoise(logging.Filter):
    """Drops distributed's records once ``client`` has lost its scheduler: its reconnect attempts log
    tracebacks (~100 lines), and :func:`coar_dask.runtime.executor.run_tasks` says what happened in one
    line (:class:`~coar_dask.errors.SchedulerLostError`)."""

    def __init__(self) -> None:
        super().__init__()
        self.client: Any = None

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(self.client, "status", "running") in ("running", "newly-created")


@contextlib.contextmanager
def _quiet_once_lost(clients: Any) -> Iterator[Any]:
    """Enter ``clients`` (a context manager yielding a client) with :class:`_LostSchedulerNoise` on
    distributed's reconnect loggers until it has closed the client (closing cancels the reconnect,
    which logs a traceback of its own)."""
    noise = _LostSchedulerNoise()
    loggers = [logging.getLogger(name) for name in _RECONNECT_LOGGERS]
    for log in loggers:
        log.addFilter(noise)
    try:
        with clients as client:
            noise.client = client
            yield client
    finally:
        for log in loggers:
            log.removeFilter(noise)


@contextlib.contextmanager
def cluster_client(
    kind: str | None = "local",
    *,
    address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str | None = None,
    gpus: int | str | Sequence[str] | None = None,
    settings: JobqueueSettings | None = None,
    config_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` on a fresh or existing cluster; close what it started.

    Parameters
    ----------
    kind
        ``"local"`` (worker processes on this machine), ``"address"``
        (connect to the scheduler at ``address``), or a batch system:
        ``"slurm"``, ``"pbs"``, ``"lsf"``, ``"sge"``, ``"htcondor"`` (workers
        as batch jobs, through dask-jobqueue). ``None``: dask config ``coar-dask.cluster.kind``.
    address
        Scheduler address for ``kind="address"``, e.g. ``tcp://10.0.0.1:8786``.
    n_workers
        Worker processes of a local CPU cluster; default one per core.
    threads_per_worker
        Threads of each local worker.
    dashboard_address
        Dashboard address, e.g. ``":8787"``; ``":0"`` takes any free port.
        ``None``: any free port for a local cluster; for a batch system,
        ``coar-dask.jobqueue.dashboard-address`` or dask-jobqueue's
        ``jobqueue.<kind>.scheduler-options`` (``:8787`` unless it says otherwise).
    gpus
        Local kind: ``"auto"`` (default from dask config ``coar-dask.local.gpus``:
        one worker per visible GPU, or CPU workers without GPUs), ``0`` (CPU
        workers), a count, or explicit ``CUDA_VISIBLE_DEVICES`` entries.
    settings
        Batch systems: settings already resolved (see
        :func:`~coar_dask.runtime.clusters.jobqueue.resolve_jobqueue_settings`).
    config_file
        Batch systems: a settings file (``coar-dask config slurm --example`` prints one).
    **kwargs
        Local kind: passed to ``distributed.LocalCluster``. Batch systems:
        dask-jobqueue's keywords of the kind (``queue``, ``cores``,
        ``memory``, ``walltime``...) and coar_dask's (``jobs``, ``adapt``,
        ``gpus_per_job``, ``lifetime``...), plus ``respawn_interval`` (how
        often lost jobs are resubmitted).

    Examples
    --------
    >>> with cluster_client("slurm", cores=4, memory="16GB", gpus_per_job=1, adapt="0:8") as client:  # doctest: +SKIP
    ...     run_build(store, experiment, client=client)
    """
    kind = dask.config.get("coar-dask.cluster.kind", "local", override_with=kind)
    if kind == "address" or (address and kind == "local"):
        with _quiet_once_lost(address_client(address)) as client:
            yield client
    elif kind in JOBQUEUE_KINDS:
        if n_workers is not None or gpus is not None:
            raise ConfigError(
                f"n_workers and gpus are for cluster kind 'local'; for {kind} give jobs=N (or adapt='MIN:MAX') "
                "and gpus_per_job=N"
            )
        respawn = kwargs.pop("respawn_interval", None)
        if settings is None:
            if dashboard_address is not None and "dashboard_address" not in kwargs:
                kwargs["dashboard_address"] = dashboard_address
            settings = resolve_jobqueue_settings(kind, config_file, **kwargs)
        elif kwargs or config_file is not None:
            raise ConfigError("give either settings=JobqueueSettings(...) or keyword settings/config_file, not both")
        elif settings.kind != kind:
            raise ConfigError(f"settings are for cluster kind {settings.kind!r}, not {kind!r}")
        with _quiet_once_lost(jobqueue_client(settings, respawn)) as client:
            yield client
    elif kind == "local":
        if settings is not None or config_file is not None:
            raise ConfigError("settings and config_file are for batch systems (e.g. cluster kind 'slurm'), "
                              "not 'local'")
        with _quiet_once_lost(local_client(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                           dashboard_address=dashboard_address, gpus=gpus, **kwargs)) as client:
            yield client
    else:
        raise ConfigError(f"unknown cluster kind {kind!r}; choose one of {cluster_kinds()}.")
