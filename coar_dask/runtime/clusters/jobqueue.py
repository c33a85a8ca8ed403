"""Batch-system kinds over dask-jobqueue: SLURM, PBS, LSF, SGE and HTCondor.

One small entry per kind (:class:`JobqueueKind`, registered in
:data:`JOBQUEUE_KINDS`): its name (also dask-jobqueue's config section,
``jobqueue.<name>``), its dask-jobqueue cluster class, and what coar_dask
adds to it: the directive that asks for a GPU, how to read the kind's
walltime (workers leave before it), and a check of the site.

Settings pass through to dask-jobqueue. Its own keywords (``cores``,
``memory``, ``queue``, ``walltime``, ``job_extra_directives``, any key of
``jobqueue.<kind>``) come from arguments, then a settings file; what neither
gives, dask-jobqueue reads from dask's config (``jobqueue.<kind>.*``, so a
site's ``jobqueue.yaml`` works). coar_dask's own settings (``jobs``,
``adapt``, ``gpus_per_job``, ``lifetime``...) come from arguments, the file,
then ``coar-dask.<kind>.*``, then ``coar-dask.jobqueue.*`` (defaults in the
packaged ``coar_dask.yaml``). On top of dask-jobqueue, every kind gets:

- ``gpus_per_job=1``: the kind's GPU directive (``--gres=gpu:1`` on SLURM)
  and the worker resource ``GPU=1``; more than one GPU per job is refused
  (one worker would run every task on its first GPU): ask for more jobs;
- workers that leave before the walltime (``--lifetime``, with a stagger,
  derived from the walltime), and lost jobs resubmitted, so a build longer
  than one walltime keeps going;
- the local workers' environment (one BLAS thread, malloc settings, the
  profiler interval) exported in the job script.

The job script is a pure string: :func:`job_script`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import dask
import dask.config
import dask.utils

from coar_dask import config as _config  # noqa: F401  (loads coar_dask's dask.config defaults)
from coar_dask._yaml import read_yaml_file
from coar_dask.config import worker_dask_config
from coar_dask.errors import ConfigError, missing_dependency
from coar_dask.runtime.clusters.local import WORKER_ENV
from coar_dask.runtime.clusters.walltime import (
    parse_adapt,
    parse_hms_walltime,
    parse_lsf_walltime,
    parse_walltime,
    worker_lifetime,
)

__all__ = ["JobqueueKind", "JOBQUEUE_KINDS", "register_jobqueue_kind", "JobqueueSettings",
           "resolve_jobqueue_settings", "load_jobqueue_config", "job_script", "import_jobqueue", "jobqueue_client"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobqueueKind:
    """One batch system, as dask-jobqueue drives it, and what coar_dask adds.

    Attributes
    ----------
    name
        The ``--cluster`` name, and dask-jobqueue's config section (``jobqueue.<name>``).
    label
        How messages name the batch system.
    cluster_class
        The cluster class in ``dask_jobqueue`` (its ``job_cls`` writes the job script).
    gpu_directive
        The job directive asking for ``{n}`` GPUs (HTCondor's is a ``key = value`` submit attribute).
    gpu_markers
        Text in a directive the user gave that already asks for GPUs (then none is added).
    walltime
        Seconds in a walltime of this kind (for worker lifetimes); ``None``: the kind has no walltime.
    account_key
        dask-jobqueue's name for the account a job is charged to (``project`` on
        LSF and SGE); ``account`` is accepted for it. ``None``: the kind has none.
    required
        Settings a job cannot go without.
    site_check
        Run before a cluster starts (the submit commands are always checked).
    """

    name: str
    label: str
    cluster_class: str
    gpu_directive: str
    gpu_markers: tuple[str, ...]
    walltime: Callable[[str], int] | None
    account_key: str | None = "account"
    required: tuple[str, ...] = ("cores", "memory")
    site_check: Callable[["JobqueueSettings"], None] | None = None

    def with_gpus(self, directives: Any, n: int) -> Any:
        """``directives`` plus the GPU directive, unless one of them already asks for GPUs."""
        if isinstance(directives, Mapping):  # HTCondor: submit attributes
            if any(m in str(k) for k in directives for m in self.gpu_markers):
                return dict(directives)
            key, value = self.gpu_directive.format(n=n).split(" = ")
            return {**directives, key: value}
        directives = list(directives or [])
        if any(m in str(d) for d in directives for m in self.gpu_markers):
            return directives
        return directives + [self.gpu_directive.format(n=n)]


def _check_slurm_partition(settings: "JobqueueSettings") -> None:
    """SLURM answers, and the queue is one of its partitions (else jobs would stay 'created' forever)."""
    try:
        done = subprocess.run([shutil.which("sinfo") or "sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(f"cannot query SLURM (sinfo): {err}") from None
    if done.returncode != 0:
        hint = "" if os.environ.get("SLURM_CONF") else " If slurm.conf is not in /etc/slurm, export SLURM_CONF=/path/to/slurm.conf."
        raise ConfigError(f"SLURM does not answer (sinfo failed: {done.stderr.strip()[-300:]}).{hint}")
    partitions = {p.strip().rstrip("*") for p in done.stdout.split()}
    queue = settings.get("queue")
    if queue is not None and partitions and queue not in partitions:
        raise ConfigError(f"SLURM has no partition {queue!r}; available: {', '.join(sorted(partitions))}. "
                          "Set queue (--queue) to one of them.")


#: The batch systems, by ``--cluster`` name. GPU directives are the common forms; a site whose
#: form differs gives its own in ``job_extra_directives`` (then none is added).
JOBQUEUE_KINDS: dict[str, JobqueueKind] = {}


def register_jobqueue_kind(kind: JobqueueKind) -> JobqueueKind:
    """Add (or replace) a batch-system kind; ``cluster_client(kind.name)`` and ``--cluster`` then know it."""
    JOBQUEUE_KINDS[kind.name] = kind
    return kind


register_jobqueue_kind(JobqueueKind("slurm", "SLURM", "SLURMCluster", "--gres=gpu:{n}", ("--gres", "--gpus"),
                                    parse_walltime, site_check=_check_slurm_partition))
register_jobqueue_kind(JobqueueKind("pbs", "PBS", "PBSCluster", "-l ngpus={n}", ("gpus",), parse_hms_walltime))
register_jobqueue_kind(JobqueueKind("lsf", "LSF", "LSFCluster", '-gpu "num={n}"', ("-gpu",), parse_lsf_walltime,
                                    account_key="project"))
register_jobqueue_kind(JobqueueKind("sge", "SGE", "SGECluster", "-l gpu={n}", ("gpu",), parse_hms_walltime,
                                    account_key="project"))
register_jobqueue_kind(JobqueueKind("htcondor", "HTCondor", "HTCondorCluster", "request_gpus = {n}",
                                    ("request_gpus",), None, account_key=None,
                                    required=("cores", "memory", "disk")))


def _kind(name: str) -> JobqueueKind:
    try:
        return JOBQUEUE_KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown batch system {name!r}; choose one of {sorted(JOBQUEUE_KINDS)}") from None


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


def _jobqueue(kind: JobqueueKind) -> Any:
    """dask_jobqueue (its defaults now in dask's config), or the install command."""
    try:
        return import_jobqueue()
    except ImportError:
        raise missing_dependency("dask-jobqueue", "slurm", f"{kind.label} clusters") from None


# ------------------------------------------------------------------ settings

#: coar_dask's own settings (config keys: coar-dask.<kind>.<key>, then coar-dask.jobqueue.<key>).
_OWN = ("jobs", "adapt", "gpus_per_job", "lifetime", "lifetime_stagger", "lifetime_restart", "dashboard_address")
#: Keys dask-jobqueue deprecated, and their replacements.
_DEPRECATED = {"env_extra": "job-script-prologue", "job_extra": "job-extra-directives", "extra": "worker-extra-args",
               "header_skip": "job-directives-skip"}
_OFF = ("off", "none", "no", "false", "")


def _config_key(name: str) -> str:
    """Field/keyword name -> config key (``job_name`` -> ``name``, ``gpus_per_job`` -> ``gpus-per-job``)."""
    return "name" if name == "job_name" else name.replace("_", "-")


def _own_config(kind: str, name: str) -> Any:
    """coar_dask's setting ``name`` for ``kind`` from dask's config: ``coar-dask.<kind>``, else ``coar-dask.jobqueue``."""
    key = _config_key(name)
    return dask.config.get(f"coar-dask.jobqueue.{key}", None,
                           override_with=dask.config.get(f"coar-dask.{kind}.{key}", None))


def _cores_memory_help(kind: JobqueueKind) -> str:
    return (f"{kind.label} jobs need cores and memory per job. Give them as arguments "
            f"(cluster_client('{kind.name}', cores=4, memory='16GB') or --cores 4 --memory 16GB), in a settings file "
            f"(--jobqueue-config FILE with 'cores: 4' and 'memory: 16GB'; `coar-dask config slurm --example > "
            f"settings.yaml` writes a commented one), or in dask's config "
            f"(~/.config/dask/jobqueue.yaml: jobqueue.{kind.name}.cores / jobqueue.{kind.name}.memory).")


@dataclass(frozen=True)
class JobqueueSettings:
    """How the batch jobs of Dask workers are requested (validated; build with :func:`resolve_jobqueue_settings`).

    Attributes
    ----------
    kind
        The batch system (a key of :data:`JOBQUEUE_KINDS`).
    options
        dask-jobqueue keywords given by arguments or a settings file
        (``cores``, ``memory``, ``queue``, ``walltime``, ``shebang``...).
        Those not given are left to dask-jobqueue, which reads
        ``jobqueue.<kind>.*``; :meth:`get` shows the value a job will get.
    jobs, adapt
        A fixed number of jobs, or adaptive ``(min, max)`` jobs.
    gpus_per_job
        0 or 1: the kind's GPU directive on each job, and the worker resource
        ``GPU=1``. More is refused (the job's one worker would run every task
        on its first GPU): ask for more jobs.
    lifetime, lifetime_stagger
        ``"auto"`` (derived from the walltime by :func:`worker_lifetime`),
        ``"off"``, or a duration such as ``"55m"``.
    lifetime_restart
        Restart the worker inside its job at end of life. Off by default: a
        restarted worker would still be killed at the walltime; a new job is
        submitted instead.
    dashboard_address
        The scheduler's dashboard address (``None``: dask-jobqueue's ``scheduler-options``).
    """

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)
    jobs: int | None = None
    adapt: tuple[int, int] | None = None
    gpus_per_job: int = 0
    lifetime: str = "auto"
    lifetime_stagger: str = "auto"
    lifetime_restart: bool = False
    dashboard_address: str | None = None

    def get(self, name: str) -> Any:
        """The value of dask-jobqueue keyword ``name`` a job gets: given, else ``jobqueue.<kind>.<key>``."""
        return dask.config.get(f"jobqueue.{self.kind}.{_config_key(name)}", None, override_with=self.options.get(name))

    @property
    def spec(self) -> JobqueueKind:
        """The kind's registry entry."""
        return _kind(self.kind)

    def __post_init__(self) -> None:
        missing = [k for k in self.spec.required if self.get(k) is None]
        if missing:
            if {"cores", "memory"} & set(missing):
                raise ConfigError(_cores_memory_help(self.spec))
            raise ConfigError(f"{self.spec.label} jobs need {', '.join(missing)} per job, e.g. "
                              f"--{missing[0]} 10GB or jobqueue.{self.kind}.{missing[0]} in dask's config.")
        self._check_job_size()
        if self.jobs is not None and self.adapt is not None:
            raise ConfigError(f"give either jobs ({self.jobs}) or adapt ({self.adapt}), not both")
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 0):
            raise ConfigError(f"jobs must be an integer >= 0, got {self.jobs!r}")
        if self.adapt is not None:
            object.__setattr__(self, "adapt", parse_adapt(self.adapt))
        self._check_gpus()
        if self.get("walltime") is not None and self.spec.walltime is not None:
            self.spec.walltime(self.get("walltime"))
        for name in ("lifetime", "lifetime_stagger"):
            value = getattr(self, name)
            if value == "auto" or str(value).lower() in _OFF:
                continue
            try:
                dask.utils.parse_timedelta(value)
            except (ValueError, TypeError, KeyError):
                raise ConfigError(f"{name} must be 'auto', 'off' or a duration such as '55m', got {value!r}") from None
        if self.lifetime == "auto" and self._walltime_s() is None and self.lifetime_restart:
            raise ConfigError("lifetime_restart needs a lifetime: set walltime or lifetime")

    def _check_job_size(self) -> None:
        cores, memory, processes = self.get("cores"), self.get("memory"), self.processes
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ConfigError(f"cores must be a positive integer (cores per job), got {cores!r}")
        try:
            if dask.utils.parse_bytes(str(memory)) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ConfigError(f"memory must be an amount such as '16GB' (memory per job), got {memory!r}") from None
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"processes must be a positive integer, got {processes!r}")
        if cores % processes:
            raise ConfigError(f"cores ({cores}) must be a multiple of processes ({processes})")

    def _check_gpus(self) -> None:
        n = self.gpus_per_job
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"gpus_per_job must be an integer >= 0, got {n!r}")
        if n and self.processes != 1:
            raise ConfigError(
                f"gpus_per_job={n} needs processes=1 (got {self.processes}): all worker "
                "processes of a job would share its GPUs. Ask for more jobs instead, e.g. jobs=4 with gpus_per_job=1."
            )
        if n > 1:
            # One worker per job whose tasks all ran on cuda:0 (issue 18): one GPU per job, more jobs.
            raise ConfigError(
                f"gpus_per_job={n}: each job runs one Dask worker, whose tasks would all use its "
                f"first GPU; ask for one GPU per job and more jobs instead: --jobs N --gpus-per-job 1 "
                f"(jobs=N, gpus_per_job=1)"
            )

    # -- derived ------------------------------------------------------------

    @property
    def processes(self) -> int:
        """Worker processes per job: 1 unless set (one worker per job keeps GPU jobs,
        resubmission and lifetimes simple; dask-jobqueue's own default splits the cores)."""
        return self.get("processes") or 1

    def _walltime_s(self) -> int | None:
        walltime = self.get("walltime")
        return None if walltime is None or self.spec.walltime is None else self.spec.walltime(walltime)

    def lifetime_args(self) -> list[str]:
        """``dask worker`` arguments that make workers leave before the walltime."""
        if str(self.lifetime).lower() in _OFF:
            return []
        walltime_s = self._walltime_s()
        auto = worker_lifetime(walltime_s) if walltime_s is not None else None
        if self.lifetime == "auto":
            if auto is None:
                return []
            life = auto[0]
        else:
            life = int(dask.utils.parse_timedelta(self.lifetime))
        if self.lifetime_stagger == "auto":
            stagger = auto[1] if auto is not None else int(life * 0.05)
        elif str(self.lifetime_stagger).lower() in _OFF:
            stagger = 0
        else:
            stagger = int(dask.utils.parse_timedelta(self.lifetime_stagger))
        if walltime_s is not None and life + stagger >= walltime_s:
            raise ConfigError(
                f"lifetime {life}s + stagger {stagger}s is not shorter than the walltime {self.get('walltime')}: "
                f"workers would be killed by {self.spec.label} mid-task; use lifetime='auto'"
            )
        args = ["--lifetime", f"{life}s"]
        if stagger:
            args += ["--lifetime-stagger", f"{stagger}s"]
        if self.lifetime_restart:
            args.append("--lifetime-restart")
        return args

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the kind's dask-jobqueue cluster class for these settings."""
        directives = self.get("job_extra_directives") or ({} if self.kind == "htcondor" else [])
        worker_args = list(self.get("worker_extra_args") or [])
        if self.gpus_per_job:
            directives = self.spec.with_gpus(directives, self.gpus_per_job)
            worker_args = _add_resource(worker_args, "GPU", self.gpus_per_job)
        worker_args += self.lifetime_args()
        prologue = list(self.get("job_script_prologue") or [])
        # The local workers' environment (one BLAS thread per Dask thread, ...), except what the site's prologue sets.
        env = {**WORKER_ENV, **{"DASK_" + key.upper().replace(".", "__").replace("-", "_"): value
                                for key, value in worker_dask_config().items()}}
        prologue += [f"export {k}={v}" for k, v in env.items() if not any(k in line for line in prologue)]
        kwargs = {**self.options, "processes": self.processes, "job_extra_directives": directives,
                  "job_script_prologue": prologue, "worker_extra_args": worker_args}
        scheduler_options = dict(self.get("scheduler_options") or {})
        if self.dashboard_address is not None:
            scheduler_options["dashboard_address"] = self.dashboard_address
        if scheduler_options:
            kwargs["scheduler_options"] = scheduler_options
        return kwargs

    # -- conversion ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as settings-file keys (hyphenated), e.g. for logging."""
        out = {_config_key(k): v for k, v in self.options.items()}
        for name in _OWN:
            out[_config_key(name)] = getattr(self, name)
        if self.adapt is not None:
            out["adapt"] = f"{self.adapt[0]}:{self.adapt[1]}"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], kind: str = "slurm") -> "JobqueueSettings":
        """Settings of ``kind`` from settings-file keys (hyphens or underscores), validated."""
        values = _coerce(_normalise_keys(_kind(kind), data, where=f"{_kind(kind).label} settings"))
        own = {k: values.pop(k) for k in _OWN if k in values}
        return cls(kind=kind, options=values, **own)


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


