"""Ablated models per second: the seed's way, in-place zeroing, masks per pass, the forward floor, a real build.

On the same model, examples and mask count, in one run:

(a) ``seed``      the seed's way, row by row as its ``make_dataset.py`` does it: ``copy.deepcopy``
                  the model, zero the slices, run the examples, then write the row's mask and
                  float16 margins and its ``_completed`` flag into ``.npy`` memmaps
                  (``update_mmapped_file``); the examples stay in memory (no loader per mask),
                  which flatters the seed
    ``seed-compute``  the same without the row's writes (deepcopy + zero + forward only)
(b) ``inplace``   zero the slices in place and restore them (``masks_per_pass=1``)
(c) ``batched-M`` M masks per forward pass (forward hooks on a batch repeated M times)
    ``auto``      what :func:`coar_dask.ablation.engine.compute_outputs` picks by itself (the build's path)
(d) ``floor``     plain forward passes of the unablated model on the same examples
(e) ``build``     ``coar_dask.runtime.build.run_build`` on a LocalCluster of single-threaded workers

Same total cores for all: (a)-(d) run in ``--workers`` processes at once, each
with one torch thread and the workers' environment (``coar_dask.runtime.clusters.WORKER_ENV``,
malloc settings included), started together behind a barrier; their rates are
summed. (e) uses ``--workers`` single-threaded Dask workers, warmed up (model
and examples loaded) before the timed build; its time is the build's
execution (planning excluded), so it includes mask sampling, zarr writes and
Dask's task overhead. Each of (a)-(d) is measured ``--rounds`` times,
interleaved, and the best round is kept (the machine may be shared).

    python benchmarks/build_throughput.py                          # digits, table
    python benchmarks/build_throughput.py --model cifar_resnet18   # CIFAR-sized ResNet-18, random 32x32 inputs
    python benchmarks/build_throughput.py --json                   # one JSON object
    python benchmarks/build_throughput.py --device cuda --workers 1   # on the GPU (benchmarks/gpu_check.sh)
    python benchmarks/build_throughput.py --malloc dask            # workers with Dask's malloc default

``--malloc``: ``package`` (default: the ``MALLOC_*`` of ``WORKER_ENV``), ``dask``
(Dask's nanny default, ``MALLOC_TRIM_THRESHOLD_=65536``), ``glibc`` (no
``MALLOC_*`` at all), or ``NAME=VALUE,...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))

_MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                "MALLOC_ARENA_MAX")


# ------------------------------------------------------------ experiments


def subset_examples(n: int, factory: str, **kwargs: Any) -> tuple[Any, Any]:
    """The first ``n`` examples of another examples factory (importable by workers)."""
    from coar_dask.core.experiment import import_object

    inputs, labels = import_object(factory)(**kwargs)
    return inputs[:n], labels[:n]


def make_experiment(name: str, examples: int | None, batch_size: int | None) -> Any:
    """The benchmark's experiment: ``digits`` or ``cifar_resnet18`` (random weights, random 32x32 inputs)."""
    from coar_dask.core.experiment import Experiment
    from coar_dask.zoo import digits

    if name == "digits":
        exp = digits.experiment()
        if examples:
            exp = exp.replace(examples=f"{Path(__file__).stem}:subset_examples",
                              examples_kwargs={"n": examples, "factory": exp.examples})
        return exp.replace(batch_size=batch_size or exp.batch_size)
    if name == "cifar_resnet18":
        n = examples or 64
        return Experiment(
            model="coar_dask.zoo.presets:seeded_model",
            model_kwargs={"factory": "coar_dask.zoo.architectures:cifar_resnet18", "seed": 0},
            examples="coar_dask.zoo.presets:random_examples",
            examples_kwargs={"n": n, "shape": [3, 32, 32], "classes": 10, "seed": 0},
            include=("conv",), kinds=("conv2d",), alpha=0.05, batch_size=batch_size or n,
        )
    raise SystemExit(f"unknown --model {name!r}; choose digits or cifar_resnet18")


# ------------------------------------------------------------- environments


def malloc_env(choice: str) -> dict[str, str]:
    """The ``MALLOC_*`` variables of a ``--malloc`` choice."""
    from coar_dask.runtime.clusters import WORKER_ENV

    if choice == "package":
        return {k: v for k, v in WORKER_ENV.items() if k in _MALLOC_KEYS}
    if choice == "dask":
        return {"MALLOC_TRIM_THRESHOLD_": "65536"}
    if choice == "glibc":
        return {}
    out = {}
    for item in filter(None, choice.split(",")):
        key, _, value = item.partition("=")
        if key not in _MALLOC_KEYS or not value:
            raise SystemExit(f"--malloc: {item!r} is not NAME=VALUE with NAME in {_MALLOC_KEYS}")
        out[key] = value
    return out


