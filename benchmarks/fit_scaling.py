#!/usr/bin/env python
"""Row-parallel least squares: 2 workers vs 1 worker vs in-process, on a CIFAR-sized synthetic store.

The store: P = 2,304 masks at alpha 0.05, K = 1,000 float16 outputs (a
linear function of the masks plus noise, around an offset of 20 like raw
logits), ``--rows`` rows (default 40,000) in the store's default blocks,
built with digests like any store. Three ways fit every row with ``lstsq``
(Gram path), in one run:

- ``in_process``: :func:`coar_dask.fit.fit.fit` without a client (torch uses
  every core of this process);
- ``workers_1`` / ``workers_2``: the same call with a ``LocalCluster`` of 1 or
  2 single-threaded workers (``cluster_client("local")``): ``parallel="auto"``
  chooses row groups, their moments are summed on the workers as a tree and
  solved once on the client (:mod:`coar_dask.fit.moments`).

The workers run twice: as started (``workers_N``) and each pinned to a core
of its own (``workers_N_pinned``, ``sched_setaffinity`` on every thread of
the worker process). A one-thread worker is one core of a cluster job
(``--cpus-per-task=1`` on SLURM gives it a cgroup of one core); unpinned on a
machine with idle cores, one worker also runs its read-ahead thread (which
decodes the next chunks while BLAS works) on another core, so "1 worker" is
then more than one core. ``speedup_2_workers`` = wall time of 1 worker / 2
workers, pinned (one core vs two; acceptance: >= 1.6), and
``speedup_2_workers_unpinned`` the same unpinned; both are printed.

Each way is warmed up (workers started, torch imported) and then timed
``--repeat`` times, best kept; wall-clock and CPU time (this process plus
the workers' processes) are printed. The weights of every way are
compared with the in-process fit's (``max_weight_diff``).

Usage::

    python benchmarks/fit_scaling.py                # 40,000 rows (store built once, ~1 min)
    python benchmarks/fit_scaling.py --rows 6000    # quick
    python benchmarks/fit_scaling.py --json --store /tmp/fit-scaling-store   # keep the store for reruns
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

P, K, ALPHA = 2304, 1000, 0.05


def build_store(path: Path, rows: int) -> Any:
    from coar_dask.core.spec import Spec
    from coar_dask.core.store import init_store, open_store

    if (path / "zarr.json").exists():
        store = open_store(path)
        if store.num_rows == rows and store.completed_rows().all():
            return store
        raise SystemExit(f"{path} holds another store; pass a new --store path")
    store = init_store(path, Spec.for_experiment(rows, P, K), mask_seed=0, alpha=ALPHA)
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.05, size=(P, K)).astype(np.float32)
    for b in store.blocks():
        masks = rng.random((len(b), P)) >= ALPHA
        y = 20.0 + masks.astype(np.float32) @ w + rng.normal(scale=0.1, size=(len(b), K)).astype(np.float32)
        store.write_block(b.index, {"masks": masks, "margins": y.astype(np.float16)})
    return store


def _cpu(client: Any | None) -> float:
    own = time.process_time()
    if client is None:
        return own
    return own + sum(client.run(time.process_time).values())


def timed_fit(store: Any, client: Any | None, repeat: int) -> tuple[dict[str, float], Any]:
    from coar_dask.fit.fit import fit

    fit(store, num_train=min(2000, store.num_rows), client=client)  # warm-up: imports, worker start
    best: dict[str, float] = {}
    attrs = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), _cpu(client)
        attrs = fit(store, client=client)
        wall, cpu = time.perf_counter() - wall, _cpu(client) - cpu
        if wall < best.get("wall_s", float("inf")):
            best = {"wall_s": wall, "cpu_s": cpu}
    return best, attrs


def pin_to_core(cpu: int) -> list[int]:
    """Run on a worker: pin every thread of its process (and the threads they start) to core ``cpu``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:  # a thread that has just ended
            pass
    return sorted(os.sched_getaffinity(0))


