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
from coar_dask.errors import CoarError

__all__ = ["client_experiment", "is_cuda", "check_gpu_workers", "GPU_WORKERS_HINT"]

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


def check_gpu_workers(client: Any, what: str, error: type[CoarError], cpu_fix: str) -> None:
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

    A cluster without workers yet (adaptive SLURM scaling up from 0) is let
    through: its jobs may bring GPU workers.
    """
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        logger.info("no workers yet: the GPU %ss wait for workers with a GPU resource", what)
        return
    if any((w.get("resources") or {}).get("GPU") for w in workers.values()):
        return
    raise error(
        f"device 'cuda' makes each {what} a GPU task (resources={{'GPU': 1}}), but none of the cluster's "
        f"{len(workers)} worker(s) advertises a GPU, so no GPU workers would ever run them; {GPU_WORKERS_HINT}; "
        f"or run on the CPU with {cpu_fix}."
    )
