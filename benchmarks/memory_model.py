#!/usr/bin/env python
"""Peak memory of each stage, measured, against :mod:`coar_dask.core.memory`'s prediction.

Every case runs in a fresh subprocess: it imports everything and warms the
code path on a tiny problem, records its resident set (``VmRSS``), resets
the kernel's high-water mark (``/proc/self/clear_refs``), runs the stage on
the real code (``lstsq``, ``saga``, the moments a row group sends,
``compute_outputs`` on a real model, the client's assembly and save), and
reports ``VmHWM - VmRSS before`` against the model's bytes. On CUDA
(``--device cuda``) the fit cases read ``torch.cuda.max_memory_allocated``
instead.

The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then maps
every large array on its own and returns it when freed, as it always does
for arrays over 32 MiB (every matrix of the paper's sizes). Without it,
glibc's sliding threshold keeps freed arrays of 128 kB-32 MiB in its heap,
and the small cases here would measure the allocator's retention rather
than the code's allocations.

Sizes: at least three per stage, the largest P for the Gram and CG fits
chosen so that the predicted peak is about ``--max-bytes`` (default 3 GB,
a share of this shared 24 GiB machine).

Usage::

    python benchmarks/memory_model.py            # a table
    python benchmarks/memory_model.py --json     # max_rel_error, sizes, every case
    python benchmarks/memory_model.py --quick    # the two smallest sizes of each stage
    python benchmarks/memory_model.py --stage build   # one stage (or stage/method, e.g. fit/saga)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- child side
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class _Rows:
    """Masks (alpha 0.05, bool) and float16 outputs generated block by block: the data costs
    one 100-row block at a time, like a store's chunks."""

    def __init__(self, n: int, P: int, K: int, seed: int = 0, block: int = 100):
        import numpy as np

        self.n_rows, self.n_features, self.n_targets, self.seed, self.block = n, P, K, seed, block
        self.w = np.random.default_rng(seed).normal(size=(P, 1)).astype(np.float32) / P**0.5

    def blocks(self):
        import numpy as np

        rng = np.random.default_rng(self.seed + 1)
        for s in range(0, self.n_rows, self.block):
            m = min(self.block, self.n_rows - s)
            x = rng.random((m, self.n_features), dtype=np.float32) >= 0.05
            y = (x @ self.w + rng.standard_normal((m, self.n_targets), dtype=np.float32)).astype(np.float16)
            yield x, y


