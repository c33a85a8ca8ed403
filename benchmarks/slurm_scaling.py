"""Build throughput on SLURM: 1 worker job against 2 worker jobs, same experiment.

Uses the SLURM cluster this shell can reach (``sinfo`` answers, e.g. with
``SLURM_CONF`` exported); otherwise starts the project's one-node harness
(:mod:`coar_dask.testing.slurm`, needs root and Debian's slurm packages) for
the run. Each measurement builds a fresh digits store of ``--rows`` rows with
``dask_jobqueue.SLURMCluster`` scaled to N jobs of one single-threaded worker
each; cluster start-up and the workers' first model load are not timed.

    python benchmarks/slurm_scaling.py                 # table, ratio last
    python benchmarks/slurm_scaling.py --json          # {"one_worker_models_per_s", ...}

The acceptance bar of issue 4 is a speedup >= 1.8 with 2 workers. To tell
the build's own losses from the machine's, the same run also measures the
*ceiling*: the same blocks (masks sampled, outputs computed; no Dask, SLURM
or zarr) in 1 and then 2 plain single-threaded processes, each bound to its
own core as the SLURM jobs are. Its ratio is what two cores of this machine
give at all (on a 2-core VM, two busy cores run slower than one busy core);
``efficiency`` is the build's speedup over it. On a 2-core machine the
scheduler and this process also share the cores with the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))
    # ... and let the worker jobs (which inherit this environment) import it too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))


@contextlib.contextmanager
def reachable_slurm(queue: str | None) -> Iterator[dict[str, Any]]:
    """Settings for jobs on a running SLURM cluster, starting the harness if none answers."""
    from coar_dask.testing.slurm import local_slurm_cluster, slurm_is_reachable

    if slurm_is_reachable():
        yield {"queue": queue, "where": f"existing SLURM cluster (SLURM_CONF={os.environ.get('SLURM_CONF', '/etc/slurm')})"}
        return
    with local_slurm_cluster(gpus=2) as slurm:
        yield {"queue": queue or slurm.partition, "interface": "lo", "where": f"local harness ({slurm.conf_path})"}


def _bare_child(rank: int, experiment: Any, blocks: list[range], barrier: Any, queue: Any) -> None:
    """One plain process: the build's per-block work (sample masks, compute outputs) on one core."""
    try:
        from coar_dask.ablation.engine import compute_outputs
        from coar_dask.core.experiment import load_state
        from coar_dask.core.masks import sample_masks
        from coar_dask.runtime.worker import apply_malloc_env

        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
        apply_malloc_env(only_in_dask_worker=False)
        import torch

        torch.set_num_threads(1)
        state = load_state(experiment)

        def block(rows: range) -> None:
            compute_outputs(state, sample_masks(experiment.mask_seed, rows, state.n_components, experiment.alpha))

        block(blocks[0])  # warm-up, untimed
        barrier.wait()
        t0 = time.perf_counter()
        for rows in blocks:
            block(rows)
        queue.put((rank, sum(map(len, blocks)), time.perf_counter() - t0))
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        queue.put((rank, exc, None))


def measure_bare(n_procs: int, experiment: Any, *, rows: int, rows_per_block: int) -> dict[str, float]:
    """The ceiling: ``rows`` rows in blocks, dealt round-robin to ``n_procs`` plain single-threaded processes."""
    import multiprocessing as mp
    from unittest import mock

    from coar_dask.runtime.clusters import WORKER_ENV

    blocks = [range(a, min(a + rows_per_block, rows)) for a in range(0, rows, rows_per_block)]
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_bare_child, args=(r, experiment, blocks[r::n_procs], barrier, queue))
             for r in range(n_procs)]
    with mock.patch.dict(os.environ, WORKER_ENV):  # as the worker jobs get it (malloc is read at process start)
        for proc in procs:
            proc.start()
    results = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    for _, done, _ in results:
        if isinstance(done, BaseException):
            raise done
    seconds = max(sec for _, _, sec in results)
    return {"procs": n_procs, "seconds": seconds, "models_per_s": sum(d for _, d, _ in results) / seconds}


def measure(
    n_jobs: int,
    experiment: Any,
    *,
    rows: int,
    rows_per_block: int,
    workdir: Path,
    slurm: dict[str, Any],
    cores: int = 1,
    memory: str = "2GB",
) -> dict[str, float]:
    """Build one fresh store on ``n_jobs`` SLURM worker jobs; return seconds and models/s."""
    from coar_dask.runtime.build import execute_plan, plan_build
    from coar_dask.runtime.clusters import cluster_client
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.core.experiment import load_state, warm_up

    state = load_state(experiment)
    store = eval_store_for(workdir / f"store-{n_jobs}", experiment, rows, state.n_components, state.n_examples,
                           rows_per_chunk=rows_per_block)
    settings = {k: v for k, v in slurm.items() if k != "where" and v is not None}
    settings.setdefault("log_directory", str(workdir / "job-logs"))
    # Workers of consecutive clusters do not share (and purge) one scratch folder.
    settings.setdefault("local_directory", str(workdir / f"worker-space-{n_jobs}"))
    t0 = time.perf_counter()
    with cluster_client("slurm", jobs=n_jobs, cores=cores, memory=memory, walltime="01:00:00",
                        dashboard_address=":0", **settings) as client:
        client.wait_for_workers(n_jobs, timeout=300)
        startup = time.perf_counter() - t0
        client.run(warm_up, experiment)  # model and examples loaded once per worker, untimed
        plan = plan_build(store, experiment)
        t0 = time.perf_counter()
        report = execute_plan(plan, client)
        seconds = time.perf_counter() - t0
    if not store.completed_rows().all():
        raise RuntimeError(f"the build on {n_jobs} job(s) left rows pending")
    return {"jobs": n_jobs, "seconds": seconds, "models_per_s": report.rows_done / seconds, "startup_s": startup}


