"""The cluster flags of every command that runs on Dask, and ``coar-dask cluster``.

:func:`add_cluster_arguments` adds ``--cluster slurm --jobs 4``, ``--adapt 0:8``,
...; :func:`cluster_from_args` turns them into the keyword arguments of
:func:`coar_dask.runtime.clusters.cluster_client`; :func:`client_for` opens
that client (or none, for ``--cluster none``). ``--cluster`` takes every kind
of the registry: local, address, and the batch systems (slurm, pbs, lsf, sge,
htcondor); ``coar-dask cluster --cluster pbs --dry-run`` prints a PBS job script.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import IO, Any, Iterator

import dask

from coar_dask.cli.common import echo
from coar_dask.errors import ConfigError
from coar_dask.runtime.clusters import JOBQUEUE_KINDS, cluster_client, cluster_kinds, job_script, \
    resolve_jobqueue_settings

__all__ = ["add_cluster_arguments", "cluster_from_args", "client_for", "cluster_dry_run_text",
           "cluster_dry_run_main", "cmd_cluster", "add_cluster_parser"]

#: Where to find a commented settings file of batch jobs.
SLURM_EXAMPLE_HINT = "`coar-dask config slurm --example > slurm.yaml`"

#: Flags of the batch-system kinds, passed on under these names.
_JOBQUEUE_FLAGS = ("jobs", "adapt", "queue", "account", "walltime", "cores", "memory", "disk", "gpus_per_job",
                   "python", "interface", "lifetime")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the cluster flags (``--cluster slurm --jobs 4``, ``--adapt 0:8``, ...) to a parser.

    Every flag defaults to ``None`` so that :func:`cluster_from_args` can
    leave unset settings to the config file and dask's config.
    """
    g = parser.add_argument_group("where to run", "a Dask cluster; see README, Running on SLURM and other batch systems")
    g.add_argument("--cluster", choices=(*cluster_kinds(), "none"), default=None,
                   help="local: a Dask cluster on this machine (default; one worker per GPU if any); "
                        f"{', '.join(JOBQUEUE_KINDS)}: workers as batch jobs (dask-jobqueue); address: an existing "
                        "scheduler (--address); none: run in this process without Dask")
    g.add_argument("--address", default=None, help="scheduler address for --cluster address")
    g.add_argument("--workers", type=int, default=None, help="local: CPU worker processes (default: one per core)")
    g.add_argument("--gpus", default=None,
                   help="local: 'auto' (one worker per visible GPU), 0 (CPU only), or devices like 0,1")
    g.add_argument("--jobqueue-config", "--slurm-config", dest="jobqueue_config", default=None, metavar="YAML",
                   help=f"batch: settings file (an example: {SLURM_EXAMPLE_HINT}); flags override it")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--jobs", type=int, default=None, help="batch: number of jobs (one Dask worker each)")
    scale.add_argument("--adapt", default=None, metavar="MIN:MAX", help="batch: adaptive number of jobs, e.g. 0:8")
    g.add_argument("--queue", "--partition", dest="queue", default=None, help="batch: queue or partition (-p, -q)")
    g.add_argument("--account", default=None, help="batch: account (-A) or LSF/SGE project (-P)")
    g.add_argument("--walltime", default=None, help="batch: time limit per job, e.g. 02:00:00 (LSF: 02:00)")
    g.add_argument("--cores", type=int, default=None, help="batch: cores per job")
    g.add_argument("--memory", default=None, help="batch: memory per job, e.g. 16GB")
    g.add_argument("--disk", default=None, help="htcondor: disk per job, e.g. 10GB")
    g.add_argument("--gpus-per-job", type=int, default=None,
                   help="batch: 1 for one GPU per job (SLURM --gres=gpu:1); for more GPUs ask for more --jobs")
    g.add_argument("--job-extra", action="append", default=None, metavar="DIRECTIVE",
                   help="batch: extra job directive, repeatable, e.g. --job-extra=--constraint=a100")
    g.add_argument("--python", default=None, help="batch: python of the workers (default: this one)")
    g.add_argument("--interface", default=None, help="batch: network interface of scheduler and workers, e.g. ib0")
    g.add_argument("--lifetime", default=None,
                   help="batch: 'auto' (leave before the walltime), 'off', or a duration such as 55m")


