#!/usr/bin/env python
"""Benchmark what block digests cost: fit and build with and without them, in one run.

Each block's digest (sha256 of every array's block, bound to the block index
and the store) is computed when a build writes the block and checked, with
the chunk files' kinds, whenever a fit, an evaluation or an export reads it.
This compares, alternating the two ways and keeping the best of ``--repeat``
runs of each (the machine may be shared):

- **fit**: :func:`coar_dask.fit.fit.fit` (lstsq, reading included) of a
  synthetic store shaped like the CIFAR ResNet's (P=2304 masks at alpha 0.05,
  K=1000 float16 outputs), with reads checked (``store.verify_reads = True``,
  the default) and unchecked;
- **build**: :func:`coar_dask.runtime.build.run_build` of the digits
  experiment in this process into a store with digests and into one without
  (``init_store(..., digests=False)``, as a format-1 store);
- **write_block alone** (no model: the worst case, all of the digest's cost
  and none of the work it protects): writing the synthetic blocks with and
  without digests.

Wall-clock and CPU-time (``time.process_time``, all threads) ratios are
printed side by side: on a shared machine CPU time is the steadier figure.
The target is under 5% (ratio < 1.05) for fit and build.

Usage::

    python benchmarks/digest_cost.py            # 5,000 rows, 3 repeats (~2 min on 2 busy cores)
    python benchmarks/digest_cost.py --quick    # small sizes (what the test runs)
    python benchmarks/digest_cost.py --json
    python benchmarks/digest_cost.py --content  # content digests: 25M params, 1,000 224x224 examples

``--content`` times :func:`coar_dask.core.identity.content_digests` (the
once-per-session, once-per-worker digest of model state, examples and labels)
on a 25M-parameter state (ResNet-50's size) and ``--content-examples``
float32 3x224x224 examples, and scales it to 10,000 examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

P, K, ALPHA = 2304, 1000, 0.05


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _best(runs: list[tuple[float, float]]) -> dict[str, float]:
    return {"wall_s": min(r[0] for r in runs), "cpu_s": min(r[1] for r in runs)}


def _synthetic_blocks(rows: int, rpc: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(P, K)).astype(np.float32) / np.sqrt(P)
    out = []
    for start in range(0, rows, rpc):
        n = min(rpc, rows - start)
        m = rng.random((n, P)) >= ALPHA
        y = m.astype(np.float32) @ w + rng.normal(scale=0.1, size=(n, K)).astype(np.float32)
        out.append({"masks": m, "margins": y.astype(np.float16)})
    return out


def _write_store(path: Path, blocks: list[dict[str, np.ndarray]], rows: int, rpc: int, digests: bool) -> Any:
    import shutil

    from coar_dask.core.spec import Spec
    from coar_dask.core.store import init_store

    shutil.rmtree(path, ignore_errors=True)
    store = init_store(path, Spec.for_experiment(rows, P, K), rows_per_chunk=rpc, digests=digests)
    for i, data in enumerate(blocks):
        store.write_block(i, data)
    return store


def bench_writes_and_fit(work: Path, rows: int, rpc: int, repeat: int) -> dict[str, Any]:
    from coar_dask.core.store import open_store
    from coar_dask.fit.fit import fit

    blocks = _synthetic_blocks(rows, rpc)
    writes: dict[bool, list] = {True: [], False: []}
    for _ in range(repeat):
        for digests in (False, True):
            writes[digests].append(_timed(lambda: _write_store(work / f"synth-{digests}", blocks, rows, rpc,
                                                               digests)))
    fits: dict[bool, list] = {True: [], False: []}
    store = open_store(work / "synth-True", read_only=True)
    fit(store)  # warm-up (BLAS, caches), not timed
    for _ in range(repeat):
        for check in (False, True):
            store.verify_reads = check
            fits[check].append(_timed(lambda: fit(store)))
    return {"write_block": {"without": _best(writes[False]), "with": _best(writes[True])},
            "fit": {"without": _best(fits[False]), "with": _best(fits[True])}}


def bench_build(work: Path, rows: int, repeat: int) -> dict[str, Any]:
    import shutil

    import torch

    from coar_dask.core.store import init_store
    from coar_dask.runtime.build import run_build
    from coar_dask.zoo import digits

    experiment = digits.experiment()
    from coar_dask.core.experiment import load_state
    from coar_dask.core.spec import Spec

    state = load_state(experiment)  # model trained/loaded once, before timing
    spec = Spec.for_experiment(rows, state.n_components, state.n_examples)
    torch.set_num_threads(1)
    runs: dict[bool, list] = {True: [], False: []}
    for i in range(repeat + 1):  # the first round warms up and is not kept
        for digests in (False, True):
            path = work / f"build-{digests}"
            shutil.rmtree(path, ignore_errors=True)
            store = init_store(path, spec, rows_per_chunk=50, digests=digests)
            timed = _timed(lambda: run_build(store, experiment))
            if i:
                runs[digests].append(timed)
    return {"build": {"without": _best(runs[False]), "with": _best(runs[True])},
            "build_sizes": {"rows": rows, "P": state.n_components, "K": state.n_examples}}


def bench_content(n_examples: int, repeat: int) -> dict[str, Any]:
    """Seconds to digest a ResNet-50-sized state (25M float32 parameters) and ``n_examples`` 224x224 images."""
    from types import SimpleNamespace

    import torch

    from coar_dask.core import identity

    model = torch.nn.Linear(5000, 5000, bias=False)  # 25M parameters, 100 MB
    x = torch.rand(n_examples, 3, 224, 224)
    y = torch.randint(0, 1000, (n_examples,))
    class State(SimpleNamespace):  # weak-referenceable, as ExperimentState is
        pass

    runs = []
    for _ in range(repeat):
        state = State(model=model, inputs=x, labels=y, n_examples=n_examples,
                      experiment=SimpleNamespace(fingerprint="bench"))  # a new state: not cached
        runs.append(_timed(lambda: identity.content_digests(state)))
    gb = (sum(t.numel() * t.element_size() for t in model.state_dict().values()) + x.numel() * 4 + y.numel() * 8) / 1e9
    wall = min(r[0] for r in runs)
    return {"content": {"examples": n_examples, "gigabytes": gb, "wall_s": wall, "cpu_s": min(r[1] for r in runs),
                        "GB_per_s": gb / wall, "threads": min(identity._HASH_THREADS, os.cpu_count() or 1),
                        "wall_s_for_10000_examples": wall * (0.1 + 10_000 * 3 * 224 * 224 * 4 / 1e9) / gb}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import zarr

    work = Path(args.workdir or tempfile.mkdtemp(prefix="coar-digest-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "note": args.machine_note, "numpy": np.__version__, "zarr": zarr.__version__,
                    "torch": torch.__version__},
        "sizes": {"fit_rows": args.rows, "rows_per_chunk": args.rows_per_chunk, "P": P, "K": K,
                  "repeat": args.repeat},
    }
    result.update(bench_writes_and_fit(work, args.rows, args.rows_per_chunk, args.repeat))
    result.update(bench_build(work, args.build_rows, args.repeat))
    for key in ("fit", "build", "write_block"):
        r = result[key]
        r["ratio_wall"] = r["with"]["wall_s"] / r["without"]["wall_s"]
        r["ratio_cpu"] = r["with"]["cpu_s"] / max(r["without"]["cpu_s"], 1e-9)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5000, help="rows of the synthetic fit store")
    p.add_argument("--rows-per-chunk", type=int, default=100)
    p.add_argument("--build-rows", type=int, default=600, help="rows of the digits build")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (what the test runs)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--machine-note", default="2 cores shared with other work (other sessions' tests and "
                                             "builds ran alongside): compare the CPU-time ratios")
    p.add_argument("--json", action="store_true")
    p.add_argument("--content", action="store_true", help="time the content digests only")
    p.add_argument("--content-examples", type=int, default=1000)
    args = p.parse_args(argv)
    if args.content:
        c = bench_content(args.content_examples, args.repeat)["content"]
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.2f})")
        print(f"content digests of 25M float32 parameters and {c['examples']} 3x224x224 float32 examples "
              f"({c['gigabytes']:.2f} GB, {c['threads']} threads): {c['wall_s']:.2f} s wall, {c['cpu_s']:.2f} s CPU, "
              f"{c['GB_per_s']:.2f} GB/s; 10,000 examples: ~{c['wall_s_for_10000_examples']:.1f} s, once per "
              f"session and per worker")
        return 0
    logging.getLogger("coar_dask").setLevel(logging.ERROR)  # e.g. lstsq's note on few rows in --quick
    if args.quick:
        args.rows, args.build_rows, args.repeat = 400, 100, 1
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    m = r["machine"]
    print(f"machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, numpy {m['numpy']}, "
          f"zarr {m['zarr']}, torch {m['torch']}")
    print(f"         {m['note']}; load average {m['load_avg_at_start'][0]} at start, {m['load_avg_at_end'][0]} "
          f"at end")
    s = r["sizes"]
    print(f"sizes:   fit {s['fit_rows']} rows x P={s['P']} masks, K={s['K']} float16 outputs, "
          f"{s['rows_per_chunk']} rows per block; build: digits, {r['build_sizes']['rows']} rows "
          f"(P={r['build_sizes']['P']}, K={r['build_sizes']['K']}); best of {s['repeat']}")
    print(f"{'':22}{'without':>18}{'with digests':>18}{'ratio wall':>12}{'ratio CPU':>11}")
    for key, label in (("fit", "fit (lstsq, reads)"), ("build", "build (digits)"),
                       ("write_block", "write_block alone")):
        x = r[key]
        fmt = lambda t: f"{t['wall_s']:7.2f} s ({t['cpu_s']:6.2f} CPU)"  # noqa: E731
        print(f"{label:22}{fmt(x['without']):>18}{fmt(x['with']):>18}{x['ratio_wall']:12.3f}{x['ratio_cpu']:11.3f}")
    n_blocks = -(-s["fit_rows"] // s["rows_per_chunk"])
    per_block = {k: 1e3 * (r[k]["with"]["cpu_s"] - r[k]["without"]["cpu_s"]) / n_blocks for k in ("write_block", "fit")}
    print(f"per block: digest costs {per_block['write_block']:.2f} ms CPU to write and {per_block['fit']:.2f} ms "
          f"to check ({n_blocks} blocks of {s['rows_per_chunk']} x (P + 2K) bytes; noise dominates when tiny)")
    ok = all(r[k]["ratio_cpu"] < 1.05 for k in ("fit", "build"))
    print(f"target:  fit and build under 5% slower (CPU ratio < 1.05): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
