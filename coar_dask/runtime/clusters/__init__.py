"""Dask clients for builds and fits: local workers, batch-system jobs, or an existing scheduler.

This package (with :mod:`coar_dask.runtime.build`'s executor) is the only
place that knows about Dask's distributed scheduler; the pure core never
imports it. One context manager, :func:`cluster_client`, over a registry of
kinds, one module each:

``local`` (:mod:`.local`)
    A cluster of worker processes on this machine. With visible GPUs, one
    worker per GPU, each started with its own ``CUDA_VISIBLE_DEVICES``
    (:mod:`.pinned_nanny`) and the worker resource ``GPU=1`` (the dask-cuda
    layout); otherwise one single-threaded worker per core.
``slurm``, ``pbs``, ``lsf``, ``sge``, ``htcondor`` (:mod:`.jobqueue`)
    Workers started as batch jobs by dask-jobqueue (the ``slurm`` extra),
    one small entry per batch system; settings pass through to
    dask-jobqueue's own config (``jobqueue.<kind>.*``). GPU jobs, worker
    lifetimes before the walltime (:mod:`.walltime`) and resubmission of lost
    jobs are added on top. The job script is a string: :func:`job_script`.
``address`` (:mod:`.address`)
    Connect to a running scheduler.
"""

from __future__ import annotations

from coar_dask.runtime.clusters.address import check_address
from coar_dask.runtime.clusters.client import CLUSTER_KINDS, cluster_client, cluster_kinds
from coar_dask.runtime.clusters.jobqueue import (
    JOBQUEUE_KINDS,
    JobqueueKind,
    JobqueueSettings,
    import_jobqueue,
    job_script,
    load_jobqueue_config,
    register_jobqueue_kind,
    resolve_jobqueue_settings,
)
from coar_dask.runtime.clusters.local import (
    WORKER_ENV,
    default_local_workers,
    local_gpu_worker_specs,
    local_worker_preload,
    visible_gpus,
)
from coar_dask.runtime.clusters.walltime import parse_adapt, parse_walltime, worker_lifetime

__all__ = [
    "cluster_client",
    "cluster_kinds",
    "CLUSTER_KINDS",
    "check_address",
    "WORKER_ENV",
    "default_local_workers",
    "local_worker_preload",
    "visible_gpus",
    "local_gpu_worker_specs",
    "JOBQUEUE_KINDS",
    "JobqueueKind",
    "JobqueueSettings",
    "register_jobqueue_kind",
    "resolve_jobqueue_settings",
    "load_jobqueue_config",
    "job_script",
    "import_jobqueue",
    "parse_walltime",
    "parse_adapt",
    "worker_lifetime",
]
