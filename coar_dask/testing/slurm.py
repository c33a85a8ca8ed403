"""A real one-node SLURM cluster in a temporary folder, for tests and benchmarks.

The harness runs Debian's ``munged``, ``slurmctld`` and ``slurmd`` as root on
this machine with every file (config, munge key and socket, state, spool, pid
files, logs) under one folder, and two fake GPUs declared as a generic
resource (``gres``): symlinks to ``/dev/null`` named ``nvidia0`` and
``nvidia1``. Jobs see ``CUDA_VISIBLE_DEVICES`` set by SLURM exactly as on a GPU
node, so GPU scheduling (``--gres=gpu:1``, Dask ``resources={"GPU": 1}``) is
exercised without a GPU.

Use it from Python::

    with local_slurm_cluster() as slurm:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=slurm.env)

(``SLURM_CONF`` is also exported to ``os.environ`` while the block runs, since
``dask_jobqueue.SLURMCluster`` calls ``sbatch`` with the current environment),
or from a shell::

    python -m coar_dask.testing.slurm start --dir /tmp/slurm   # prints export SLURM_CONF=...
    python -m coar_dask.testing.slurm status --dir /tmp/slurm
    python -m coar_dask.testing.slurm stop --dir /tmp/slurm

Processes are stopped by the PIDs in their pid files, never by name: all jobs
are cancelled first (job steps outlive ``slurmd`` otherwise), then ``slurmd``
(with a SIGKILL fallback: without ``slurmctld`` it can ignore SIGTERM for many
seconds), ``slurmctld`` and ``munged``. The traps met on the way are listed in
the project's notes (``shared/notes/slurm-local.md``); the comments below say
which line answers which.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

__all__ = [
    "SlurmHarnessError",
    "SlurmNotInstalledError",
    "LocalSlurm",
    "find_slurm",
    "slurm_unavailable_reason",
    "start_local_slurm",
    "stop_local_slurm",
    "local_slurm_cluster",
    "harness_processes",
    "slurm_is_reachable",
    "main",
]

logger = logging.getLogger(__name__)

#: Binaries the harness runs; the Debian packages that hold them.
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"
#: Marks the daemons' environment, so leftovers of *this* harness can be found.
MARKER_ENV = "COAR_SLURM_HARNESS"
_NAME_FILE = "harness.txt"


class SlurmHarnessError(RuntimeError):
    """The local SLURM cluster could not be started, queried or stopped."""


class SlurmNotInstalledError(SlurmHarnessError):
    """The SLURM/munge binaries (or root rights) the harness needs are missing."""


def find_slurm() -> dict[str, str]:
    """Paths of the daemons and client commands the harness needs.

    Raises
    ------
    SlurmNotInstalledError
        When a binary is missing or the process is not root (slurmd must be),
        with the install command in the message.
    """
    paths: dict[str, str] = {}
    missing = []
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    for name in DAEMONS + CLIENTS:
        found = shutil.which(name, path=search)
        if found is None:
            missing.append(name)
        else:
            paths[name] = found
    if missing:
        raise SlurmNotInstalledError(
            f"SLURM is not installed here (missing: {', '.join(missing)}). "
            f"On Debian/Ubuntu: apt-get install -y {DEBIAN_PACKAGES}"
        )
    if os.geteuid() != 0:
        raise SlurmNotInstalledError(
            "the local SLURM harness runs munged, slurmctld and slurmd as root; run it as root "
            "(e.g. in CI or a container)"
        )
    return paths


def slurm_unavailable_reason() -> str | None:
    """Why the harness cannot run here, or ``None`` when it can (for ``pytest.skip``)."""
    try:
        find_slurm()
    except SlurmNotInstalledError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class LocalSlurm:
    """A running one-node SLURM cluster made by :func:`start_local_slurm`.

    Attributes
    ----------
    root
        Folder holding everything (config, state, logs, fake GPU devices).
    conf_path
        The ``slurm.conf``; every slurm command needs ``SLURM_CONF`` set to it.
    partition
        The (default) partition's name.
    node
        The node's name (this machine's short host name).
    gpus
        Fake GPUs declared on the node.
    """

    root: Path
    conf_path: Path
    partition: str
    node: str
    gpus: int
    pid_files: Mapping[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF``: pass it to slurm commands as ``env=``."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a slurm client command (``sinfo``, ``squeue``, ...) against this cluster."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def job_ids(self) -> list[str]:
        """Ids of the jobs SLURM still lists (pending, running or completing)."""
        out = self.run("squeue", "-h", "-o", "%i", check=False)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    def node_state(self) -> str:
        """The node's state as ``sinfo`` reports it (``idle``, ``mixed``, ``down*``...)."""
        out = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False)
        return out.stdout.strip() or f"unknown ({out.stderr.strip()})"

    def __repr__(self) -> str:
        return f"LocalSlurm(conf_path={str(self.conf_path)!r}, partition={self.partition!r}, gpus={self.gpus})"


