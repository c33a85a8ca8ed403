"""Dask clients for builds and fits: a local cluster, or an existing scheduler.

This is the only module (with :mod:`coar_dask.build`'s executor) that knows
about Dask's distributed scheduler; the pure core never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from .errors import ConfigError

__all__ = ["cluster_client", "CLUSTER_KINDS", "default_local_workers"]

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "address")


def default_local_workers() -> int:
    """One worker process per core (each with one torch thread)."""
    return max(1, os.cpu_count() or 1)


#: Environment of worker processes: one BLAS/OpenMP thread each, so that
#: N single-threaded workers use N cores without oversubscription.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def cluster_client(
    kind: str = "local",
    *,
    address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str = ":0",
    **kwargs: Any,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` on a fresh or existing cluster; close what it started.

    Parameters
    ----------
    kind
        ``"local"`` (a ``LocalCluster`` of worker processes on this machine) or
        ``"address"`` (connect to the scheduler at ``address``).
    address
        Scheduler address for ``kind="address"``, e.g. ``tcp://10.0.0.1:8786``.
    n_workers
        Worker processes of a local cluster; default one per core.
    """
    from distributed import Client, LocalCluster

    if kind == "address" or (address and kind == "local"):
        if not address:
            raise ConfigError("cluster 'address' needs a scheduler address, e.g. --address tcp://host:8786")
        client = Client(address)
        logger.info("connected to scheduler %s (dashboard %s)", address, client.dashboard_link)
        try:
            yield client
        finally:
            client.close()
        return
    if kind != "local":
        raise ConfigError(f"unknown cluster kind {kind!r}; choose one of {CLUSTER_KINDS}.")
    cluster = LocalCluster(
        n_workers=n_workers or default_local_workers(),
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=dashboard_address,
        env=dict(WORKER_ENV),
        **kwargs,
    )
    client = Client(cluster)
    logger.info("started LocalCluster, dashboard at %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