def pin_workers(client: Any) -> dict[str, list[int]]:
    """One core per worker, in worker order (core ``i`` for worker ``i``)."""
    cores = sorted(os.sched_getaffinity(0))
    workers = sorted(client.scheduler_info()["workers"])
    if len(workers) > len(cores):
        raise SystemExit(f"{len(workers)} workers but {len(cores)} cores to pin them to")
    return {w: client.run(pin_to_core, cores[i], workers=[w])[w] for i, w in enumerate(workers)}


def machine() -> dict[str, Any]:
    import dask
    import distributed
    import torch
    import zarr

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "torch": torch.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "zarr": zarr.__version__,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run(store_path: Path, rows: int, repeat: int) -> dict[str, Any]:
    from coar_dask.runtime.clusters import cluster_client

    store = build_store(store_path, rows)
    results: dict[str, dict[str, float]] = {}
    weights: dict[str, np.ndarray] = {}
    results["in_process"], a = timed_fit(store, None, repeat)
    weights["in_process"] = a.weight
    pinnable = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    if not pinnable:
        print("this system cannot pin processes to cores (sched_setaffinity) or has one core: "
              "the pinned ways are skipped", file=sys.stderr)
    for pinned in (False, True) if pinnable else (False,):
        for n in (1, 2):
            name = f"workers_{n}" + ("_pinned" if pinned else "")
            with cluster_client("local", n_workers=n) as client:
                cores = pin_workers(client) if pinned else None
                results[name], a = timed_fit(store, client, repeat)
                results[name]["parallel"] = a.metadata.get("parallel")
                if cores:
                    results[name]["cores"] = list(cores.values())
                weights[name] = a.weight
    ref = weights["in_process"]
    for name, w in weights.items():
        results[name]["max_weight_diff"] = float(np.abs(w - ref).max() / max(np.abs(ref).max(), 1e-30))
        results[name]["rows_per_s"] = rows / results[name]["wall_s"]
    u1, u2, ip = results["workers_1"], results["workers_2"], results["in_process"]
    w1, w2 = results.get("workers_1_pinned", u1), results.get("workers_2_pinned", u2)
    return {
        "sizes": {"P": P, "K": K, "rows": rows, "rows_per_chunk": store.rows_per_chunk, "alpha": ALPHA},
        "ways": results,
        "speedup_2_workers": w1["wall_s"] / w2["wall_s"],
        "speedup_2_workers_pinned": pinnable,
        "speedup_2_workers_cpu_ratio": w2["cpu_s"] / w1["cpu_s"],
        "speedup_2_workers_unpinned": u1["wall_s"] / u2["wall_s"],
        "speedup_2_workers_unpinned_cpu_ratio": u2["cpu_s"] / u1["cpu_s"],
        "workers_2_vs_in_process": ip["wall_s"] / u2["wall_s"],
        "workers_1_vs_in_process": ip["wall_s"] / u1["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--store", type=Path, default=None, help="where to build (and reuse) the synthetic store")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="coar-fit-scaling-") as tmp:
        path = args.store or Path(tmp) / "store"
        out = {"machine": machine(), **run(path, args.rows, args.repeat)}
    out["machine"]["load_avg_before_after"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"machine: {out['machine']}\nsizes: {out['sizes']}")
    print(f"{'way':17} {'wall s':>8} {'cpu s':>8} {'rows/s':>9} {'parallel':>9} {'max weight diff':>16}")
    for name, r in out["ways"].items():
        print(f"{name:17} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['rows_per_s']:9,.0f} {str(r.get('parallel')):>9} "
              f"{r['max_weight_diff']:16.2e}")
    print(f"speedup_2_workers {out['speedup_2_workers']:.2f} pinned, one core per worker "
          f"(cpu 2w/1w {out['speedup_2_workers_cpu_ratio']:.2f}); "
          f"{out['speedup_2_workers_unpinned']:.2f} unpinned (cpu 2w/1w "
          f"{out['speedup_2_workers_unpinned_cpu_ratio']:.2f}); "
          f"unpinned 2 workers vs in-process {out['workers_2_vs_in_process']:.2f}; "
          f"1 worker vs in-process {out['workers_1_vs_in_process']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