# ---------------------------------------------------------------- config files


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_hardware(slurmd: str) -> str:
    """The hardware part of the node line, from ``slurmd -C`` (gotcha 7)."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    first = out.splitlines()[0].split()
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return " ".join(item for item in first if item.split("=", 1)[0] in keep)


def render_slurm_conf(
    *,
    root: Path,
    node: str,
    hardware: str,
    gpus: int,
    partition: str,
    ctld_port: int,
    slurmd_port: int,
    munge_socket: Path,
) -> str:
    """The ``slurm.conf`` text of a one-node cluster under ``root`` (pure)."""
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return "\n".join(
        [
            f"ClusterName=coar{ctld_port}",
            f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A private munge socket instead of /etc/munge (gotcha 1).
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/run/slurmctld.pid",
            f"SlurmdPidFile={root}/run/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            # Bind each job to the cores it was given, as a production cluster does
            # (task/affinity or task/cgroup): a 1-core job must not borrow idle
            # cores, or scaling measured here flatters the 1-worker run.
            "TaskPlugin=task/affinity",
            "JobAcctGatherType=jobacct_gather/none",
            # No AccountingStorageTRES=gres/gpu: slurmctld exits without slurmdbd (gotcha 4).
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # Without it a job that gives no --mem takes the whole node.
            "DefMemPerCPU=1024",
            "ReturnToService=2",
            "KillWait=5",
            "MpiDefault=none",
            "MailProg=/bin/true",  # gotcha 5
            "GresTypes=gpu",
            f"NodeName={node} NodeAddr=127.0.0.1 {hardware}{gres} State=UNKNOWN",
            f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def render_gres_conf(*, node: str, dev_dir: Path, gpus: int) -> str:
    """``gres.conf`` declaring ``gpus`` fake GPU device files (gotcha 3)."""
    if not gpus:
        return "AutoDetect=off\n"
    files = f"{dev_dir}/nvidia0" if gpus == 1 else f"{dev_dir}/nvidia[0-{gpus - 1}]"
    return f"AutoDetect=off\nNodeName={node} Name=gpu File={files}\n"


def _write_files(root: Path, *, gpus: int, partition: str, paths: Mapping[str, str]) -> tuple[Path, Path]:
    """Write config, munge key and fake devices under ``root``; return (slurm.conf, munge socket)."""
    # A reused folder starts clean: slurmctld refuses state saved under another
    # ClusterName, and stale pid files or sockets would mislead start and stop.
    for sub in ("state", "spool", "run", "log"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for sub in ("etc", "state", "spool", "run", "log", "munge", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses a socket folder that is not world-executable (gotcha 1).
    for folder in [root, *(root / sub for sub in ("munge", "run", "log"))]:
        folder.chmod(0o755)
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    dev_dir = root / "dev"
    for i in range(gpus):
        link = dev_dir / f"nvidia{i}"
        if not link.is_symlink():
            # Plain files are refused as GPU devices; symlinks to /dev/null work (gotcha 3).
            link.symlink_to("/dev/null")
    node = socket.gethostname().split(".")[0]
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "etc" / "slurm.conf"
    conf.write_text(
        render_slurm_conf(
            root=root,
            node=node,
            hardware=_node_hardware(paths["slurmd"]),
            gpus=gpus,
            partition=partition,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            munge_socket=munge_socket,
        )
    )
    (root / "etc" / "gres.conf").write_text(render_gres_conf(node=node, dev_dir=dev_dir, gpus=gpus))
    (root / _NAME_FILE).write_text(f"{node}\n{partition}\n{gpus}\n")
    return conf, munge_socket


# ------------------------------------------------------------------- processes


def _pid_files(root: Path) -> dict[str, Path]:
    return {
        "munged": root / "run" / "munged.pid",
        "slurmctld": root / "run" / "slurmctld.pid",
        "slurmd": root / "run" / "slurmd.pid",
    }


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _is_ours(pid: int, root: Path) -> bool:
    """Whether ``pid`` is alive and one of this harness's processes (not a reused pid)."""
    return _proc_environ(pid).get(MARKER_ENV) == str(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def harness_processes(root: Path | str) -> list[int]:
    """PIDs of processes that belong to the harness in ``root``.

    That is the daemons (and the ``slurmstepd`` they fork), which carry
    ``COAR_SLURM_HARNESS=root`` in their environment, and job processes: those
    with this cluster's ``SLURM_CONF`` and a ``SLURM_JOB_ID``. The process
    that submitted the jobs is not one of them.
    """
    root = Path(root).resolve()
    conf = str(root / "etc" / "slurm.conf")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _proc_environ(int(entry.name))
        if env.get(MARKER_ENV) == str(root) or (env.get("SLURM_CONF") == conf and "SLURM_JOB_ID" in env):
            if _alive(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


def _job_processes(root: Path) -> list[int]:
    """Harness processes that belong to jobs: job steps (``slurmstepd``) and what they run."""
    out = []
    for pid in harness_processes(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"slurmstepd") or "SLURM_JOB_ID" in _proc_environ(pid):
            out.append(pid)
    return out


def _wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _daemon_env(root: Path, conf: Path) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(conf), MARKER_ENV: str(root)}


def start_local_slurm(
    root: Path | str | None = None,
    *,
    gpus: int = 2,
    partition: str = "debug",
    timeout: float = 30.0,
) -> LocalSlurm:
    """Start munged, slurmctld and slurmd with all their files under ``root``.

    Parameters
    ----------
    root
        Folder for config, state and logs; a new temporary folder when ``None``.
        An existing folder whose cluster is still running is refused.
    gpus
        Fake GPUs (gres ``gpu``) declared on the node.
    partition
        Name of the (default) partition.
    timeout
        Seconds to wait for the node to become ``idle``.

    Returns
    -------
    LocalSlurm
        The running cluster. Stop it with :func:`stop_local_slurm`.

    Raises
    ------
    SlurmNotInstalledError
        SLURM or munge is not installed, or this is not root.
    SlurmHarnessError
        A daemon did not start or the node did not become idle; the message
        holds the end of the daemons' logs.
    """
    paths = find_slurm()
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="coar-slurm-"))
    root = Path(root).resolve()
    if any(_is_ours(pid, root) for pid in harness_processes(root)):
        raise SlurmHarnessError(
            f"a local SLURM cluster is already running in {root}; stop it first: "
            f"python -m coar_dask.testing.slurm stop --dir {root}"
        )
    conf, munge_socket = _write_files(root, gpus=gpus, partition=partition, paths=paths)
    node, _, _ = (root / _NAME_FILE).read_text().split("\n", 2)
    pid_files = _pid_files(root)
    for f in pid_files.values():
        f.unlink(missing_ok=True)
    slurm = LocalSlurm(root=root, conf_path=conf, partition=partition, node=node, gpus=gpus, pid_files=pid_files)
    env = _daemon_env(root, conf)
    log = root / "log"
    commands = {
        "munged": [
            paths["munged"],
            f"--socket={munge_socket}",
            f"--key-file={root / 'munge' / 'munge.key'}",
            f"--pid-file={pid_files['munged']}",
            f"--log-file={log / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
            "--force",
        ],
        # -c: clean state, so no node stays drained from an earlier run (gotcha 6).
        "slurmctld": [paths["slurmctld"], "-c", "-f", str(conf)],
        "slurmd": [paths["slurmd"], "-f", str(conf)],
    }
    try:
        for name, cmd in commands.items():
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise SlurmHarnessError(
                    f"{name} failed to start (exit {done.returncode}): {done.stderr.strip()}\n"
                    f"{_log_tail(log / f'{name}.log')}"
                )
            if not _wait_for(lambda: (p := _read_pid(pid_files[name])) is not None and _alive(p), timeout):
                raise SlurmHarnessError(
                    f"{name} did not write its pid file {pid_files[name]} within {timeout:.0f} s:\n"
                    f"{_log_tail(log / f'{name}.log')}"
                )
        if not _wait_for(lambda: slurm.node_state().rstrip("*") in ("idle", "mixed", "allocated"), timeout, 0.2):
            raise SlurmHarnessError(
                f"node {node} is {slurm.node_state()!r}, not idle, after {timeout:.0f} s.\n"
                f"slurmctld.log:\n{_log_tail(log / 'slurmctld.log')}\nslurmd.log:\n{_log_tail(log / 'slurmd.log')}"
            )
    except BaseException:
        stop_local_slurm(root)
        raise
    logger.info("local SLURM cluster running: SLURM_CONF=%s, partition %s, %d fake GPUs", conf, partition, gpus)
    return slurm