def _normalise_keys(kind: JobqueueKind, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Settings keys (``gpus-per-job`` / ``gpus_per_job``) -> keyword names; unknown keys fail.

    Valid: coar_dask's own settings, and every key of dask-jobqueue's section
    ``jobqueue.<kind>`` (so each kind takes its own: ``resource-spec``, ``disk``...).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    _jobqueue(kind)  # its defaults, hence its keys, are in dask's config once it is imported
    section = dask.config.get(f"jobqueue.{kind.name}", {}) or {}
    deprecated = {**_DEPRECATED, **({"project": "account"} if "account" in section else {})}
    valid = ({"job_name" if k == "name" else k.replace("-", "_") for k in section} | set(_OWN)) - set(deprecated)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = "job_name" if name == "name" else name
        if name == "account" and kind.account_key not in (None, "account"):
            name = kind.account_key
        if name in deprecated:
            raise ConfigError(f"{where}: '{key}' is deprecated by dask-jobqueue; use '{deprecated[name]}' instead")
        if name not in valid:
            raise ConfigError(f"{where}: unknown setting '{key}'. Valid settings: "
                              f"{', '.join(sorted(_config_key(v) for v in valid))}")
        out[name] = value
    return out


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    """YAML/CLI values -> the types checked and passed on ('4' -> 4, a string -> a one-item list, ...)."""
    out = dict(values)
    for name in ("job_script_prologue", "worker_extra_args", "job_directives_skip", "job_extra_directives"):
        value = out.get(name)
        if isinstance(value, str):
            out[name] = [value]
        elif isinstance(value, (list, tuple)):
            out[name] = [str(v) for v in value]
        elif value is not None and not (name == "job_extra_directives" and isinstance(value, Mapping)):
            raise ConfigError(f"{_config_key(name)} must be a list of strings, got {type(value).__name__}: {value!r}")
    for name in ("cores", "processes", "jobs", "gpus_per_job"):
        if out.get(name) is not None and not isinstance(out[name], bool):
            try:
                out[name] = int(out[name])
            except (TypeError, ValueError):
                raise ConfigError(f"{_config_key(name)} must be an integer, got {out[name]!r}") from None
    for name in ("memory", "walltime"):
        if out.get(name) is not None:
            out[name] = str(out[name])
    if "adapt" in out:
        out["adapt"] = parse_adapt(out["adapt"])
    for name in ("lifetime", "lifetime_stagger"):
        if name in out:
            out[name] = "off" if out[name] in (None, False) else str(out[name])
    if "lifetime_restart" in out:
        out["lifetime_restart"] = bool(out["lifetime_restart"])
    return out


def load_jobqueue_config(path: str | os.PathLike, kind: str = "slurm") -> dict[str, Any]:
    """Read a settings file (``coar-dask config slurm --example`` prints one) into keyword-named settings.

    The file holds the settings at its top level, or under ``<kind>:``, or
    under ``jobqueue: <kind>:`` (so a site's ``jobqueue.yaml`` can be given
    as it is). Keys use hyphens or underscores.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or has an unknown key.
    """
    path = Path(path)
    spec = _kind(kind)
    hint = "`coar-dask config slurm --example` prints a commented example"
    data = read_yaml_file(path, f"{spec.label} settings file", hint) or {}
    if isinstance(data, Mapping):
        if isinstance(data.get("jobqueue"), Mapping):
            data = data["jobqueue"].get(kind) or {}
        elif isinstance(data.get(kind), Mapping):
            data = data[kind]
    return _normalise_keys(spec, data, where=f"{spec.label} settings file {path}")


def resolve_jobqueue_settings(kind: str = "slurm", config_file: str | os.PathLike | None = None,
                              **kwargs: Any) -> JobqueueSettings:
    """Settings of a batch-system cluster: arguments, then a settings file, then dask's config.

    A setting given as an argument (not ``None``) wins; else the file's. What
    neither gives: dask-jobqueue's keywords are left to dask-jobqueue
    (``jobqueue.<kind>.<key>``); coar_dask's come from ``coar-dask.<kind>.<key>``,
    else ``coar-dask.jobqueue.<key>``. ``jobs`` and ``adapt`` are resolved
    together: the first source that sets either wins; with neither, one job.

    Parameters
    ----------
    kind
        ``"slurm"``, ``"pbs"``, ``"lsf"``, ``"sge"`` or ``"htcondor"`` (:data:`JOBQUEUE_KINDS`).
    config_file
        A settings file (see :func:`load_jobqueue_config`).
    **kwargs
        dask-jobqueue keywords of the kind (``cores=4, memory="16GB", queue="gpu"``)
        and coar_dask's (``jobs``, ``adapt``, ``gpus_per_job``, ``lifetime``...).

    Raises
    ------
    ConfigError
        Unknown settings, bad values, or no cores/memory anywhere (the
        message says where to put them).

    Examples
    --------
    >>> s = resolve_jobqueue_settings("slurm", cores=2, memory="8GB", jobs=3, walltime="01:00:00", gpus_per_job=1)
    >>> s.jobs, s.cluster_kwargs()["job_extra_directives"]
    (3, ['--gres=gpu:1'])
    """
    spec = _kind(kind)
    given = {k: v for k, v in _normalise_keys(spec, kwargs, where=f"cluster_client({kind!r})").items()
             if v is not None}
    from_file = load_jobqueue_config(config_file, kind) if config_file is not None else {}
    explicit = {**{k: v for k, v in from_file.items() if v is not None}, **given}
    scaling = next(({k: s[k] for k in ("jobs", "adapt") if s.get(k) is not None}
                    for s in (given, from_file, {k: _own_config(kind, k) for k in ("jobs", "adapt")})
                    if s.get("jobs") is not None or s.get("adapt") is not None), {"jobs": 1})
    own = {name: explicit.get(name, _own_config(kind, name)) for name in _OWN if name not in ("jobs", "adapt")}
    own = {k: v for k, v in own.items() if v is not None}
    options = {k: v for k, v in explicit.items() if k not in _OWN}
    return JobqueueSettings(kind=kind, options=_coerce(options), **_coerce({**own, **scaling}))


def job_script(
    settings: JobqueueSettings | None = None,
    *,
    kind: str = "slurm",
    config_file: str | os.PathLike | None = None,
    scheduler_address: str = "tcp://<scheduler-address>:8786",
    **kwargs: Any,
) -> str:
    """The batch script each job would run, as text (nothing is submitted).

    Parameters
    ----------
    settings
        Resolved settings; else they are resolved for ``kind`` from ``config_file``
        and ``kwargs`` as by :func:`resolve_jobqueue_settings`.
    scheduler_address
        Address written into the worker command (known only once a cluster runs).

    Examples
    --------
    >>> print(job_script(kind="pbs", cores=1, memory="2GB", gpus_per_job=1, walltime="00:30:00"))  # doctest: +SKIP
    #!/usr/bin/env bash
    #PBS -N dask-worker
    #PBS -l select=1:ncpus=1:mem=2GB
    #PBS -l walltime=00:30:00
    #PBS -l ngpus=1
    ...
    """
    if settings is None:
        settings = resolve_jobqueue_settings(kind, config_file, **kwargs)
    elif kwargs or config_file is not None:
        raise ConfigError("give either settings or config_file/keyword settings to job_script, not both")
    job_cls = getattr(_jobqueue(settings.spec), settings.spec.cluster_class).job_cls
    job_kwargs = settings.cluster_kwargs()
    job_kwargs.pop("scheduler_options", None)
    job_kwargs.pop("shared_temp_directory", None)
    try:
        return job_cls(scheduler_address, name="<worker-name>", **job_kwargs).job_script()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"dask-jobqueue refused the {settings.spec.label} settings: {err}") from None


