"""The ``local`` kind: worker processes on this machine, one per GPU or one per core.

With visible GPUs, one worker per GPU (the dask-cuda layout): each is a
:class:`~coar_dask.runtime.clusters.pinned_nanny.PinnedNanny` whose worker
process starts with its own ``CUDA_VISIBLE_DEVICES`` (so ``cuda:0`` inside
it is its GPU, even in code that runs when the worker re-imports the user's
``__main__``) and advertises the resource ``GPU=1``. Otherwise one
single-threaded worker per core. A script that starts a local cluster from
its top level, outside ``if __name__ == "__main__":``, is refused before any
worker starts (:func:`unguarded_main_line`).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dask
import dask.config

from coar_dask import config as _config  # noqa: F401  (loads coar_dask's dask.config defaults)
from coar_dask.config import worker_dask_config
from coar_dask.errors import ConfigError

__all__ = ["WORKER_ENV", "default_local_workers", "local_worker_preload", "visible_gpus", "local_gpu_worker_specs",
           "unguarded_main_line", "local_client"]

logger = logging.getLogger(__name__)

#: Environment of worker processes: one BLAS/OpenMP thread each, so that
#: N single-threaded workers use N cores without oversubscription.
# malloc: dask's MALLOC_TRIM_THRESHOLD_=65536 pins mmap at 128 KiB -> 3x CPU per digits model (BENCHMARKS.md); applied in workers by coar_dask.runtime.worker.apply_malloc_env
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}

#: The nanny class of GPU workers (named by path: the module imports distributed).
GPU_NANNY = "coar_dask.runtime.clusters.pinned_nanny.PinnedNanny"


def default_local_workers() -> int:
    """One worker process per core (each with one torch thread)."""
    return max(1, os.cpu_count() or 1)


def local_worker_preload() -> list[str]:
    """Preloads of local workers: dask config ``distributed.worker.preload`` plus
    :mod:`coar_dask.runtime.worker`, which makes them ignore Ctrl-C (the CLI
    handles it and closes them)."""
    configured = dask.config.get("distributed.worker.preload", None) or []
    configured = [configured] if isinstance(configured, str) else list(configured)
    return configured + [m for m in ("coar_dask.runtime.worker",) if m not in configured]


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

    Each worker is a :class:`~coar_dask.runtime.clusters.pinned_nanny.PinnedNanny`
    whose worker process starts with its own ``CUDA_VISIBLE_DEVICES`` (so
    ``cuda:0`` inside it is its GPU, already while it re-imports the user's
    ``__main__``), and advertises the resource ``GPU=1``, so tasks submitted
    with ``resources={"GPU": 1}`` run one at a time per GPU.

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
    return {
        f"gpu-{device}": {
            "cls": GPU_NANNY,
            "options": {
                "nthreads": int(threads_per_worker),
                "memory_limit": memory_limit,
                "env": {**base_env, "CUDA_VISIBLE_DEVICES": str(device)},
                "resources": {"GPU": 1},
                "preload": local_worker_preload(),
            },
        }
        for device in devices
    }


def _resolve_local_gpus(gpus: int | str | Sequence[str] | None) -> list[str]:
    """``gpus`` argument of the local kind -> device list (empty: CPU workers).

    ``None``: dask config ``coar-dask.local.gpus``; ``"auto"``: every visible
    GPU; a count: the first that many; devices (``"0,1"`` or a list): those,
    each of which must be visible.
    """
    gpus = dask.config.get("coar-dask.local.gpus", "auto", override_with=gpus)
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


# ------------------------------------------------------------ the main guard

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


def unguarded_main_line() -> tuple[str, int] | None:
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


# ----------------------------------------------------------------- the client


@contextlib.contextmanager
def local_client(
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str | None = None,
    gpus: int | str | Sequence[str] | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """A client of a fresh local cluster (see :func:`coar_dask.runtime.clusters.cluster_client`); closed after."""
    from distributed import Client

    unguarded = unguarded_main_line()
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
