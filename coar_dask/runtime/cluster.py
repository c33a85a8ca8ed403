"""Dask clients for builds and fits: local workers, SLURM jobs, or an existing scheduler.

This is the only module (with :mod:`coar_dask.runtime.build`'s executor) that knows
about Dask's distributed scheduler; the pure core never imports it.

Three kinds of cluster, one context manager, :func:`cluster_client`:

``local``
    A cluster of worker processes on this machine. With visible GPUs, one
    worker per GPU, each with its own ``CUDA_VISIBLE_DEVICES`` and the worker
    resource ``GPU=1`` (the dask-cuda layout); otherwise one single-threaded
    worker per core.
``slurm``
    Workers started as SLURM jobs by ``dask_jobqueue.SLURMCluster`` (the
    ``slurm`` extra). Settings come from arguments, then a settings file
    (``coar-dask config slurm --example`` prints a commented one), then
    dask's config: ``jobqueue.slurm.*`` (so a site's ``jobqueue.yaml``
    works) and ``coar-dask.slurm.*`` (this package's own keys, defaults in
    the packaged ``coar_dask.yaml``). With
    ``gpus_per_job=1`` each job asks for ``--gres=gpu:1`` and its worker
    advertises ``GPU=1`` (more GPUs: more jobs; ``gpus_per_job > 1`` is refused,
    as one worker would run every task on its first GPU). Workers leave before the walltime (``--lifetime``
    with a stagger, derived from the walltime) and lost jobs are resubmitted,
    so a build longer than one walltime keeps going.
``address``
    Connect to a running scheduler.

The job script of a SLURM cluster can be looked at without SLURM:
:func:`slurm_job_script`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dask
import dask.config

from coar_dask import config as _config  # noqa: F401  (loads coar_dask's dask.config defaults)
from coar_dask.config import worker_dask_config
from coar_dask._yaml import read_yaml_file
from coar_dask.errors import ConfigError, missing_dependency

__all__ = [
    "cluster_client",
    "CLUSTER_KINDS",
    "default_local_workers",
    "visible_gpus",
    "local_gpu_worker_specs",
    "SlurmSettings",
    "resolve_slurm_settings",
    "load_slurm_config",
    "slurm_job_script",
    "parse_walltime",
    "parse_adapt",
    "worker_lifetime",
]

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "slurm", "address")

_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss)://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
#: Seconds to reach a scheduler before giving up (distributed's own default retries for 30 s).
CONNECT_TIMEOUT_S = 10


def check_address(address: str) -> str:
    """``address`` if it reads as a scheduler address (``tcp://host:port`` or ``host:port``), else ConfigError."""
    match = _ADDRESS.fullmatch(str(address).strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"--address {address!r} is not a scheduler address; give one like tcp://10.0.0.1:8786 "
                          f"(the address `dask scheduler` prints).")
    return str(address).strip()


def _connect(client_cls: Any, address: str) -> Any:
    """A client of the scheduler at ``address``, or one ConfigError line when it cannot be reached in time."""
    try:
        return client_cls(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"no Dask scheduler answered at {address} within {CONNECT_TIMEOUT_S} s "
                          f"({type(exc).__name__}); start one with `dask scheduler`, or check the address.") from None


def default_local_workers() -> int:
    """One worker process per core (each with one torch thread)."""
    return max(1, os.cpu_count() or 1)


#: Environment of worker processes: one BLAS/OpenMP thread each, so that
#: N single-threaded workers use N cores without oversubscription.
# malloc: dask's MALLOC_TRIM_THRESHOLD_=65536 pins mmap at 128 KiB -> 3x CPU per digits model (BENCHMARKS.md); applied in workers by coar_dask.runtime.worker.apply_malloc_env
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def local_worker_preload() -> list[str]:
    """Preloads of local workers: dask config ``distributed.worker.preload`` plus
    :mod:`coar_dask.runtime.worker`, which makes them ignore Ctrl-C (the CLI
    handles it and closes them)."""
    configured = dask.config.get("distributed.worker.preload", None) or []
    configured = [configured] if isinstance(configured, str) else list(configured)
    return configured + [m for m in ("coar_dask.runtime.worker",) if m not in configured]


# ------------------------------------------------------------------ local GPUs


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``CUDA_VISIBLE_DEVICES`` when it is set (indices or UUIDs, as given), else
    ``0 .. torch.cuda.device_count() - 1``; empty without CUDA.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def local_gpu_worker_specs(
    devices: Sequence[str],
    *,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = "auto",
    env: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Worker specs of a local cluster with one worker per GPU (pure).

    Each worker is a ``distributed.Nanny`` that sees only its own device
    (``CUDA_VISIBLE_DEVICES``), so ``cuda:0`` inside it is its GPU, and
    advertises the resource ``GPU=1``, so tasks submitted with
    ``resources={"GPU": 1}`` run one at a time per GPU.

    Parameters
    ----------
    devices
        ``CUDA_VISIBLE_DEVICES`` entries, e.g. ``["0", "1"]`` (see :func:`visible_gpus`).
    threads_per_worker
        Threads per worker (tasks that may run at once on it).
    memory_limit
        Passed to each worker; ``"auto"``: the machine's memory divided by
        the number of GPU workers (distributed's own ``"auto"`` would give a
        one-thread worker the memory of one core).
    env
        Extra environment of the workers (default: one BLAS thread each).

    Returns
    -------
    dict
        ``{name: {"cls": ..., "options": ...}}`` for ``distributed.SpecCluster(workers=...)``.

    Examples
    --------
    >>> specs = local_gpu_worker_specs(["0", "1"])
    >>> specs["gpu-1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"], specs["gpu-1"]["options"]["resources"]
    ('1', {'GPU': 1})
    """
    if not devices:
        raise ConfigError("local_gpu_worker_specs needs at least one device, e.g. ['0']")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"GPU devices must be distinct, got {list(devices)}")
    base_env = dict(WORKER_ENV if env is None else env)
    if memory_limit == "auto":
        from distributed.system import MEMORY_LIMIT

        memory_limit = int(MEMORY_LIMIT // len(devices))
    specs: dict[str, dict[str, Any]] = {}
    for device in devices:
        specs[f"gpu-{device}"] = {
            "cls": "distributed.Nanny",
            "options": {
                "nthreads": int(threads_per_worker),
                "memory_limit": memory_limit,
                "env": {**base_env, "CUDA_VISIBLE_DEVICES": str(device)},
                "resources": {"GPU": 1},
                "preload": local_worker_preload(),
            },
        }
    return specs


def _resolve_local_gpus(gpus: int | str | Sequence[str] | None) -> list[str]:
    """``gpus`` argument of the local kind -> device list (empty: CPU workers)."""
    if gpus is None:
        gpus = dask.config.get("coar-dask.local.gpus", "auto")
    if gpus in ("auto", None):
        return visible_gpus()
    if isinstance(gpus, bool):
        raise ConfigError(f"gpus must be 'auto', a count or a list of devices, got {gpus!r}")
    if isinstance(gpus, int):
        if gpus < 0:
            raise ConfigError(f"gpus must be >= 0, got {gpus}")
        found = visible_gpus()
        if gpus > len(found):
            raise ConfigError(f"gpus={gpus} but only {len(found)} GPU(s) are visible ({found}); use gpus='auto'")
        return found[:gpus]
    wanted = [d.strip() for d in gpus.split(",") if d.strip()] if isinstance(gpus, str) else [str(d) for d in gpus]
    found = visible_gpus()
    unknown = [d for d in wanted if d not in found]
    if unknown:
        raise ConfigError(f"gpus {unknown} are not among the GPUs this machine shows ({found or 'none'}); "
                          f"pick from those, or use gpus='auto'.")
    return wanted


# ---------------------------------------------------------------- SLURM config

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


def parse_walltime(walltime: str | int) -> int:
    """Seconds in a SLURM time limit.

    Accepts SLURM's formats: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM`` and ``D-HH:MM:SS`` (an int is minutes, as in SLURM).

    Examples
    --------
    >>> parse_walltime("01:30:00"), parse_walltime("45"), parse_walltime("1-00:00")
    (5400, 2700, 86400)
    """
    text = str(walltime).strip()
    match = _TIME_RE.match(text)
    if not match:
        raise ConfigError(
            f"walltime {walltime!r} is not a SLURM time; use e.g. '02:00:00' (HH:MM:SS), '90' (minutes) "
            "or '1-12:00:00' (D-HH:MM:SS)"
        )
    parts = [int(p) for p in match.group("rest").split(":")]
    if match.group("days") is not None:
        days = int(match.group("days"))
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 1:
        total = parts[0] * 60
    elif len(parts) == 2:
        total = parts[0] * 60 + parts[1]
    else:
        total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    if total <= 0:
        raise ConfigError(f"walltime {walltime!r} must be positive, e.g. '02:00:00' (HH:MM:SS)")
    return total


def worker_lifetime(walltime_s: int) -> tuple[int, int]:
    """``(lifetime, stagger)`` seconds for workers of jobs with this walltime.

    A worker leaves between ``lifetime - stagger`` and ``lifetime + stagger``
    seconds after it starts. The margin before the walltime is 10 % of it
    (between 2 and 10 minutes; a quarter of very short walltimes), and the
    stagger is half the margin, so the last worker still leaves at least half
    the margin before SLURM would kill it, and workers of jobs started
    together do not all leave at once.

    Examples
    --------
    >>> worker_lifetime(3600)   # 1 h: leave after 54 min +- 3 min
    (3240, 180)
    """
    if walltime_s <= 0:
        raise ConfigError(f"walltime must be positive, got {walltime_s} s")
    margin = max(min(0.10 * walltime_s, 600.0), min(120.0, walltime_s / 4))
    return int(walltime_s - margin), int(margin / 2)


def parse_adapt(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"MIN:MAX"`` (or a pair) -> ``(min, max)`` jobs of an adaptive cluster.

    Examples
    --------
    >>> parse_adapt("0:8")
    (0, 8)
    """
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        try:
            pair = tuple(int(p) for p in parts)
        except ValueError:
            pair = ()
    else:
        try:
            pair = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
    if len(pair) != 2 or pair[0] < 0 or pair[1] < max(pair[0], 1):
        raise ConfigError(
            f"adapt must be 'MIN:MAX' jobs with 0 <= MIN <= MAX and MAX >= 1, e.g. '0:8'; got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    raise ConfigError(f"{name} must be a list of strings, got {type(value).__name__}: {value!r}")


_OFF = ("off", "none", "no", "false", "")


@dataclass(frozen=True)
class SlurmSettings:
    """How SLURM jobs of Dask workers are requested (resolved, validated).

    Build one with :func:`resolve_slurm_settings`, which fills what is not
    given from a config file and dask's config; the fields here are the final
    values. ``None`` leaves a setting to SLURM's (or dask-jobqueue's) default.

    Attributes
    ----------
    cores, memory
        Cores and memory of one job (``--cpus-per-task``, ``--mem``); required.
    processes
        Dask worker processes per job (1 unless set: one worker per job makes
        GPU jobs, lost-job resubmission and ``--lifetime`` simple).
    jobs, adapt
        A fixed number of jobs, or adaptive ``(min, max)`` jobs.
    queue, account, walltime
        ``-p``, ``-A``, ``-t`` of the job.
    gpus_per_job
        0 or 1: ``--gres=gpu:1`` on the job; its worker advertises the resource
        ``GPU=1``. More than one is refused (the worker would run every task
        on its first GPU): ask for more jobs.
    job_extra_directives, job_script_prologue, worker_extra_args
        Extra ``#SBATCH`` lines, shell lines before the worker starts, and
        ``dask worker`` arguments.
    python, interface, local_directory, log_directory, job_name, death_timeout
        As in ``dask_jobqueue.SLURMCluster``.
    lifetime, lifetime_stagger
        ``"auto"`` (derived from the walltime by :func:`worker_lifetime`),
        ``"off"``, or a duration such as ``"55m"``.
    lifetime_restart
        Restart the worker inside its job at end of life. Off by default: a
        restarted worker would still be killed at the walltime; a new job is
        submitted instead.
    dashboard_address
        The scheduler's dashboard address (``None``: dask-jobqueue's default).
    scheduler_options, jobqueue_options
        Extra keywords of the scheduler, and of ``SLURMCluster`` itself (for
        jobqueue keys this class does not model: ``shebang``, ``job-mem``...).
    """

    cores: int
    memory: str
    processes: int = 1
    jobs: int | None = None
    adapt: tuple[int, int] | None = None
    queue: str | None = None
    account: str | None = None
    walltime: str | None = None
    gpus_per_job: int = 0
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    worker_extra_args: tuple[str, ...] = ()
    python: str | None = None
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    job_name: str | None = None
    death_timeout: float | None = None
    lifetime: str = "auto"
    lifetime_stagger: str = "auto"
    lifetime_restart: bool = False
    dashboard_address: str | None = None
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    jobqueue_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from dask.utils import parse_bytes, parse_timedelta

        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ConfigError(f"cores must be a positive integer (cores per job), got {self.cores!r}")
        try:
            if parse_bytes(str(self.memory)) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ConfigError(f"memory must be an amount such as '16GB' (memory per job), got {self.memory!r}") from None
        if not isinstance(self.processes, int) or self.processes < 1:
            raise ConfigError(f"processes must be a positive integer, got {self.processes!r}")
        if self.cores % self.processes:
            raise ConfigError(f"cores ({self.cores}) must be a multiple of processes ({self.processes})")
        if self.jobs is not None and self.adapt is not None:
            raise ConfigError(f"give either jobs ({self.jobs}) or adapt ({self.adapt}), not both")
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 0):
            raise ConfigError(f"jobs must be an integer >= 0, got {self.jobs!r}")
        if self.adapt is not None:
            object.__setattr__(self, "adapt", parse_adapt(self.adapt))
        if isinstance(self.gpus_per_job, bool) or not isinstance(self.gpus_per_job, int) or self.gpus_per_job < 0:
            raise ConfigError(f"gpus_per_job must be an integer >= 0, got {self.gpus_per_job!r}")
        if self.gpus_per_job and self.processes != 1:
            raise ConfigError(
                f"gpus_per_job={self.gpus_per_job} needs processes=1 (got {self.processes}): all worker "
                "processes of a job would share its GPUs. Ask for more jobs instead, e.g. jobs=4 with gpus_per_job=1."
            )
        if self.gpus_per_job > 1:
            # One worker per job whose tasks all ran on cuda:0 (issue 18): one GPU per job, more jobs.
            raise ConfigError(
                f"gpus_per_job={self.gpus_per_job}: each job runs one Dask worker, whose tasks would all use its "
                f"first GPU; ask for one GPU per job and more jobs instead: --jobs N --gpus-per-job 1 "
                f"(jobs=N, gpus_per_job=1)"
            )
        if self.walltime is not None:
            parse_walltime(self.walltime)
        for name in ("lifetime", "lifetime_stagger"):
            value = getattr(self, name)
            if value in ("auto",) or str(value).lower() in _OFF:
                continue
            try:
                parse_timedelta(value)
            except (ValueError, TypeError, KeyError):
                raise ConfigError(f"{name} must be 'auto', 'off' or a duration such as '55m', got {value!r}") from None
        if self.lifetime == "auto" and self.walltime is None and self.lifetime_restart:
            raise ConfigError("lifetime_restart needs a lifetime: set walltime or lifetime")

    # -- derived ------------------------------------------------------------

    def lifetime_args(self) -> list[str]:
        """``dask worker`` arguments that make workers leave before the walltime."""
        from dask.utils import parse_timedelta

        if str(self.lifetime).lower() in _OFF:
            return []
        auto = worker_lifetime(parse_walltime(self.walltime)) if self.walltime is not None else None
        if self.lifetime == "auto":
            if auto is None:
                return []
            life = auto[0]
        else:
            life = int(parse_timedelta(self.lifetime))
        if self.lifetime_stagger == "auto":
            stagger = auto[1] if auto is not None else int(life * 0.05)
        elif str(self.lifetime_stagger).lower() in _OFF:
            stagger = 0
        else:
            stagger = int(parse_timedelta(self.lifetime_stagger))
        if self.walltime is not None and life + stagger >= parse_walltime(self.walltime):
            raise ConfigError(
                f"lifetime {life}s + stagger {stagger}s is not shorter than the walltime {self.walltime}: "
                "workers would be killed by SLURM mid-task; use lifetime='auto'"
            )
        args = ["--lifetime", f"{life}s"]
        if stagger:
            args += ["--lifetime-stagger", f"{stagger}s"]
        if self.lifetime_restart:
            args.append("--lifetime-restart")
        return args

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for these settings."""
        directives = list(self.job_extra_directives)
        worker_args = list(self.worker_extra_args)
        if self.gpus_per_job:
            if not any(d.lstrip().startswith(("--gres", "--gpus")) for d in directives):
                directives.append(f"--gres=gpu:{self.gpus_per_job}")
            worker_args = _add_resource(worker_args, "GPU", self.gpus_per_job)
        worker_args += self.lifetime_args()
        prologue = list(self.job_script_prologue)
        # The local workers' environment (one BLAS thread per Dask thread, ...),
        # except what the site's prologue sets itself.
        env = {**WORKER_ENV, **{"DASK_" + key.upper().replace(".", "__").replace("-", "_"): value
                                for key, value in worker_dask_config().items()}}
        prologue += [f"export {k}={v}" for k, v in env.items() if not any(k in line for line in prologue)]
        scheduler_options = dict(self.scheduler_options)
        if self.dashboard_address is not None:
            scheduler_options["dashboard_address"] = self.dashboard_address
        kwargs: dict[str, Any] = {
            "cores": self.cores,
            "memory": self.memory,
            "processes": self.processes,
            "queue": self.queue,
            "account": self.account,
            "walltime": self.walltime,
            "python": self.python,
            "interface": self.interface,
            "local_directory": self.local_directory,
            "log_directory": self.log_directory,
            "job_name": self.job_name,
            "death_timeout": self.death_timeout,
            "job_extra_directives": directives,
            "job_script_prologue": prologue,
            "worker_extra_args": worker_args,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if scheduler_options:
            kwargs["scheduler_options"] = scheduler_options
        kwargs.update(self.jobqueue_options)
        return kwargs

    # -- conversion ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as config-file keys (hyphenated), e.g. for logging."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[_FIELD_TO_KEY.get(f.name, f.name.replace("_", "-"))] = value
        if self.adapt is not None:
            out["adapt"] = f"{self.adapt[0]}:{self.adapt[1]}"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SlurmSettings":
        """Settings from config-file keys (hyphens or underscores), validated."""
        values = _normalise_keys(data, where="SLURM settings")
        missing = [k for k in ("cores", "memory") if values.get(k) is None]
        if missing:
            raise ConfigError(_CORES_MEMORY_HELP)
        return cls(**_coerce(values))


def _add_resource(args: list[str], name: str, amount: int) -> list[str]:
    """Add ``name=amount`` to a ``--resources`` argument, or append one."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--resources" and i + 1 < len(out):
            if not re.search(rf"(^|[ ,]){name}=", out[i + 1]):
                out[i + 1] = f"{out[i + 1]},{name}={amount}"
            return out
        if arg.startswith("--resources="):
            if not re.search(rf"(=|[ ,]){name}=", arg):
                out[i] = f"{arg},{name}={amount}"
            return out
    return out + ["--resources", f"{name}={amount}"]


_CORES_MEMORY_HELP = (
    "SLURM jobs need cores and memory per job. Give them as arguments "
    "(cluster_client('slurm', cores=4, memory='16GB') or --cores 4 --memory 16GB), in a config file "
    "(--slurm-config FILE with 'cores: 4' and 'memory: 16GB'; `coar-dask config slurm --example > slurm.yaml` "
    "writes a commented one), or in dask's config "
    "(~/.config/dask/jobqueue.yaml: jobqueue.slurm.cores / jobqueue.slurm.memory)."
)

#: Field name -> config key where they differ beyond '_' -> '-'.
_FIELD_TO_KEY = {"job_name": "name"}
_KEY_TO_FIELD = {v: k for k, v in _FIELD_TO_KEY.items()}
_FIELDS = {f.name for f in dataclasses.fields(SlurmSettings)}
#: Settings read from dask-jobqueue's section of dask's config (jobqueue.slurm.<key>).
_JOBQUEUE_KEYS = {
    "cores": "cores",
    "memory": "memory",
    "processes": "processes",
    "queue": "queue",
    "account": "account",
    "walltime": "walltime",
    "job_extra_directives": "job-extra-directives",
    "job_script_prologue": "job-script-prologue",
    "worker_extra_args": "worker-extra-args",
    "python": "python",
    "interface": "interface",
    "local_directory": "local-directory",
    "log_directory": "log-directory",
    "job_name": "name",
    "death_timeout": "death-timeout",
    "scheduler_options": "scheduler-options",
}
#: Settings of this package (coar-dask.slurm.<key>).
_OWN_KEYS = {
    "jobs": "jobs",
    "adapt": "adapt",
    "gpus_per_job": "gpus-per-job",
    "lifetime": "lifetime",
    "lifetime_stagger": "lifetime-stagger",
    "lifetime_restart": "lifetime-restart",
    "dashboard_address": "dashboard-address",
}
#: dask-jobqueue keys a config file may hold that are passed to SLURMCluster as they are.
_PASSTHROUGH = {"shebang", "job_cpu", "job_mem", "job_directives_skip", "worker_command", "shared_temp_directory"}
_DEPRECATED = {
    "env_extra": "job-script-prologue",
    "job_extra": "job-extra-directives",
    "extra": "worker-extra-args",
    "header_skip": "job-directives-skip",
    "project": "account",
}


def _normalise_keys(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Config keys (``gpus-per-job`` / ``gpus_per_job``) -> field names; unknown keys fail."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    out: dict[str, Any] = {}
    jobqueue_options: dict[str, Any] = dict(data.get("jobqueue_options") or {})
    for key, value in data.items():
        if key == "jobqueue_options":
            continue
        name = str(key).replace("-", "_")
        name = _KEY_TO_FIELD.get(name, name)
        if name in _DEPRECATED:
            raise ConfigError(f"{where}: '{key}' is deprecated by dask-jobqueue; use '{_DEPRECATED[name]}' instead")
        if name in _PASSTHROUGH:
            jobqueue_options[name] = value
            continue
        if name not in _FIELDS:
            valid = sorted({_FIELD_TO_KEY.get(f, f.replace("_", "-")) for f in _FIELDS - {"jobqueue_options"}}
                           | {k.replace("_", "-") for k in _PASSTHROUGH})
            raise ConfigError(f"{where}: unknown setting '{key}'. Valid settings: {', '.join(valid)}")
        out[name] = value
    if jobqueue_options:
        out["jobqueue_options"] = jobqueue_options
    return out


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    """YAML/CLI values -> field types (lists -> tuples, '4' -> 4, ...)."""
    out = dict(values)
    for name in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
        if name in out:
            out[name] = _as_tuple(out[name], name.replace("_", "-"))
    for name in ("cores", "processes", "jobs", "gpus_per_job"):
        if out.get(name) is not None and not isinstance(out[name], bool):
            try:
                out[name] = int(out[name])
            except (TypeError, ValueError):
                raise ConfigError(f"{name.replace('_', '-')} must be an integer, got {out[name]!r}") from None
    if out.get("memory") is not None:
        out["memory"] = str(out["memory"])
    if out.get("walltime") is not None:
        out["walltime"] = str(out["walltime"])
    if "adapt" in out:
        out["adapt"] = parse_adapt(out["adapt"])
    for name in ("lifetime", "lifetime_stagger"):
        if name in out:
            value = out[name]
            out[name] = "off" if value in (None, False) else str(value)
    if "lifetime_restart" in out:
        out["lifetime_restart"] = bool(out["lifetime_restart"])
    for name in ("scheduler_options", "jobqueue_options"):
        if name in out and out[name] is None:
            out[name] = {}
    return out


def load_slurm_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a SLURM settings file (``coar-dask config slurm --example`` prints one) into field-named settings.

    The file holds the settings at its top level, or under ``slurm:``, or
    under ``jobqueue: slurm:`` (so a site's ``jobqueue.yaml`` can be given
    as it is). Keys use hyphens or underscores.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or has an unknown key.
    """
    path = Path(path)
    hint = "`coar-dask config slurm --example` prints a commented example"
    data = read_yaml_file(path, "SLURM config file", hint) or {}
    if isinstance(data, Mapping):
        if isinstance(data.get("jobqueue"), Mapping):
            data = data["jobqueue"].get("slurm") or {}
        elif isinstance(data.get("slurm"), Mapping):
            data = data["slurm"]
    return _normalise_keys(data, where=f"SLURM config file {path}")


def import_jobqueue() -> Any:
    """Import ``dask_jobqueue``, keeping this process's Ctrl-C handler.

    Importing dask-jobqueue (0.9) replaces the SIGINT handler of the importing
    process with ``sys.exit()`` (its ``runner`` module does so for its own
    runners). In the CLI, Ctrl-C of a SLURM build would then end the process
    with exit status 0, silently, instead of reporting the interrupt and
    exiting 130. The handler in place before the import is put back.

    Raises
    ------
    ImportError
        When dask-jobqueue is not installed.
    """
    import signal
    import threading

    # Only the main thread can set handlers; ``None``: a handler not set from Python, which cannot be put back.
    before = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    import dask_jobqueue

    if before is not None and signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)
    return dask_jobqueue


def _jobqueue_defaults_loaded() -> None:
    """Import dask_jobqueue if present: it puts ``jobqueue.*`` defaults into dask's config."""
    with contextlib.suppress(ImportError):
        import_jobqueue()


def resolve_slurm_settings(config_file: str | os.PathLike | None = None, **kwargs: Any) -> SlurmSettings:
    """Resolve SLURM settings: arguments, then a config file, then dask's config.

    A setting given as an argument (not ``None``) wins; else the config file's
    value; else dask's config, ``jobqueue.slurm.<key>`` for dask-jobqueue's
    keys (cores, memory, queue, walltime, ...) and ``coar-dask.slurm.<key>``
    for this package's (jobs, adapt, gpus-per-job, lifetime...). ``jobs`` and
    ``adapt`` are resolved together: the first source that sets either wins;
    with neither, one job.

    Parameters
    ----------
    config_file
        A SLURM settings file (see :func:`load_slurm_config`).
    **kwargs
        Any :class:`SlurmSettings` field, e.g. ``cores=4, memory="16GB",
        gpus_per_job=1, adapt="0:8"``.

    Returns
    -------
    SlurmSettings

    Raises
    ------
    ConfigError
        Unknown settings, bad values, or no cores/memory anywhere (the
        message says where to put them).

    Examples
    --------
    >>> s = resolve_slurm_settings(cores=2, memory="8GB", jobs=3, walltime="01:00:00", gpus_per_job=1)
    >>> s.jobs, s.cluster_kwargs()["job_extra_directives"]
    (3, ['--gres=gpu:1'])
    """
    _jobqueue_defaults_loaded()
    given = {k: v for k, v in _normalise_keys(kwargs, where="cluster_client('slurm')").items() if v is not None}
    from_file = load_slurm_config(config_file) if config_file is not None else {}
    from_file = {k: v for k, v in from_file.items() if v is not None}

    def from_dask(name: str) -> Any:
        if name in _JOBQUEUE_KEYS:
            return dask.config.get(f"jobqueue.slurm.{_JOBQUEUE_KEYS[name]}", None)
        if name in _OWN_KEYS:
            return dask.config.get(f"coar-dask.slurm.{_OWN_KEYS[name]}", None)
        return None

    values: dict[str, Any] = {}
    for name in _FIELDS - {"jobs", "adapt", "jobqueue_options"}:
        for source in (given, from_file):
            if name in source:
                values[name] = source[name]
                break
        else:
            value = from_dask(name)
            if value is not None and value != [] and value != {}:
                values[name] = value
    for source in (given, from_file, {"jobs": from_dask("jobs"), "adapt": from_dask("adapt")}):
        chosen = {k: source[k] for k in ("jobs", "adapt") if source.get(k) is not None}
        if chosen:
            values.update(chosen)
            break
    else:
        values["jobs"] = 1
    options = {**from_file.get("jobqueue_options", {}), **given.get("jobqueue_options", {})}
    if options:
        values["jobqueue_options"] = options
    if values.get("cores") is None or values.get("memory") is None:
        raise ConfigError(_CORES_MEMORY_HELP)
    return SlurmSettings(**_coerce(values))


def _slurm_job_class():
    try:
        return import_jobqueue().slurm.SLURMJob
    except ImportError:
        raise missing_dependency("dask-jobqueue", "slurm", "SLURM clusters") from None


def slurm_job_script(
    settings: SlurmSettings | None = None,
    *,
    config_file: str | os.PathLike | None = None,
    scheduler_address: str = "tcp://<scheduler-address>:8786",
    **kwargs: Any,
) -> str:
    """The batch script each SLURM job would run, as text (nothing is submitted).

    Parameters
    ----------
    settings
        Resolved settings; else they are resolved from ``config_file`` and
        ``kwargs`` as by :func:`resolve_slurm_settings`.
    scheduler_address
        Address written into the worker command (known only once a cluster runs).

    Examples
    --------
    >>> print(slurm_job_script(cores=1, memory="2GB", gpus_per_job=1, walltime="00:30:00"))  # doctest: +SKIP
    #!/usr/bin/env bash
    #SBATCH -J dask-worker
    #SBATCH -n 1
    #SBATCH --cpus-per-task=1
    #SBATCH --mem=2G
    #SBATCH -t 00:30:00
    #SBATCH --gres=gpu:1
    ...
    """
    if settings is None:
        settings = resolve_slurm_settings(config_file, **kwargs)
    elif kwargs or config_file is not None:
        raise ConfigError("give either settings or config_file/keyword settings to slurm_job_script, not both")
    job_cls = _slurm_job_class()
    job_kwargs = settings.cluster_kwargs()
    job_kwargs.pop("scheduler_options", None)
    job_kwargs.pop("shared_temp_directory", None)
    return job_cls(scheduler_address, name="<worker-name>", **job_kwargs).job_script()


# --------------------------------------------------------------- the clients


def _check_slurm_reachable(settings: SlurmSettings) -> None:
    """Fail early, with the fix, where dask-jobqueue would leave jobs 'created' forever."""
    sinfo = shutil.which("sinfo")
    if shutil.which("sbatch") is None or sinfo is None:
        raise ConfigError(
            "cluster 'slurm' needs SLURM's commands (sbatch, squeue, scancel, sinfo) on PATH: run it on a "
            "SLURM login node, or use cluster 'local'"
        )
    try:
        done = subprocess.run([sinfo, "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(f"cannot query SLURM (sinfo): {err}") from None
    if done.returncode != 0:
        hint = "" if os.environ.get("SLURM_CONF") else " If slurm.conf is not in /etc/slurm, export SLURM_CONF=/path/to/slurm.conf."
        raise ConfigError(f"SLURM does not answer (sinfo failed: {done.stderr.strip()[-300:]}).{hint}")
    partitions = {p.strip().rstrip("*") for p in done.stdout.split()}
    if settings.queue is not None and partitions and settings.queue not in partitions:
        raise ConfigError(
            f"SLURM has no partition {settings.queue!r}; available: {', '.join(sorted(partitions))}. "
            "Set queue (--queue) to one of them."
        )


def _start_respawner(cluster: Any, interval: str | float | None) -> None:
    """Resubmit jobs whose worker was lost (walltime, ``--lifetime``, scancel, node failure).

    dask-jobqueue keeps a lost job in the cluster's spec but never starts it
    again (dask/dask-jobqueue#122, #611), for fixed and adaptive clusters
    alike; once distributed drops the dead job (``distributed.deploy.
    lost-worker-timeout`` after the worker left), re-applying the current
    scale submits a replacement under the same name.
    """
    from dask.utils import parse_timedelta
    from tornado.ioloop import PeriodicCallback

    seconds = parse_timedelta(interval) if interval not in (None, 0, "0") else 0
    if not seconds:
        return

    started: set[str] = set()

    def check() -> None:
        if getattr(cluster.status, "name", "") != "running":
            return
        # Only jobs that had been submitted and are gone: a name just added by
        # scale() or adapt() and not yet submitted is not lost.
        started.intersection_update(cluster.worker_spec)
        missing = (set(cluster.worker_spec) - set(cluster.workers)) & started
        started.update(cluster.workers)
        if missing:
            logger.info("resubmitting SLURM job(s) for lost worker(s) %s", sorted(missing))
            cluster.scale(jobs=len(cluster.worker_spec))

    pc = PeriodicCallback(check, seconds * 1000)
    cluster.periodic_callbacks["coar-dask-respawn"] = pc
    cluster.loop.add_callback(pc.start)


@contextlib.contextmanager
def _slurm_client(settings: SlurmSettings, respawn_interval: str | float | None) -> Iterator[Any]:
    try:
        SLURMCluster = import_jobqueue().SLURMCluster
    except ImportError:
        raise missing_dependency("dask-jobqueue", "slurm", "SLURM clusters") from None
    from distributed import Client

    _check_slurm_reachable(settings)
    cluster = SLURMCluster(**settings.cluster_kwargs())
    logger.debug("SLURM job script:\n%s", cluster.job_script())
    try:
        if settings.adapt is not None:
            cluster.adapt(minimum_jobs=settings.adapt[0], maximum_jobs=settings.adapt[1])
            scaling = f"adaptive {settings.adapt[0]}..{settings.adapt[1]} jobs"
        else:
            cluster.scale(jobs=settings.jobs)
            scaling = f"{settings.jobs} job(s)"
        _start_respawner(cluster, respawn_interval)
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    logger.info(
        "started SLURMCluster (%s, %d core(s), %s%s per job), dashboard at %s",
        scaling,
        settings.cores,
        settings.memory,
        f", {settings.gpus_per_job} GPU(s)" if settings.gpus_per_job else "",
        client.dashboard_link,
    )
    try:
        yield client
    finally:
        client.close()
        cluster.close()


_UNGUARDED_MAIN = (
    "a LocalCluster was started from the top level of the script {script} (line {line}), outside "
    "`if __name__ == \"__main__\":`. Its worker processes re-import that script and would each start a "
    "cluster of their own; put the code that starts the cluster under `if __name__ == \"__main__\":`."
)


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` (either side of the ``==``)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1:
        return False
    sides = [node.test.left, *node.test.comparators]
    names = {n.id for n in sides if isinstance(n, ast.Name)}
    values = {n.value for n in sides if isinstance(n, ast.Constant)}
    return isinstance(node.test.ops[0], ast.Eq) and names == {"__name__"} and values == {"__main__"}


def _unguarded_main_line() -> tuple[str, int] | None:
    """Where the main script's top-level code, outside a ``__main__`` guard, led to this call; else ``None``.

    Worker processes started with ``spawn`` (distributed's default) or
    ``forkserver`` re-import the main script (as ``__mp_main__``), so its
    unguarded top-level code runs again in every worker. In such a worker this
    is the re-import itself; in the main process the guard is looked for in
    the script's source, so the mistake is reported before any worker starts.
    """
    frame = sys._getframe(1)
    top = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in ("__main__", "__mp_main__"):
            top = frame
        frame = frame.f_back
    if top is None:
        return None
    script, line = top.f_code.co_filename, top.f_lineno
    if top.f_globals["__name__"] == "__mp_main__":
        return script, line
    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") not in ("spawn", "forkserver"):
        return None
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")):
        return None  # multiprocessing does not re-import a package's __main__ (``python -m pkg``)
    try:
        tree = ast.parse(Path(script).read_text(), script)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            return None if _is_main_guard(node) else (script, line)
    return None


@contextlib.contextmanager
def cluster_client(
    kind: str | None = "local",
    *,
    address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str | None = None,
    gpus: int | str | Sequence[str] | None = None,
    slurm: SlurmSettings | None = None,
    config_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` on a fresh or existing cluster; close what it started.

    Parameters
    ----------
    kind
        ``"local"`` (worker processes on this machine), ``"slurm"`` (workers
        as SLURM jobs, through dask-jobqueue) or ``"address"`` (connect to the
        scheduler at ``address``). ``None``: dask config ``coar-dask.cluster.kind``.
    address
        Scheduler address for ``kind="address"``, e.g. ``tcp://10.0.0.1:8786``.
    n_workers
        Worker processes of a local CPU cluster; default one per core.
    threads_per_worker
        Threads of each local worker.
    dashboard_address
        Dashboard address, e.g. ``":8787"``; ``":0"`` takes any free port.
        ``None``: any free port for a local cluster; for SLURM,
        ``coar-dask.slurm.dashboard-address`` or dask-jobqueue's setting
        (``:8787`` unless ``jobqueue.slurm.scheduler-options`` says otherwise).
    gpus
        Local kind: ``"auto"`` (default from dask config ``coar-dask.local.gpus``:
        one worker per visible GPU, or CPU workers without GPUs), ``0`` (CPU
        workers), a count, or explicit ``CUDA_VISIBLE_DEVICES`` entries.
    slurm
        SLURM kind: settings already resolved (see :func:`resolve_slurm_settings`).
    config_file
        SLURM kind: a SLURM settings file (``coar-dask config slurm --example`` prints one).
    **kwargs
        Local kind: passed to ``distributed.LocalCluster``. SLURM kind: any
        :class:`SlurmSettings` field (``jobs``, ``adapt``, ``queue``, ``cores``,
        ``memory``, ``gpus_per_job``, ``walltime``...), plus
        ``respawn_interval`` (how often lost jobs are resubmitted).

    Examples
    --------
    >>> with cluster_client("slurm", cores=4, memory="16GB", gpus_per_job=1, adapt="0:8") as client:  # doctest: +SKIP
    ...     run_build(store, experiment, client=client)
    """
    from distributed import Client

    if kind is None:
        kind = dask.config.get("coar-dask.cluster.kind", "local")
    if kind == "address" or (address and kind == "local"):
        if not address:
            raise ConfigError("cluster 'address' needs a scheduler address, e.g. --address tcp://host:8786")
        with _connect(Client, check_address(address)) as client:
            logger.info("connected to scheduler %s (dashboard %s)", address, client.dashboard_link)
            yield client
        return
    if kind == "slurm":
        if n_workers is not None or gpus is not None:
            raise ConfigError(
                "n_workers and gpus are for cluster kind 'local'; for SLURM give jobs=N (or adapt='MIN:MAX') "
                "and gpus_per_job=N"
            )
        respawn = kwargs.pop("respawn_interval", None)
        if respawn is None:
            respawn = dask.config.get("coar-dask.slurm.respawn-interval", "5s")
        if slurm is None:
            if dashboard_address is not None and "dashboard_address" not in kwargs:
                kwargs["dashboard_address"] = dashboard_address
            slurm = resolve_slurm_settings(config_file, **kwargs)
        elif kwargs or config_file is not None:
            raise ConfigError("give either slurm=SlurmSettings(...) or keyword settings/config_file, not both")
        with _slurm_client(slurm, respawn) as client:
            yield client
        return
    if kind != "local":
        raise ConfigError(f"unknown cluster kind {kind!r}; choose one of {CLUSTER_KINDS}.")
    if slurm is not None or config_file is not None:
        raise ConfigError("slurm settings and config_file are for cluster kind 'slurm', not 'local'")
    unguarded = _unguarded_main_line()
    if unguarded is not None:
        raise ConfigError(_UNGUARDED_MAIN.format(script=unguarded[0], line=unguarded[1]))
    if dashboard_address is None:
        dashboard_address = ":0"
    devices = _resolve_local_gpus(gpus) if n_workers is None or gpus is not None else []
    with dask.config.set(worker_dask_config()):  # each nanny hands its worker the config of this moment
        cluster, described = _local_cluster(devices, n_workers, threads_per_worker, dashboard_address, kwargs)
    with cluster, Client(cluster) as client:  # closed in reverse: the client, then the cluster
        logger.info("started local cluster with %s, dashboard at %s", described, client.dashboard_link)
        yield client


def _local_cluster(devices: list[str], n_workers: int | None, threads_per_worker: int, dashboard_address: str,
                   kwargs: dict[str, Any]) -> tuple[Any, str]:
    """A started local cluster: one worker per GPU in ``devices``, else ``n_workers`` CPU workers."""
    from distributed import LocalCluster

    if devices:
        from distributed import Scheduler, SpecCluster

        cluster = SpecCluster(
            workers=local_gpu_worker_specs(devices, threads_per_worker=threads_per_worker),
            scheduler={"cls": Scheduler, "options": {"dashboard_address": dashboard_address}},
            silence_logs=logging.ERROR,
            **kwargs,
        )
        described = f"{len(devices)} GPU worker(s) (CUDA_VISIBLE_DEVICES {','.join(devices)})"
    else:
        cluster = LocalCluster(
            n_workers=n_workers or default_local_workers(),
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=dashboard_address,
            env=dict(WORKER_ENV),
            preload=local_worker_preload(),
            **kwargs,
        )
        described = f"{len(cluster.worker_spec)} CPU worker(s)"
    return cluster, described
