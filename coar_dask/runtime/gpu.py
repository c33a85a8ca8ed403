"""GPU rules of the client side: it never touches a GPU, and GPU tasks need GPU workers.

Two rules, each in one place:

- The client (``plan_build``, ``init_experiment_store``, the CLI's checks)
  loads an experiment only to count its components and examples and to run
  the first-batch checks, which do not depend on the device (the device is
  not part of :attr:`~coar_dask.core.experiment.Experiment.fingerprint`). It
  loads it on the CPU (:func:`client_experiment`), so a SLURM login node
  without a GPU can plan a ``device: cuda`` build.
- A task submitted with ``resources={"GPU": 1}`` waits, forever, for a
  worker that advertises that resource. :func:`check_gpu_workers` refuses to
  submit when the cluster has workers and none of them advertises a GPU
  (builds and fits alike), and says how to get GPU workers.
"""

from __future__ import annotations

import logging
from typing import Any

from coar_dask.core.experiment import Experiment
from coar_dask.core.memory import GPU_MEMORY_FRACTION, human
from coar_dask.errors import CoarError

__all__ = ["client_experiment", "is_cuda", "check_gpu_workers", "gpu_memory_total", "GPU_WORKERS_HINT"]

logger = logging.getLogger(__name__)

#: How to get workers with the ``GPU`` resource, for each kind of cluster.
GPU_WORKERS_HINT = (
    "start GPU workers: --cluster local --gpus auto (or --gpus 0,1) on a machine with GPUs, "
    "--cluster slurm --gpus-per-job 1 --jobs N on SLURM, or `dask worker SCHEDULER --resources GPU=1` "
    "(one per GPU, each with its own CUDA_VISIBLE_DEVICES) for --cluster address"
)


def is_cuda(device: Any) -> bool:
    """Whether ``device`` (``"cuda"``, ``"cuda:1"``, a ``torch.device``, ``None``) names a CUDA device."""
    return str(device or "cpu").startswith("cuda")


def client_experiment(experiment: Experiment) -> Experiment:
    """``experiment`` as the client loads it: on the CPU (same fingerprint, same counts).

    Examples
    --------
    >>> from coar_dask.core.experiment import Experiment
    >>> e = Experiment(model="m:f", examples="m:g", device="cuda")
    >>> client_experiment(e).device, client_experiment(e).fingerprint == e.fingerprint
    ('cpu', True)
    """
    return experiment.replace(device="cpu") if is_cuda(experiment.device) else experiment


def check_gpu_workers(client: Any, what: str, error: type[CoarError], cpu_fix: str,
                      need_bytes: float | None = None) -> None:
    """Refuse GPU tasks on a cluster whose workers advertise no ``GPU`` resource (they would wait forever).

    Parameters
    ----------
    client
        A ``distributed.Client``.
    what
        What each task is, e.g. ``"block"`` or ``"slice"`` (for the message).
    error
        The error class to raise (the caller's layer: ``BuildError``, ``RegressionError``).
    cpu_fix
        How to run on the CPU instead, e.g. ``"--device cpu"``.
    need_bytes
        Each task's peak GPU memory from :mod:`coar_dask.core.memory` (``None``: not checked). Refused
        when the workers report their GPUs' memory (Dask's NVML metrics) and none has
        :data:`~coar_dask.core.memory.GPU_MEMORY_FRACTION` of it at least that large.

    A cluster without workers yet (adaptive SLURM scaling up from 0) is let
    through: its jobs may bring GPU workers.
    """
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        logger.info("no workers yet: the GPU %ss wait for workers with a GPU resource", what)
        return
    gpus = [w for w in workers.values() if (w.get("resources") or {}).get("GPU")]
    if gpus:
        _check_gpu_memory(gpus, what, error, cpu_fix, need_bytes)
        return
    raise error(
        f"device 'cuda' makes each {what} a GPU task (resources={{'GPU': 1}}), but none of the cluster's "
        f"{len(workers)} worker(s) advertises a GPU, so no GPU workers would ever run them; {GPU_WORKERS_HINT}; "
        f"or run on the CPU with {cpu_fix}."
    )


def gpu_memory_total(worker: dict[str, Any]) -> int | None:
    """A worker's GPU memory in bytes as Dask reports it (``gpu: {memory-total}`` when NVML is
    available to the worker), else ``None``."""
    for info in (worker.get("gpu"), (worker.get("metrics") or {}).get("gpu")):
        if isinstance(info, dict) and info.get("memory-total"):
            return int(info["memory-total"])
    return None


def _check_gpu_memory(gpus: list[dict[str, Any]], what: str, error: type[CoarError], cpu_fix: str,
                      need_bytes: float | None) -> None:
    sizes = [s for s in map(gpu_memory_total, gpus) if s]
    if need_bytes is None or not sizes or GPU_MEMORY_FRACTION * max(sizes) >= need_bytes:
        return
    raise error(
        f"each {what} needs about {human(need_bytes)} of GPU memory (coar_dask.core.memory), but the largest "
        f"GPU among the cluster's {len(gpus)} GPU worker(s) has {human(max(sizes))} ({GPU_MEMORY_FRACTION:.0%} "
        f"usable); use GPUs with more memory, split the work (fit --slices N, or a smaller run.batch_size / "
        f"masks_per_pass for a build), or run on the CPU with {cpu_fix}."
    )