@contextlib.contextmanager
def process_env(malloc: dict[str, str]) -> Iterator[dict[str, str]]:
    """This process's environment, as children started inside inherit it: workers' env with ``malloc``."""
    from coar_dask.runtime.clusters import WORKER_ENV

    env = {k: v for k, v in WORKER_ENV.items() if k not in _MALLOC_KEYS}
    env.update(malloc)
    saved = dict(os.environ)
    for key in _MALLOC_KEYS:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def cluster_env(malloc: dict[str, str]) -> Iterator[None]:
    """Make the LocalCluster's workers start with exactly ``malloc`` (pre-spawn and worker env)."""
    import dask
    import distributed  # noqa: F401 - loads distributed's config defaults

    from coar_dask.runtime.clusters import local as cluster

    saved_worker_env = dict(cluster.WORKER_ENV)
    saved_environ = {k: os.environ.pop(k) for k in _MALLOC_KEYS if k in os.environ}
    for key in _MALLOC_KEYS:
        cluster.WORKER_ENV.pop(key, None)
    cluster.WORKER_ENV.update(malloc)
    # The nanny exports pre-spawn-environ before starting a worker (None drops a key).
    pre = {"MALLOC_TRIM_THRESHOLD_": None, **malloc}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {
                **dask.config.get("distributed.nanny.pre-spawn-environ"), **pre}}):
            yield
    finally:
        cluster.WORKER_ENV.clear()
        cluster.WORKER_ENV.update(saved_worker_env)
        for key in _MALLOC_KEYS:
            os.environ.pop(key, None)
        os.environ.update(saved_environ)


# ---------------------------------------------------- in-process measurements


def _methods(ms: list[int]) -> list[str]:
    return ["floor", "seed", "seed-compute", "inplace"] + [f"batched-{m}" for m in ms] + ["auto"]


def _seed_store(directory: Path, rows: int, n_components: int, n_examples: int) -> Path:
    """The seed's store: one ``.npy`` per array plus ``_completed.npy`` (``initialize_store.py``)."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(directory / "masks.npy", mode="w+", dtype=bool, shape=(rows, n_components))
    np.lib.format.open_memmap(directory / "margins.npy", mode="w+", dtype=np.float16, shape=(rows, n_examples))
    np.lib.format.open_memmap(directory / "_completed.npy", mode="w+", dtype=bool, shape=(rows,))
    return directory


def _seed_update(directory: Path, index: int, out: dict[str, Any]) -> None:
    """The seed's ``ndm_utils.update_mmapped_file`` (without its prints)."""
    import numpy as np

    for key, value in out.items():
        mmap = np.lib.format.open_memmap(directory / f"{key}.npy", mode="r+")
        mmap[index] = value
        mmap[index : index + 1].flush()
    done = np.lib.format.open_memmap(directory / "_completed.npy", mode="r+")
    done[index] = True
    done[index : index + 1].flush()


def _run_method(state: Any, method: str, masks: Any, seed_dir: Path | None = None) -> None:
    import numpy as np
    import torch

    from coar_dask.ablation.engine import compute_outputs
    from coar_dask.ablation.zeroing import reference_model

    bs = state.experiment.batch_size
    if method in ("floor", "seed", "seed-compute"):
        out = np.empty((len(masks), state.n_examples), dtype=np.float32)
        with torch.inference_mode():
            for i, mask in enumerate(masks):
                model = state.model if method == "floor" else reference_model(state.model, state.components, mask)
                for s in range(0, state.n_examples, bs):
                    logits = model(state.inputs[s : s + bs])
                    out[i, s : s + bs] = state.output_fn(logits.float(), state.labels[s : s + bs]).cpu().numpy()
                if method == "seed":
                    _seed_update(seed_dir, i, {"masks": mask, "margins": out[i].astype(np.float16)})
        return
    if method == "inplace":
        compute_outputs(state, masks, masks_per_pass=1)
    elif method == "auto":
        compute_outputs(state, masks)
    else:
        compute_outputs(state, masks, masks_per_pass=int(method.split("-")[1]))