def _terminate(pid: int, name: str, root: Path, grace: float) -> None:
    if not (_alive(pid) and _is_ours(pid, root)):
        return
    os.kill(pid, signal.SIGTERM)
    if _wait_for(lambda: not _alive(pid), grace):
        return
    # Without slurmctld, slurmd may ignore SIGTERM for >10 s (gotcha 8).
    logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; sending SIGKILL", name, pid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not _alive(pid), 5.0)


def stop_local_slurm(root: Path | str, *, job_timeout: float = 20.0, grace: float = 5.0) -> None:
    """Cancel every job, then stop slurmd, slurmctld and munged by their PIDs.

    Safe to call on a partly started or already stopped cluster. Processes are
    found through the pid files under ``root`` and checked to carry this
    harness's marker before a signal is sent; job processes that survive are
    killed last, by PID.

    Parameters
    ----------
    root
        The folder given to (or made by) :func:`start_local_slurm`.
    job_timeout
        Seconds to wait for cancelled jobs to leave the queue.
    grace
        Seconds a daemon gets to exit after SIGTERM before SIGKILL.
    """
    root = Path(root).resolve()
    conf = root / "etc" / "slurm.conf"
    pid_files = _pid_files(root)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    ctld = _read_pid(pid_files["slurmctld"])
    if conf.exists() and ctld is not None and _alive(ctld) and _is_ours(ctld, root):
        # Cancel jobs first: job steps outlive slurmd otherwise (gotcha 8).
        def queue_empty() -> bool:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and not out.stdout.strip()

        try:
            if not queue_empty():
                subprocess.run(["scancel", "--full", "--partition", _partition(root)], env=env,
                               capture_output=True, timeout=30)
                if not _wait_for(queue_empty, job_timeout, 0.2):
                    logger.warning("jobs still listed %.0f s after scancel; stopping the daemons anyway", job_timeout)
            # A job leaves the queue before its processes have exited (a Dask
            # worker closing under load, KillWait): let slurmstepd finish them
            # and exit itself.
            if not _wait_for(lambda: not _job_processes(root), job_timeout, 0.2):
                logger.warning("job processes still running %.0f s after their jobs ended", job_timeout)
        except (OSError, subprocess.SubprocessError) as err:
            logger.warning("could not cancel jobs before stopping SLURM: %s", err)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = _read_pid(pid_files[name])
        if pid is not None:
            _terminate(pid, name, root, grace)
    leftovers = harness_processes(root)
    if leftovers:
        logger.warning("killing processes of the stopped SLURM cluster that are still running: %s", leftovers)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not harness_processes(root), 5.0)
    logger.info("local SLURM cluster in %s stopped", root)