def _versions() -> dict[str, str]:
    import dask
    import distributed
    import torch

    from coar_dask.runtime.clusters import import_jobqueue

    dask_jobqueue = import_jobqueue()  # keeps Ctrl-C a KeyboardInterrupt

    try:
        slurm = subprocess.run(["sinfo", "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        slurm = "?"
    return {"python": platform.python_version(), "torch": torch.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "dask_jobqueue": dask_jobqueue.__version__, "slurm": slurm}


def run(rows: int = 2400, rows_per_block: int = 40, queue: str | None = None, repeats: int = 1,
        ceiling: bool = True, echo=print) -> dict[str, float]:
    """Measure 1 then 2 workers (``repeats`` times, interleaved, best of each); return ``--json``'s figures.

    With ``ceiling``, each repeat also runs the same blocks in 1 and 2 plain
    processes (:func:`measure_bare`) and the summary says how much of that
    ceiling the SLURM build reaches.
    """
    from coar_dask.core.experiment import load_state
    from coar_dask.zoo import digits

    digits.load_model()  # trained and cached once, before any worker needs it
    experiment = digits.experiment()
    state = load_state(experiment)
    with tempfile.TemporaryDirectory(prefix="coar-slurm-bench-") as tmp, reachable_slurm(queue) as slurm:
        echo(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
             f"{' '.join(f'{k} {v}' for k, v in _versions().items())}")
        echo(f"cluster: {slurm['where']}")
        echo(f"work: digits, {rows} rows x {state.n_components} components x {state.n_examples} examples, "
             f"{rows_per_block} rows per block ({-(-rows // rows_per_block)} tasks); 1 core per worker job")
        best: dict[int, float] = {}
        bare: dict[int, float] = {}
        for rep in range(repeats):
            for n in (1, 2):
                workdir = Path(tmp) / f"run-{rep}"
                workdir.mkdir(exist_ok=True)
                r = measure(n, experiment, rows=rows, rows_per_block=rows_per_block, workdir=workdir, slurm=slurm)
                echo(f"  {n} worker job(s): {r['seconds']:7.2f} s  {r['models_per_s']:7.1f} models/s  "
                     f"(cluster start {r['startup_s']:.1f} s, untimed)")
                best[n] = max(best.get(n, 0.0), r["models_per_s"])
            for n in (1, 2) if ceiling else ():
                r = measure_bare(n, experiment, rows=rows, rows_per_block=rows_per_block)
                echo(f"  ceiling, {n} plain process(es): {r['seconds']:7.2f} s  {r['models_per_s']:7.1f} models/s")
                bare[n] = max(bare.get(n, 0.0), r["models_per_s"])
        echo(f"load average after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
             + (f"; best of {repeats} per size" if repeats > 1 else ""))
        if ceiling:
            speedup = best[2] / best[1]
            echo(f"ceiling of this machine (plain processes, 2 / 1): {bare[2] / bare[1]:.2f}x "
                 f"({bare[2]:.1f} / {bare[1]:.1f} models/s); the SLURM build reaches "
                 f"{best[1] / bare[1]:.0%} of it with 1 worker, {best[2] / bare[2]:.0%} with 2; "
                 f"efficiency (speedup / ceiling speedup) {speedup / (bare[2] / bare[1]):.2f}")
    one, two = best[1], best[2]
    return {"one_worker_models_per_s": round(one, 2), "two_workers_models_per_s": round(two, 2),
            "speedup": round(two / one, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2400,
                        help="rows (ablated models) per build (default 2400: 60 tasks, so the last task's wait on "
                             "2 workers is about 1%% of the run)")
    parser.add_argument("--rows-per-block", type=int, default=40, help="rows per block/task (default 40)")
    parser.add_argument("--queue", default=None, help="partition on an existing cluster")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure each size this many times, interleaved, and keep the best (default 3)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the plain-process ceiling (the same blocks without Dask, SLURM or zarr)")
    parser.add_argument("--json", action="store_true", help="print only the JSON figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import dask

    # Before distributed is imported, which sets its loggers from this.
    dask.config.set({"logging": {"distributed": "error", "distributed.scheduler": "error"}})
    echo = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    figures = run(rows=args.rows, rows_per_block=args.rows_per_block, queue=args.queue, repeats=args.repeats,
                  ceiling=not args.no_ceiling, echo=echo)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"speedup (2 workers / 1 worker): {figures['speedup']:.2f}x "
              f"({figures['two_workers_models_per_s']:.1f} / {figures['one_worker_models_per_s']:.1f} models/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