def _child(rank: int, experiment: Any, methods: list[str], n_masks: int, rounds: int, barrier: Any, queue: Any) -> None:
    try:
        import resource

        import torch

        from coar_dask.core.experiment import load_state
        from coar_dask.core.masks import sample_masks
        from coar_dask.runtime.worker import apply_malloc_env

        torch.set_num_threads(1)
        apply_malloc_env(only_in_dask_worker=False)  # as in the build's workers
        state = load_state(experiment)
        masks = sample_masks(experiment.mask_seed, range(rank * n_masks, (rank + 1) * n_masks),
                             state.n_components, experiment.alpha)
        tmp = tempfile.TemporaryDirectory(prefix="coar-bench-seed-")
        seed_dir = _seed_store(Path(tmp.name), n_masks, state.n_components, state.n_examples)
        for method in methods:  # warm-up: kernels, allocator, the batched path's one-time check
            _run_method(state, method, masks[: min(len(masks), 2)], seed_dir)
        auto_m = auto_e = None
        from coar_dask.ablation.engine import _runner

        records = []
        for r in range(rounds):
            for method in methods:
                barrier.wait()
                u0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                _run_method(state, method, masks, seed_dir)
                wall = time.perf_counter() - t0
                u1 = resource.getrusage(resource.RUSAGE_SELF)
                records.append({"round": r, "method": method, "wall": wall,
                                "user": u1.ru_utime - u0.ru_utime, "sys": u1.ru_stime - u0.ru_stime})
        runner = _runner(state)
        if runner.batched is not None:
            from coar_dask.ablation.engine import AUTO_MIN_ROWS, AUTO_TARGET_ELEMENTS, auto_pass_shape

            auto_m, auto_e = auto_pass_shape(min(experiment.batch_size, state.n_examples), runner.probe(state),
                                             n_masks, target_elements=AUTO_TARGET_ELEMENTS["cpu"],
                                             min_rows=AUTO_MIN_ROWS)
        queue.put({"rank": rank, "records": records, "n_components": state.n_components,
                   "n_examples": state.n_examples, "auto_masks_per_pass": auto_m or 1,
                   "auto_examples_per_pass": auto_e or min(experiment.batch_size, state.n_examples),
                   "batched_reason": runner.reason})
    except BaseException as exc:  # noqa: BLE001 - report to the parent, which raises
        import traceback

        queue.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})
        barrier.abort()