def _partition(root: Path) -> str:
    try:
        return (root / _NAME_FILE).read_text().split("\n")[1]
    except (OSError, IndexError):
        return "debug"


def slurm_is_reachable(env: Mapping[str, str] | None = None, timeout: float = 10.0) -> bool:
    """Whether ``sinfo`` answers, with ``env`` (default: this process's environment).

    Used to reuse a cluster that is already running (a site's SLURM, or a
    harness started from the shell with ``SLURM_CONF`` exported).
    """
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return False
    try:
        done = subprocess.run([sinfo, "-h", "-o", "%P"], env=dict(env or os.environ),
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


@contextlib.contextmanager
def local_slurm_cluster(
    root: Path | str | None = None,
    *,
    gpus: int = 2,
    partition: str = "debug",
    keep_files: bool = False,
) -> Iterator[LocalSlurm]:
    """Run a one-node SLURM cluster for the duration of a ``with`` block.

    While the block runs, ``SLURM_CONF`` in ``os.environ`` points at the
    cluster's config (``dask_jobqueue`` submits with the current environment;
    without it ``sbatch`` fails and the job silently stays "created").

    Parameters
    ----------
    root
        Folder for the cluster's files; a temporary one (removed afterwards
        unless ``keep_files``) when ``None``.
    gpus, partition
        As in :func:`start_local_slurm`.
    keep_files
        Keep the folder (logs) after stopping.

    Examples
    --------
    >>> with local_slurm_cluster() as slurm:          # doctest: +SKIP
    ...     slurm.run("sbatch", "--gres=gpu:1", "--wrap", "nvidia-smi || true")
    """
    made = root is None
    if made:
        root = Path(tempfile.mkdtemp(prefix="coar-slurm-"))
    slurm = start_local_slurm(root, gpus=gpus, partition=partition)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm.conf_path)
    try:
        yield slurm
    finally:
        stop_local_slurm(slurm.root)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if made and not keep_files:
            shutil.rmtree(slurm.root, ignore_errors=True)