def _fit_case(case: dict[str, Any], device: str) -> tuple[Any, Any]:
    """(warm-up, run) of a fit case."""
    from coar_dask.core.memory import fit_bytes, partial_sum_bytes
    from coar_dask.solvers.lstsq import lstsq
    from coar_dask.solvers.moments import stream_moments
    from coar_dask.solvers.rows import batch_rows_for
    from coar_dask.solvers.saga import saga

    P, K, n, method = case["P"], case["K"], case["n"], case["method"]
    grid = bool(case.get("grid"))
    if method == "partial-sum":
        import torch

        def run(p, k, rows_n):
            return stream_moments(_Rows(rows_n, p, k), torch.device(device), gram=True, rows=None,
                                  progress=None).state()
        return (lambda: run(8, 2, 200)), (lambda: run(P, K, n)), partial_sum_bytes(P, K, rows=batch_rows_for(P, K), n=n)
    if method == "saga":
        def run(p, k, rows_n):
            return saga(_Rows(rows_n, p, k), _Rows(max(rows_n // 4, 50), p, k, seed=5), device=device, max_epochs=1)
        pred = fit_bytes("saga", P, K, n=n, n_val=max(n // 4, 50), rows=min(n, 2500), device=device)
        return (lambda: run(8, 2, 200)), (lambda: run(P, K, n)), pred

    def run(p, k, rows_n):
        return lstsq(_Rows(rows_n, p, k), _Rows(max(rows_n // 4, 50), p, k, seed=5), device=device, method=method,
                     ridge=1.0, ridge_grid="0,1,10" if grid else None, cg_max_iter=3)
    pred = fit_bytes(method, P, K, rows=batch_rows_for(P, K), n=n, grid=grid, device=device)
    return (lambda: run(8, 2, 200)), (lambda: run(P, K, n)), pred


def _build_case(case: dict[str, Any], device: str) -> tuple[Any, Any]:
    """A build worker: load an experiment (model, examples) and compute one block of outputs."""
    from coar_dask.ablation.engine import compute_outputs
    from coar_dask.core.experiment import Experiment, load_state
    from coar_dask.core.masks import sample_masks
    from coar_dask.core.memory import build_worker_bytes

    width, n_ex, bs, m = case["width"], case["examples"], case["batch"], case["masks_per_pass"]
    factory = "coar_dask.zoo.architectures:cifar_resnet18"

    def experiment(w, k, b):
        return Experiment(model="coar_dask.zoo.presets:seeded_model", model_kwargs={"factory": factory, "width": w},
                          examples="coar_dask.zoo.presets:random_examples",
                          examples_kwargs={"n": k, "shape": [3, 32, 32]}, include=("conv",), kinds=("conv2d",),
                          batch_size=b, masks_per_pass=m, device=device)

    def run(w, k, b):
        state = load_state(experiment(w, k, b))
        masks = sample_masks(0, range(2 * m), state.n_components, 0.05)
        return compute_outputs(state, masks)

    param_bytes, act = _resnet_shapes(factory, width)
    pred = build_worker_bytes(param_bytes=param_bytes, example_bytes=3 * 32 * 32 * 4, n_examples=n_ex,
                              examples_per_pass=min(bs, n_ex), masks_per_pass=m, activation_elements=act,
                              outputs_per_example=10, device=device)["device"]
    return (lambda: run(8, 16, 8)), (lambda: run(width, n_ex, bs)), pred


def _resnet_shapes(factory: str, width: int) -> tuple[int, int]:
    """Parameter bytes and the largest module output (elements per example) of the model, on meta."""
    import torch

    from coar_dask.core.experiment import import_object
    from coar_dask.zoo.plan import largest_activation

    with torch.device("meta"):
        model = import_object(factory)(width=width).eval()
    return _param_bytes(model), largest_activation(model, torch.empty(1, 3, 32, 32, device="meta"))


def _param_bytes(model: Any) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def _client_case(case: dict[str, Any], device: str) -> tuple[Any, Any]:
    """The client assembling target slices into attributions and saving them (torch file)."""
    import tempfile

    import numpy as np

    from coar_dask.core.memory import client_bytes
    from coar_dask.fit.attributions import Attributions

    P, K, s = case["P"], case["K"], case["slices"]
    tmp = tempfile.mkdtemp(prefix="coar-mm-")

    def run(p, k, slices):
        edges = np.linspace(0, k, slices + 1).astype(int)
        parts = [np.random.default_rng(i).standard_normal((p, b - a), dtype=np.float32)
                 for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
        weight = np.concatenate(parts, axis=-1)
        att = Attributions(weight, np.zeros(k, np.float32), np.zeros(k, np.float32), {"solver": "lstsq"})
        att.save(os.path.join(tmp, f"a{p}.pt"), overwrite=True)

    return (lambda: run(8, 4, 2)), (lambda: run(P, K, s)), client_bytes(P, K, slices=s)


def child(case: dict[str, Any], device: str) -> dict[str, Any]:
    """Run one case in this (fresh) process and return measured and predicted bytes."""
    kind = {"fit": _fit_case, "build": _build_case, "client": _client_case}[case["stage"]]
    warm, run, pred = kind(case, device)
    warm()
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    if cuda:
        measured = torch.cuda.max_memory_allocated() - before
    else:
        measured = _status("VmHWM:") - before
    return {**case, "measured_bytes": int(measured), "predicted_bytes": int(pred.total),
            "rel_error": (pred.total - measured) / max(measured, 1), "seconds": round(seconds, 2),
            "parts": dict(pred.parts)}


# ----------------------------------------------------------------------------- parent side
def largest(method: str, K: int, max_bytes: float, grid: bool = False) -> int:
    """Largest P (a multiple of 500) whose predicted peak stays under ``max_bytes``."""
    from coar_dask.core.memory import fit_bytes
    from coar_dask.solvers.rows import batch_rows_for

    P = 500
    while fit_bytes(method, P + 500, K, rows=batch_rows_for(P + 500, K), grid=grid).total <= max_bytes:
        P += 500
    return P


def cases(max_bytes: float, quick: bool) -> list[dict[str, Any]]:
    """At least three sizes per stage (``--quick``: two), the last of the Gram and CG fits the largest
    that ``max_bytes`` allows."""
    n = 600  # ridge 1 keeps the Cholesky path with fewer rows than components
    out: list[dict[str, Any]] = []
    gram = [(1000, 100), (2000, 3000), (4000, 100), (largest("gram", 100, max_bytes), 100)]
    cg = [(2000, 100), (4000, 1000), (2000, 4000), (largest("cg", 2000, max_bytes), 2000)]
    grid = [(600, 100), (1000, 2000), (1500, 100)]
    saga = [(1000, 500, 3000), (2000, 2000, 3000), (1000, 1000, 20000)]
    parts = [(1000, 100, 600), (2000, 2000, 600), (4000, 500, 600)]
    build = [(32, 64, 64, 1), (32, 128, 64, 2), (48, 64, 64, 2)]
    client = [(2000, 5000, 1), (4000, 5000, 4), (8000, 4000, 2)]
    pick = (lambda xs: xs[:2]) if quick else (lambda xs: xs)
    out += [{"stage": "fit", "method": "gram", "P": P, "K": K, "n": n} for P, K in pick(gram)]
    out += [{"stage": "fit", "method": "gram", "grid": True, "P": P, "K": K, "n": n} for P, K in pick(grid)]
    out += [{"stage": "fit", "method": "cg", "P": P, "K": K, "n": n} for P, K in pick(cg)]
    out += [{"stage": "fit", "method": "saga", "P": P, "K": K, "n": r} for P, K, r in pick(saga)]
    out += [{"stage": "fit", "method": "partial-sum", "P": P, "K": K, "n": r} for P, K, r in pick(parts)]
    out += [{"stage": "build", "method": "worker", "width": w, "examples": k, "batch": b, "masks_per_pass": m}
            for w, k, b, m in pick(build)]
    out += [{"stage": "client", "method": "assemble+save", "P": P, "K": K, "slices": s} for P, K, s in pick(client)]
    return out


def run_case(case: dict[str, Any], device: str, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case), "--device", device],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    if proc.returncode:
        return {**case, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(r: dict[str, Any]) -> str:
    keys = ("P", "K", "n", "slices", "width", "examples", "batch", "masks_per_pass")
    return ", ".join(f"{k}={r[k]}" for k in keys if k in r) + (" grid" if r.get("grid") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="two sizes per stage")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fit cases read max_memory_allocated)")
    parser.add_argument("--max-bytes", type=float, default=3e9, help="predicted peak of the largest fit cases")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    parser.add_argument("--stage", help="only the cases of this stage or stage/method (e.g. build, fit/saga)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.device)))
        return 0
    import torch

    t0 = time.perf_counter()
    results = [run_case(c, args.device, args.timeout) for c in cases(args.max_bytes, args.quick)
               if (args.device == "cpu" or c["stage"] == "fit")
               and (not args.stage or args.stage in (c["stage"], f"{c['stage']}/{c['method']}"))]
    ok = [r for r in results if "error" not in r]
    stages: dict[str, list[str]] = {}
    for r in ok:
        stages.setdefault(f"{r['stage']}/{r['method']}" + ("+grid" if r.get("grid") else ""), []).append(_label(r))
    report = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "device": args.device},
        "max_rel_error": max((abs(r["rel_error"]) for r in ok), default=None),
        "sizes": stages, "errors": [r for r in results if "error" in r], "cases": ok,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'stage':<22} {'sizes':<44} {'measured':>10} {'predicted':>10} {'error':>7}")
        for r in ok:
            name = f"{r['stage']}/{r['method']}" + ("+grid" if r.get("grid") else "")
            print(f"{name:<22} {_label(r):<44} {r['measured_bytes'] / 1e6:>8.1f}MB {r['predicted_bytes'] / 1e6:>8.1f}MB "
                  f"{100 * r['rel_error']:>+6.1f}%")
        for r in report["errors"]:
            print(f"FAILED {_label(r)}: {r['error']}")
        print(f"max_rel_error {report['max_rel_error']:.3f} over {len(ok)} cases ({report['seconds']} s)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