# --------------------------------------------------------------- the client


def _check_commands(settings: JobqueueSettings, job_cls: Any) -> None:
    """Fail early, with the fix, where dask-jobqueue would leave jobs 'created' forever."""
    commands = [str(job_cls.submit_command).split()[0], str(job_cls.cancel_command).split()[0]]
    if any(shutil.which(c) is None for c in commands):
        label = settings.spec.label
        raise ConfigError(f"cluster '{settings.kind}' needs {label}'s commands ({', '.join(commands)}) on PATH: "
                          f"run it on a {label} login node, or use cluster 'local'")
    if settings.spec.site_check is not None:
        settings.spec.site_check(settings)


def _start_respawner(cluster: Any, interval: str | float | None) -> None:
    """Resubmit jobs whose worker was lost (walltime, ``--lifetime``, scancel, node failure).

    dask-jobqueue keeps a lost job in the cluster's spec but never starts it
    again (dask/dask-jobqueue#122, #611), for fixed and adaptive clusters
    alike; once distributed drops the dead job (``distributed.deploy.
    lost-worker-timeout`` after the worker left), re-applying the current
    scale submits a replacement under the same name.
    """
    from tornado.ioloop import PeriodicCallback

    seconds = dask.utils.parse_timedelta(interval) if interval not in (None, 0, "0") else 0
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
            logger.info("resubmitting job(s) for lost worker(s) %s", sorted(missing))
            cluster.scale(jobs=len(cluster.worker_spec))

    pc = PeriodicCallback(check, seconds * 1000)
    cluster.periodic_callbacks["coar-dask-respawn"] = pc
    cluster.loop.add_callback(pc.start)