def cluster_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`cluster_client` from the flags of :func:`add_cluster_arguments`.

    ``{"kind": "none"}`` means: no cluster, run in this process.
    """
    kind = getattr(args, "cluster", None) or dask.config.get("coar-dask.cluster.kind", "local")
    out: dict[str, Any] = {"kind": kind}
    if getattr(args, "address", None):
        out["address"] = args.address
    if kind == "local":
        if getattr(args, "workers", None) is not None:
            out["n_workers"] = args.workers
        if getattr(args, "gpus", None) is not None:
            # "2" is a count, "0,1" (or "3,") are devices, "auto" is auto.
            out["gpus"] = int(args.gpus) if str(args.gpus).isdigit() else args.gpus
        return out
    if kind in JOBQUEUE_KINDS:
        if getattr(args, "jobqueue_config", None):
            out["config_file"] = args.jobqueue_config
        for name in _JOBQUEUE_FLAGS:
            value = getattr(args, name, None)
            if value is not None:
                out[name] = value
        if getattr(args, "job_extra", None):
            out["job_extra_directives"] = list(args.job_extra)
    return out


@contextlib.contextmanager
def client_for(args: argparse.Namespace) -> Iterator[Any]:
    """A Dask client for the cluster flags (its dashboard link printed), or ``None`` for ``--cluster none``."""
    kwargs = cluster_from_args(args)
    if kwargs.pop("kind") == "none":
        yield None
        return
    kind = args.cluster or "local"
    with cluster_client(kind, **kwargs) as client:
        echo(f"Dask dashboard: {client.dashboard_link}")
        yield client


def cluster_dry_run_text(args: argparse.Namespace) -> str:
    """What ``coar-dask cluster --dry-run`` shows: the resolved settings and the job script.

    The batch system is ``--cluster`` (default: slurm); local, address and none have no job script.
    """
    kind = getattr(args, "cluster", None) or "slurm"
    if kind not in JOBQUEUE_KINDS:
        raise ConfigError(f"--dry-run prints the job script of a batch system; --cluster {kind} has none. "
                          f"Use --cluster {' | '.join(JOBQUEUE_KINDS)}.")
    kwargs = cluster_from_args(argparse.Namespace(**{**vars(args), "cluster": kind}))
    del kwargs["kind"]
    kwargs.pop("address", None)
    config_file = kwargs.pop("config_file", None)
    settings = resolve_jobqueue_settings(kind, config_file, **kwargs)
    scaling = (f"adapt {settings.adapt[0]}:{settings.adapt[1]} jobs" if settings.adapt is not None
               else f"{settings.jobs} job(s)")
    header = (f"# {settings.spec.label} cluster: {scaling}; each job runs this script "
              f"(the scheduler address is filled in at start):\n")
    return header + job_script(settings)


def cluster_dry_run_main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Write the job script for ``args`` to ``out`` (default stdout); return the exit code."""
    (out or sys.stdout).write(cluster_dry_run_text(args))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """``coar-dask cluster``: print the job script (``--dry-run``), or start a cluster and wait for Ctrl-C."""
    if args.dry_run:
        return cluster_dry_run_main(args)
    with client_for(args) as client:
        if client is None:
            raise ConfigError("`coar-dask cluster` starts a cluster; --cluster none has nothing to start.")
        echo(f"Scheduler: {client.scheduler.address}\nUse it with --cluster address --address "
             f"{client.scheduler.address}. Ctrl-C stops the cluster.")
        while True:
            time.sleep(3600)


def add_cluster_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coar-dask cluster`` to ``coar-dask``'s subparsers."""
    p = subparsers.add_parser(
        "cluster", help="show a batch job script (--dry-run), or start a cluster and wait",
        description="With --dry-run, print the settings and the job script the batch system (--cluster slurm, "
                    "pbs, lsf, sge or htcondor; default slurm) would run. Without, start "
                    "the cluster described by the flags, print its scheduler address and dashboard, and keep "
                    "it up until Ctrl-C.")
    p.add_argument("--dry-run", action="store_true", help="print the job script of --cluster (default slurm) and exit")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_cluster)
    return p