# ------------------------------------------------------------------------- CLI


def _status(root: Path) -> tuple[bool, str]:
    lines = []
    running = True
    for name, path in _pid_files(root).items():
        pid = _read_pid(path)
        up = pid is not None and _alive(pid) and _is_ours(pid, root)
        running &= up
        lines.append(f"{name:10s} {'running' if up else 'stopped'}" + (f" (pid {pid})" if up else ""))
    conf = root / "etc" / "slurm.conf"
    if running:
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for cmd in (["sinfo", "-N", "-o", "%N %P %T %G"], ["squeue"]):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            lines.append(out.stdout.rstrip() or out.stderr.rstrip())
    return running, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coar_dask.testing.slurm start|stop|status --dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m coar_dask.testing.slurm",
        description="Start, stop or inspect a one-node SLURM cluster (munge, slurmctld, slurmd) in DIR.",
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder of the cluster's files (start: a new temporary folder when omitted)")
    parser.add_argument("--gpus", type=int, default=2, help="fake GPUs on the node (start; default 2)")
    parser.add_argument("--partition", default="debug", help="partition name (start; default debug)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action != "start" and args.dir is None:
        parser.error(f"{args.action} needs --dir")
    try:
        if args.action == "start":
            slurm = start_local_slurm(args.dir, gpus=args.gpus, partition=args.partition)
            # The one line a shell needs: eval "$(python -m coar_dask.testing.slurm start ...)".
            sys.stdout.write(f"export SLURM_CONF={slurm.conf_path}\n")
            return 0
        if args.action == "stop":
            stop_local_slurm(args.dir)
            return 0
        running, text = _status(args.dir.resolve())
        sys.stdout.write(text + "\n")
        return 0 if running else 1
    except SlurmHarnessError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