@contextlib.contextmanager
def jobqueue_client(settings: JobqueueSettings, respawn_interval: str | float | None = None) -> Iterator[Any]:
    """A client of a fresh batch-system cluster for ``settings``; its jobs are cancelled after.

    ``respawn_interval``: how often lost jobs are resubmitted (``None``:
    ``coar-dask.<kind>.respawn-interval``, else ``coar-dask.jobqueue.respawn-interval``; 0: never).
    """
    from distributed import Client

    cluster_cls = getattr(_jobqueue(settings.spec), settings.spec.cluster_class)
    _check_commands(settings, cluster_cls.job_cls)
    respawn = respawn_interval if respawn_interval is not None else _own_config(settings.kind, "respawn_interval")
    cluster = cluster_cls(**settings.cluster_kwargs())
    logger.debug("%s job script:\n%s", settings.spec.label, cluster.job_script())
    try:
        if settings.adapt is not None:
            cluster.adapt(minimum_jobs=settings.adapt[0], maximum_jobs=settings.adapt[1])
            scaling = f"adaptive {settings.adapt[0]}..{settings.adapt[1]} jobs"
        else:
            cluster.scale(jobs=settings.jobs)
            scaling = f"{settings.jobs} job(s)"
        _start_respawner(cluster, respawn)
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    logger.info("started %s (%s, %d core(s), %s%s per job), dashboard at %s", settings.spec.cluster_class, scaling,
                settings.get("cores"), settings.get("memory"),
                f", {settings.gpus_per_job} GPU(s)" if settings.gpus_per_job else "", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
