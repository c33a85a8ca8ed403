#!/usr/bin/env python
"""Benchmark the regression: ``lstsq`` vs ``saga`` (the seed's config), and memory vs rows.

Compares, on a digits store (a real component dataset: the digits ResNet's
conv channels, P=80, K=360, built here in-process) and on a larger synthetic
store (P=2304 like the CIFAR ResNet, K=1000, masks at alpha 0.05, float16
outputs = a planted linear model + noise):

- time to solution of :func:`coar_dask.fit.fit.fit` (reading the store
  included) with ``lstsq`` (exact least squares on train + validation rows,
  the rows of SAGA's final fit; also on train rows only, and with the ridge
  penalty chosen per example on validation) and with ``saga`` in the seed's
  configuration (k=1, manual_max_lambda 0 -- plain least squares fitted by
  SAGA --, lr 1e-3, early stopping checked every 3 epochs at 1e-10, batch
  about num_train/18 as in the seed's CIFAR config, refit on train +
  validation), capped at ``--saga-max-epochs`` (the cap and whether SAGA
  converged are reported; a capped SAGA makes the speedup a lower bound);
- mean held-out correlation (rows in neither the train nor the validation
  split) of each; times are the best of ``--repeat`` runs on digits (every
  solver alike) and single runs on the synthetic store;
- peak RSS of ``lstsq`` fits of a 10,000-row and a 100,000-row synthetic store
  (P=2304, K=1000), each in a fresh subprocess: memory must not grow with rows.
  SAGA's table for 100,000 rows is reported too (it is n x K by design).

Usage::

    python benchmarks/regression.py              # full run (~10 min on 2 busy cores)
    python benchmarks/regression.py --json       # one JSON object
    python benchmarks/regression.py --quick      # small sizes (what the test runs)
    python benchmarks/regression.py --device cuda

Stores are kept in ``--workdir`` (default: a folder in the temp dir) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SYNTH_P, SYNTH_K = 2304, 1000


def machine() -> dict[str, Any]:
    import dask
    import distributed
    import torch
    import zarr

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_synthetic(path: Path, n: int, p: int = SYNTH_P, k: int = SYNTH_K, *, alpha: float = 0.05,
                    noise: float = 0.5, seed: int = 0, rows_per_chunk: int = 500) -> Any:
    """A store of ``n`` rows: masks (alpha ablated), float16 outputs = mask @ W + b + noise. Reused if complete."""
    from coar_dask.core.store import init_store

    spec = {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [p]},
                                        "margins": {"dtype": "float16", "shape": [k]}}}
    store = init_store(path, spec, rows_per_chunk=min(rows_per_chunk, n), mask_seed=seed, alpha=alpha)
    if store.completed_rows().all():
        return store
    rng = np.random.default_rng(seed)
    W = (0.1 * rng.standard_normal((p, k))).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    for block in store.blocks():
        brng = np.random.default_rng([seed, block.index])
        m = brng.random((len(block), p)) >= alpha
        y = m.astype(np.float32) @ W + b + noise * brng.standard_normal((len(block), k)).astype(np.float32)
        store.write_block(block.index, {"masks": m, "margins": y.astype(np.float16)})
    return store


def digits_store(path: Path, n: int) -> Any:
    """A digits component dataset of ``n`` rows, built in this process (reused if complete)."""
    from coar_dask.runtime.build import run_build
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.zoo import digits

    exp = digits.experiment()
    store = eval_store_for(path, exp, n, 80, 360)
    if not store.completed_rows().all():
        run_build(store, exp, client=None)
    return store


def heldout_correlation(attrs: Any, store: Any, rows: np.ndarray) -> float:
    from coar_dask.fit.rows import StoreRows
    from coar_dask.solvers.base import SolverResult
    from coar_dask.solvers.metrics import validation_metrics

    src = StoreRows(store, rows, attrs.metadata["x_name"], attrs.metadata["y_name"])
    r = validation_metrics(SolverResult(attrs.weight, attrs.bias, attrs.lam), src)["val_correlation"]
    return float(np.nanmean(r))


def compare(store: Any, *, num_train: int, num_val: int, saga_batch: int, saga_max_epochs: int,
            device: str | None, label: str, repeat: int = 1) -> dict[str, Any]:
    """Fit with lstsq, lstsq + ridge grid and seed-config saga; time (best of ``repeat``, the
    same for every solver) and held-out correlation."""
    from coar_dask.fit.fit import fit
    from coar_dask.fit.rows import infer_names, split_rows

    done = np.flatnonzero(store.completed_rows())
    train, val = split_rows(done, num_train, num_val, 0)
    test = np.setdiff1d(done, np.concatenate([train, val]))
    common = dict(num_train=num_train, num_val=num_val, split_seed=0, device=device)
    runs = {
        # Like SAGA's final fit (the seed refits on train + validation rows): exact least squares on the same rows.
        "lstsq": dict(solver="lstsq", refit=True),
        # The default fit: train rows only.
        "lstsq_train": dict(solver="lstsq"),
        # Penalty chosen per example on validation, then refit on train + validation.
        "lstsq_ridge": dict(solver="lstsq", ridge_grid="auto", refit=True),
        "saga": dict(solver="saga", k=1, max_lambda=0.0, lr=1e-3, batch_size=saga_batch, early_stop_every=3,
                     early_stop_eps=1e-10, max_epochs=saga_max_epochs),
    }
    x_name, y_name = infer_names(store)
    out: dict[str, Any] = {"store": label, "rows": int(done.size), "P": int(np.prod(store.spec[x_name].shape)),
                           "K": int(np.prod(store.spec[y_name].shape)), "num_train": num_train,
                           "num_val": num_val, "num_test": int(test.size)}
    out["repeat"] = repeat
    for name, opts in runs.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            attrs = fit(store, **common, **opts)
            times.append(time.perf_counter() - t0)
        out[f"{name}_seconds"] = min(times)
        out[f"{name}_correlation"] = heldout_correlation(attrs, store, test)
        out[f"{name}_val_correlation"] = float(np.nanmean(attrs.metadata["val_correlation"]))
        if name == "saga":
            m = attrs.metadata
            out["saga_epochs"] = m["saga_epochs"]
            out["saga_refit_epochs"] = m.get("saga_refit_epochs")
            out["saga_converged_fraction"] = m["saga_converged"] / attrs.n_examples
            out["saga_batch_size"] = m["batch_size"]
            out["saga_max_epochs"] = saga_max_epochs
            out["saga_table_mb"] = m["saga_table_bytes"] / 2**20
    out["speedup"] = out["saga_seconds"] / out["lstsq_seconds"]
    out["speedup_ridge"] = out["saga_seconds"] / out["lstsq_ridge_seconds"]
    return out


def rss_child(store_path: str, device: str | None) -> None:
    """Runs in a fresh process: fit the store with lstsq, print peak RSS."""
    from coar_dask.fit.fit import fit
    from coar_dask.core.store import open_store

    n = int(open_store(store_path, read_only=True).completed_rows().sum())
    t0 = time.perf_counter()
    fit(store_path, num_val=min(1000, n // 10), device=device)
    seconds = time.perf_counter() - t0
    print(json.dumps({"rss_mb": peak_rss_mb(), "seconds": seconds}))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    ``VmHWM`` (Linux) belongs to the process's own address space. ``ru_maxrss``
    is only the fallback: Linux carries the parent's high-water mark into it
    across fork + exec, so a child started by a big parent reports the
    parent's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss(store_path: Path, device: str | None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--rss-child", str(store_path)] + (["--device", device] if device else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def moments_precision(P: int = 1024, K: int = 1000, rows: int = 2000, batches: int = 4, offset: float = 700.0,
                      repeat: int = 3) -> dict[str, Any]:
    """Streaming moments (X^T X by syrk and X^T Y) of float16 outputs around ``offset``: the outputs shifted
    by a per-target reference with float32 products (what :class:`Moments` does) against every product in
    float64 (``precise=True``: the other way to make X^T Y independent of the offset). Best of ``repeat``;
    wall-clock and CPU seconds (process time, all threads), with the error of the centred X^T Y against float64."""
    import torch

    from coar_dask.solvers.moments import Moments

    rng = np.random.default_rng(0)
    xs = [(rng.random((rows, P)) >= 0.05).astype(np.float32) for _ in range(batches)]
    W = rng.normal(size=(P, K)).astype(np.float32) * 0.1
    ys = [(offset + x @ W + rng.normal(size=(rows, K)).astype(np.float32)).astype(np.float16) for x in xs]
    x64 = np.concatenate(xs).astype(np.float64)
    y64 = np.concatenate(ys).astype(np.float64)
    ref = (x64 - x64.mean(0)).T @ (y64 - y64.mean(0))
    out: dict[str, Any] = {"P": P, "K": K, "rows": rows * batches, "offset": offset}
    for name, precise in (("shift_f32", False), ("float64", True)):
        best = (float("inf"), float("inf"))
        for _ in range(repeat):
            m = Moments(P, K, torch.device("cpu"), gram=True, precise=precise)
            w0, c0 = time.perf_counter(), time.process_time()
            for x, y in zip(xs, ys):
                m.update(x, y)
            best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
        out[f"{name}_seconds"], out[f"{name}_cpu_seconds"] = best
        out[f"{name}_cxy_max_error"] = float(np.abs(m.centred()[1].numpy() - ref).max())
    out["float64_over_shift_wall"] = out["float64_seconds"] / out["shift_f32_seconds"]
    out["float64_over_shift_cpu"] = out["float64_cpu_seconds"] / out["shift_f32_cpu_seconds"]
    return out


def _moments_report(args: argparse.Namespace, result: dict[str, Any], log: Any) -> dict[str, Any]:
    mp = moments_precision(*((256, 100, 1000) if args.quick else ()))
    result["moments"] = mp
    log(f"moments of {mp['rows']} rows x P={mp['P']} x K={mp['K']}, float16 outputs around {mp['offset']:g}:\n"
        f"  shifted, float32 products: {mp['shift_f32_seconds']:.3f} s wall, {mp['shift_f32_cpu_seconds']:.3f} s "
        f"CPU; max error of centred X^T Y {mp['shift_f32_cxy_max_error']:.2e}\n"
        f"  float64 products:          {mp['float64_seconds']:.3f} s wall, {mp['float64_cpu_seconds']:.3f} s "
        f"CPU; max error {mp['float64_cxy_max_error']:.2e}\n"
        f"  float64 / shifted: {mp['float64_over_shift_wall']:.2f}x wall, {mp['float64_over_shift_cpu']:.2f}x CPU")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds), e.g. for the test suite")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "coar-dask-bench-regression"))
    ap.add_argument("--no-digits", action="store_true", help="skip the digits store (its build takes ~25 s)")
    ap.add_argument("--digits-rows", type=int, default=None, help="rows of the digits store (default 2000)")
    ap.add_argument("--synthetic-rows", type=int, default=None,
                    help="rows of the comparison's synthetic store (default 10000)")
    ap.add_argument("--rss-rows", default=None, help="row counts of the RSS check (default 10000,100000)")
    ap.add_argument("--saga-max-epochs", type=int, default=None,
                    help="SAGA's epoch cap per stage on digits (default 1000)")
    ap.add_argument("--synthetic-saga-max-epochs", type=int, default=None,
                    help="SAGA's epoch cap per stage on the synthetic store (default 30; ~3 s per epoch on 2 cores)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="digits: time each solver this many times and keep the best (synthetic: once each)")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS check")
    ap.add_argument("--moments-only", action="store_true",
                    help="only the moments' precision check: shifted float32 vs float64 products")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.device)
        return {}
    quick = dict(digits_rows=600, synthetic_rows=3000, rss_rows="3000,30000", synthetic_saga_max_epochs=15,
                 saga_max_epochs=200)
    full = dict(digits_rows=2000, synthetic_rows=10_000, rss_rows="10000,100000", synthetic_saga_max_epochs=30,
                saga_max_epochs=1000)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    p = k = None
    if args.quick:
        p, k = 256, 100
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    P, K = p or SYNTH_P, k or SYNTH_K
    result: dict[str, Any] = {"machine": machine(), "device": args.device or "cpu"}
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    if args.moments_only:
        return _moments_report(args, result, log)

    stores = []
    if not args.no_digits and not args.rss_only:
        t0 = time.perf_counter()
        d = digits_store(work / f"digits-{args.digits_rows}", args.digits_rows)
        log(f"digits store: {args.digits_rows} rows ready in {time.perf_counter() - t0:.1f} s")
        n_train = int(args.digits_rows * 0.75)
        stores.append(("digits", d, n_train, int(args.digits_rows * 0.1), args.saga_max_epochs, args.repeat))
    if not args.rss_only:
        t0 = time.perf_counter()
        s = write_synthetic(work / f"synthetic-{args.synthetic_rows}-{P}x{K}", args.synthetic_rows, P, K)
        log(f"synthetic store: {args.synthetic_rows} rows x {P} x {K} ready in {time.perf_counter() - t0:.1f} s")
        n_train = int(args.synthetic_rows * 0.8)
        stores.append(("synthetic", s, n_train, int(args.synthetic_rows * 0.1), args.synthetic_saga_max_epochs, 1))

    for label, store, n_train, n_val, cap, repeat in stores:
        r = compare(store, num_train=n_train, num_val=n_val, saga_batch=max(50, round(n_train / 18 / 50) * 50),
                    saga_max_epochs=cap, device=args.device, label=label, repeat=repeat)
        result[label] = r
        log(f"\n{label}: {r['rows']} rows, P={r['P']}, K={r['K']}, train {r['num_train']} / val {r['num_val']} / "
            f"held-out {r['num_test']}; best of {repeat} run(s) each")
        for name in ("lstsq", "lstsq_train", "lstsq_ridge", "saga"):
            log(f"  {name:12s} {r[name + '_seconds']:8.2f} s   held-out correlation {r[name + '_correlation']:.4f}")
        log(f"  saga: batch {r['saga_batch_size']}, {r['saga_epochs']} + {r['saga_refit_epochs']} epochs "
            f"(cap {r['saga_max_epochs']}), converged {100 * r['saga_converged_fraction']:.0f}% of targets")
        log(f"  speedup lstsq vs saga: {r['speedup']:.1f}x (ridge-chosen lstsq: {r['speedup_ridge']:.1f}x); "
            f"correlation lstsq - saga: {r['lstsq_correlation'] - r['saga_correlation']:+.4f}")

    sizes = [int(v) for v in args.rss_rows.split(",")]
    rss_out = {}
    for n in sizes:
        path = work / f"synthetic-{n}-{P}x{K}"
        t0 = time.perf_counter()
        write_synthetic(path, n, P, K)
        log(f"\nRSS store: {n} rows ready in {time.perf_counter() - t0:.1f} s")
        rss_out[n] = rss(path, args.device)
        log(f"  lstsq fit of {n} rows: peak RSS {rss_out[n]['rss_mb']:.0f} MiB in {rss_out[n]['seconds']:.1f} s")
    from coar_dask.solvers.saga import table_nbytes

    small, large = rss_out[sizes[0]], rss_out[sizes[-1]]
    if "synthetic" in result:
        head = result["synthetic"]
        result.update(
            lstsq_seconds=head["lstsq_seconds"], saga_seconds=head["saga_seconds"], speedup=head["speedup"],
            lstsq_correlation=head["lstsq_correlation"], saga_correlation=head["saga_correlation"],
            lstsq_ridge_seconds=head["lstsq_ridge_seconds"], lstsq_ridge_correlation=head["lstsq_ridge_correlation"],
        )
    result.update(
        rss_10k_mb=small["rss_mb"], rss_100k_mb=large["rss_mb"], rss_rows=sizes,
        rss_ratio=large["rss_mb"] / small["rss_mb"], rss_seconds={str(n): v["seconds"] for n, v in rss_out.items()},
        saga_table_mb_at_rss_rows={str(n): table_nbytes(n, K) / 2**20 for n in sizes},
    )
    log(f"\npeak RSS {sizes[0]} rows: {small['rss_mb']:.0f} MiB; {sizes[-1]} rows: {large['rss_mb']:.0f} MiB "
        f"(ratio {result['rss_ratio']:.3f}; SAGA's n x K table alone would be "
        f"{table_nbytes(sizes[-1], K) / 2**20:.0f} MiB at {sizes[-1]} rows)")
    if "synthetic" in result:
        log(f"headline (synthetic): lstsq {result['lstsq_seconds']:.1f} s vs saga {result['saga_seconds']:.1f} s "
            f"= {result['speedup']:.1f}x; held-out correlation {result['lstsq_correlation']:.4f} vs "
            f"{result['saga_correlation']:.4f}")
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