def measure_in_process(experiment: Any, workers: int, methods: list[str], n_masks: int, rounds: int,
                       malloc: dict[str, str]) -> dict[str, Any]:
    """(a)-(d) in ``workers`` concurrent single-threaded processes; best round per method, rates summed."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    with process_env(malloc):
        procs = [ctx.Process(target=_child, args=(r, experiment, methods, n_masks, rounds, barrier, queue))
                 for r in range(workers)]
        for p in procs:
            p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("a measuring process failed:\n" + errors[0])

    rates: dict[str, float] = {}
    cpu: dict[str, dict[str, float]] = {}
    for method in methods:
        per_round = []
        for r in range(rounds):
            recs = [rec for res in results for rec in res["records"] if rec["method"] == method and rec["round"] == r]
            total = n_masks * len(recs)
            per_round.append((sum(n_masks / rec["wall"] for rec in recs),
                              1e3 * sum(x["user"] for x in recs) / total, 1e3 * sum(x["sys"] for x in recs) / total))
        rates[method] = max(rate for rate, _, _ in per_round)  # wall: the least disturbed round
        best_cpu = sorted(per_round, key=lambda x: x[1] + x[2])[(len(per_round) - 1) // 2]  # CPU: the (lower) median
        cpu[method] = {"user_ms_per_model": best_cpu[1], "sys_ms_per_model": best_cpu[2]}
    first = results[0]
    return {"rates": rates, "cpu": cpu, "n_components": first["n_components"], "n_examples": first["n_examples"],
            "auto_masks_per_pass": first["auto_masks_per_pass"],
            "auto_examples_per_pass": first["auto_examples_per_pass"], "batched_reason": first["batched_reason"]}


# ------------------------------------------------------------------ the build


def _rusage() -> tuple[float, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


_PARTS = {"compute": "compute_outputs", "masks": "sample_masks", "open": "_open_on_worker", "task": "run_block"}


def _instrument() -> None:
    """On a worker: count the task thread's CPU time in each part of ``run_block`` (from now on)."""
    from coar_dask.core.store import Store
    from coar_dask.runtime import build

    spent = build.__dict__.setdefault("_bench_cpu", {})
    spent.clear()
    spent["_process0"] = sum(_rusage())

    def timed(fn: Any, part: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + time.thread_time() - t0
        wrapper.__wrapped_for_bench__ = fn
        return wrapper

    for part, name in _PARTS.items():
        fn = getattr(build, name)
        setattr(build, name, timed(getattr(fn, "__wrapped_for_bench__", fn), part))
    Store.write_block = timed(getattr(Store.write_block, "__wrapped_for_bench__", Store.write_block), "write")


def _thread_cpu() -> dict[str, float]:
    from coar_dask.runtime import build

    spent = dict(build.__dict__.get("_bench_cpu", {}))
    spent["process"] = sum(_rusage()) - spent.pop("_process0", 0.0)
    return spent


def cpu_breakdown(per_worker: dict[str, dict[str, float]], client_cpu: float, rows: int) -> dict[str, float]:
    """CPU ms per model by part: the ablated passes, the store's work in the task thread (open, masks,
    write), the rest of the task, the worker processes' other threads (zarr's I/O loop that encodes
    the chunks, Dask's event loop, profiler), and this process (client and scheduler)."""
    total = {k: sum(w.get(k, 0.0) for w in per_worker.values()) for k in ("compute", "masks", "open", "write",
                                                                           "task", "process")}
    store = total["open"] + total["masks"] + total["write"]
    ms = 1e3 / rows
    return {"compute": total["compute"] * ms, "store_in_task": store * ms,
            "task_other": (total["task"] - total["compute"] - store) * ms,
            "worker_other_threads": (total["process"] - total["task"]) * ms, "client_and_scheduler": client_cpu * ms}


def measure_build(experiment: Any, workers: int, rows: int, rows_per_chunk: int, malloc: dict[str, str],
                  n_components: int, n_examples: int, repeats: int, worker_profile: str = "default") -> dict[str, Any]:
    """(e): ``run_build`` on a fresh store, on a warmed-up LocalCluster; best of ``repeats`` builds."""
    from coar_dask.runtime.build import run_build
    from coar_dask.runtime.clusters import cluster_client
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.core.experiment import warm_up

    builds = []
    import dask

    profile = {} if worker_profile == "default" else {"distributed.worker.profile.enabled": worker_profile == "on"}
    where = {"gpus": "auto"} if str(experiment.device).startswith("cuda") else {"n_workers": workers}  # one per GPU
    with dask.config.set(profile), cluster_env(malloc), cluster_client("local", **where) as client, \
            tempfile.TemporaryDirectory(prefix="coar-bench-") as tmp:
        client.run(warm_up, experiment)
        worker_env = client.run(lambda: {k: os.environ.get(k) for k in _MALLOC_KEYS if os.environ.get(k)})
        profiling = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        for i in range(repeats):
            store = eval_store_for(Path(tmp) / f"store{i}", experiment, rows, n_components, n_examples,
                                   rows_per_chunk=rows_per_chunk)
            client.run(_instrument)
            u0 = client.run(_rusage)
            t0, c0 = time.perf_counter(), time.process_time()
            report = run_build(store, experiment, client=client)
            wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
            u1 = client.run(_rusage)
            parts = cpu_breakdown(client.run(_thread_cpu), client_cpu, report.rows_done)
            user = sum(u1[w][0] - u0[w][0] for w in u1)
            sys_ = sum(u1[w][1] - u0[w][1] for w in u1)
            builds.append({"models_per_s": report.rows_done / report.seconds, "seconds": report.seconds,
                           "rows_per_chunk": store.rows_per_chunk,
                           "wall_with_planning": wall, "rows": report.rows_done, "blocks": report.blocks_done,
                           "user_ms_per_model": 1e3 * user / report.rows_done,
                           "sys_ms_per_model": 1e3 * sys_ / report.rows_done,
                           "cpu_ms_per_model_by_part": parts})
    best = dict(max(builds, key=lambda b: b["models_per_s"]))  # wall: the least disturbed build
    by_cpu = sorted(builds, key=lambda b: b["user_ms_per_model"] + b["sys_ms_per_model"])[(len(builds) - 1) // 2]
    best["user_ms_per_model"], best["sys_ms_per_model"] = by_cpu["user_ms_per_model"], by_cpu["sys_ms_per_model"]
    best["cpu_ms_per_model_by_part"] = by_cpu["cpu_ms_per_model_by_part"]
    best["all"] = builds
    best["worker_malloc_env"] = next(iter(worker_env.values()), {})
    best["worker_profiler"] = next(iter(profiling.values()), None)
    return best


# ------------------------------------------------------------------ reporting


def machine() -> dict[str, Any]:
    import dask
    import distributed
    import numpy
    import torch
    import zarr

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "glibc": " ".join(platform.libc_ver()), "torch": torch.__version__, "dask": dask.__version__,
        "distributed": distributed.__version__, "zarr": zarr.__version__, "numpy": numpy.__version__,
    }


def _cpu_ms(rec: dict[str, float]) -> float:
    return rec["user_ms_per_model"] + rec["sys_ms_per_model"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    ms = [int(m) for m in args.ms.split(",") if m]
    methods = _methods(ms)
    experiment = make_experiment(args.model, args.examples, args.batch_size).replace(device=args.device,
                                                                                       amp=args.amp)
    malloc = malloc_env(args.malloc)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    inproc = measure_in_process(experiment, args.workers, methods, args.masks, args.rounds, malloc)
    rates = inproc["rates"]
    build = ({} if args.no_build else
             measure_build(experiment, args.workers, args.rows, args.rows_per_chunk, malloc,
                           inproc["n_components"], inproc["n_examples"], args.build_repeats, args.worker_profile))
    floor, seed = rates["floor"], rates["seed"]
    out: dict[str, Any] = {
        "model": args.model,
        "n_components": inproc["n_components"],
        "n_examples": inproc["n_examples"],
        "batch_size": experiment.batch_size,
        "device": experiment.device,
        "amp": experiment.amp,
        "alpha": experiment.alpha,
        "workers": args.workers,
        "masks_per_process": args.masks,
        "rounds": args.rounds,
        "malloc": args.malloc,
        "malloc_env": malloc,
        "auto_masks_per_pass": inproc["auto_masks_per_pass"],
        "auto_examples_per_pass": inproc["auto_examples_per_pass"],
        "floor_definition": (f"plain forward passes of the unablated model over the {inproc['n_examples']} examples "
                             f"(batch {experiment.batch_size}), in {args.workers} concurrent single-threaded "
                             f"processes with the workers' environment; rates summed"),
        "models_per_s": dict(rates),
        "cpu_ms_per_model": inproc["cpu"],
        "floor_models_per_s": floor,
        "seed_style_models_per_s": seed,
        "seed_compute_models_per_s": rates["seed-compute"],
        "inplace_models_per_s": rates["inplace"],
        "auto_models_per_s": rates["auto"],
        "batched_models_per_s": {m: rates[f"batched-{m}"] for m in ms},
    }
    if build:
        out.update({
            "build_models_per_s": build["models_per_s"],
            "build_over_floor": build["models_per_s"] / floor,
            "build_over_seed_style": build["models_per_s"] / seed,
            "build_over_floor_cpu_time": _cpu_ms(inproc["cpu"]["floor"]) / _cpu_ms(build),
            "build_over_auto": build["models_per_s"] / rates["auto"],
            "build_over_auto_cpu_time": _cpu_ms(inproc["cpu"]["auto"]) / _cpu_ms(build),
            "build_over_seed_style_cpu_time": _cpu_ms(inproc["cpu"]["seed"]) / _cpu_ms(build),
            "build_over_seed_compute": build["models_per_s"] / rates["seed-compute"],
            "build_over_seed_compute_cpu_time": _cpu_ms(inproc["cpu"]["seed-compute"]) / _cpu_ms(build),
            "build": build,
            "build_rows": args.rows,
            "rows_per_chunk": build["rows_per_chunk"],
        })
    out["seconds"] = time.perf_counter() - t0
    out["load_average_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    out["machine"] = machine()
    return out


def table(res: dict[str, Any]) -> str:
    """The figures as aligned text: wall-clock rates with ratios, and CPU time per model."""
    floor, seed = res["floor_models_per_s"], res["seed_style_models_per_s"]
    rows = [("floor", "(d) floor: plain forward", floor),
            ("seed", "(a) seed: deepcopy+zero, row writes", seed),
            ("seed-compute", "    seed without row writes", res["seed_compute_models_per_s"]),
            ("inplace", "(b) in-place zero/restore", res["inplace_models_per_s"])]
    rows += [(f"batched-{m}", f"(c) {m} masks per pass", r) for m, r in res["batched_models_per_s"].items()]
    rows.append(("auto", f"    auto ({res['auto_masks_per_pass']} per pass of {res['auto_examples_per_pass']})",
                 res["auto_models_per_s"]))
    if "build_models_per_s" in res:
        rows.append(("build", f"(e) build, {res['workers']} Dask workers", res["build_models_per_s"]))
    cpu = dict(res["cpu_ms_per_model"])
    if "build" in res:
        cpu["build"] = res["build"]
    m = res["machine"]
    lines = [
        f"# build_throughput: {res['model']}, {res['n_components']} components, {res['n_examples']} examples "
        f"(batch {res['batch_size']}), alpha {res['alpha']}",
        f"# {m['cpu']} ({m['cores']} cores), Python {m['python']}, torch {m['torch']}, dask {m['dask']}, "
        f"zarr {m['zarr']}, {m['glibc']}",
        f"# malloc: {res['malloc']} {res['malloc_env'] or '(none)'}; load average before/after "
        f"{res['load_average_before_after']}",
        f"# floor: {res['floor_definition']}",
        f"# (a)-(d): {res['masks_per_process']} masks per process; wall: best of {res['rounds']} interleaved rounds, "
        f"CPU: median" + (f"; (e): {res['build_rows']} rows in blocks of {res['rows_per_chunk']}, warm workers, "
                          f"execution time, worker profiler {'on' if res['build']['worker_profiler'] else 'off'}"
                          if "build_models_per_s" in res else ""),
        "",
        f"{'way':<38} {'models/s':>9} {'x floor':>8} {'x seed':>7} {'CPU ms/model':>13} {'x floor':>8} {'x seed':>7}",
    ]
    cpu_ms = {k: v["user_ms_per_model"] + v["sys_ms_per_model"] for k, v in cpu.items()}
    for key, name, rate in rows:
        c = cpu_ms.get(key)
        cpu_text = (f"{c:>13.2f} {cpu_ms['floor'] / c:>8.2f} {cpu_ms['seed'] / c:>7.2f}" if c else "")
        lines.append(f"{name:<38} {rate:>9.1f} {rate / floor:>8.2f} {rate / seed:>7.2f} {cpu_text}")
    lines.append("")
    if "build_over_auto" in res:
        lines.append(f"# build / in-process auto: {res['build_over_auto']:.2f} (wall), "
                     f"{res['build_over_auto_cpu_time']:.2f} (CPU time)")
        parts = res["build"]["cpu_ms_per_model_by_part"]
        lines.append("# build CPU ms per model by part: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
                     + f" (auto in-process: {cpu_ms['auto']:.3f})")
    lines.append("# x floor, x seed: throughput ratios (wall clock), and the same from CPU time per model "
                 "(robust to other load on the machine)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="digits", help="digits (default) or cifar_resnet18")
    p.add_argument("--examples", type=int, default=None, help="examples (digits: first N of 360; resnet: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per forward pass (default: the experiment's)")
    p.add_argument("--workers", type=int, default=2, help="processes / Dask workers (default 2)")
    p.add_argument("--masks", type=int, default=None, help="masks per process and way (default: digits 48, resnet 4)")
    p.add_argument("--ms", default="2,4,8", help="masks per pass to measure for (c), e.g. 2,4,8")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a)-(d); the best is kept")
    p.add_argument("--rows", type=int, default=None, help="rows of the build (default: digits 2400, resnet 16)")
    p.add_argument("--rows-per-chunk", type=int, default=None,
                   help="rows per block (default: digits as a store chooses them (100), resnet 2)")
    p.add_argument("--build-repeats", type=int, default=2, help="builds; the best is kept (default 2)")
    p.add_argument("--no-build", action="store_true", help="skip (e)")
    p.add_argument("--malloc", default="package", help="package (default), dask, glibc or NAME=VALUE,...")
    p.add_argument("--worker-profile", choices=["default", "on", "off"], default="default",
                   help="Dask's statistical profiler in the build's workers (default: as configured)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: (a)-(d) on the GPU (use --workers 1), "
                                                    "(e) on one local worker per GPU")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off", help="run.amp: autocast dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    small = args.model == "digits"
    args.masks = args.masks or (48 if small else 4)
    args.rows = args.rows or (2400 if small else 16)
    args.rows_per_chunk = args.rows_per_chunk or (None if small else 2)  # None: the store's default blocks
    import dask

    dask.config.set({"logging": {"distributed": "error", "bokeh": "error", "tornado": "error"}})
    logging.basicConfig(level=logging.WARNING)
    res = run(args)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
