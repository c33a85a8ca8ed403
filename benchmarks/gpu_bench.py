"""The Python part of ``benchmarks/gpu_check.sh`` (issue 23): one JSON of what only a GPU can show.

Sections (each records its own ``ok`` and, on failure, ``error``; the run exits 1 if any failed):

``device``          GPU name, memory, torch/CUDA versions, the spec bf16/TF32 dense peak and a
                    measured bf16 8192^3 matmul rate (the peak a fraction is taken of)
``gpu_tests``       the ``gpu``-marked pytest run of gpu_check.sh (``--tests-rc``, ``--tests-xml``):
                    exit 0 with at least one test run is a pass; 5 (none collected) or all skipped fail
``resnet50_build``  ResNet-50's shape on random weights (``coar_dask.zoo.architectures.resnet50``,
                    no torchvision), ablated outputs for ``run.amp`` off and bf16: achieved TFLOP/s,
                    fraction of peak, peak GPU memory beside ``core.memory.build_worker_bytes``
``fits``            lstsq Gram and CG at P = 22,720: seconds, peak GPU memory beside ``core.memory.fit_bytes``
``checks``          the closing note's "GPU checks to run when lent": two GPU workers see distinct
                    device UUIDs (skipped, and said, with one GPU); train + eval stores peak == one
                    store's peak; a build started at a pass that does not fit finishes with the same
                    outputs; fast_l1 with ``device="cuda:1"`` remapped on a one-GPU process

``--cpu-smoke`` runs every section on the CPU at tiny sizes, so the JSON's keys are tested without a GPU::

    python benchmarks/gpu_bench.py --cpu-smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger("gpu_bench")

#: Dense (no sparsity) peak TFLOP/s by GPU name fragment: (bf16, tf32). NVIDIA's data sheets (SXM).
SPEC_PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0),
                    "L40S": (362.0, 183.0), "A10": (125.0, 62.5)}
P_RESNET = 22_720
SECTIONS = ("device", "gpu_tests", "resnet50_build", "fits", "checks")
CHECKS = ("two_gpu_uuids", "train_eval_peak", "oom_batch_same_outputs", "fast_l1_cuda1_remap")


class Sizes:
    """The sizes of a GPU run, or tiny ones for ``--cpu-smoke``."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.image = 32 if smoke else 224
        self.examples = 2 if smoke else 128
        self.masks = 2 if smoke else 64
        self.batch = 2 if smoke else 64
        self.fit_P = 64 if smoke else P_RESNET
        self.fit_K = 4 if smoke else 1_000
        self.fit_rows = 300 if smoke else 12_000
        self.oom_masks_per_pass = 2 if smoke else 256
        #: ResNet-50 on the GPU; a narrow CIFAR ResNet-18 keeps the CPU smoke under a minute
        self.factory = "coar_dask.zoo.architectures:cifar_resnet18" if smoke else "imagenet_resnet"
        self.factory_kwargs = {"width": 8} if smoke else {}
        self.classes = 10 if smoke else 1000

    def meta_model(self) -> Any:
        """The benchmarked architecture on the meta device, in eval mode (for FLOPs and activations)."""
        from coar_dask.zoo.presets import seeded_model

        with _torch().device("meta"):
            return seeded_model(self.factory, **self.factory_kwargs).eval()


# ----------------------------------------------------------------------------- helpers
def _torch():
    import torch

    return torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        _torch().cuda.synchronize()


def _reset_peak(device: str) -> int:
    torch = _torch()
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def _peak(device: str, before: int) -> int | None:
    """Peak GPU bytes since :func:`_reset_peak` (``None`` on the CPU: no allocator to ask)."""
    if not device.startswith("cuda"):
        return None
    return int(_torch().cuda.max_memory_allocated()) - before


def _section(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one section; a failure is recorded (ok False, the error's last line) instead of raised."""
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        out.setdefault("ok", True)
    except Exception as exc:  # noqa: BLE001 - every failure goes into the JSON
        logger.error("%s failed:\n%s", fn.__name__, traceback.format_exc())
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ----------------------------------------------------------------------------- device
def device_info(sizes: Sizes) -> dict[str, Any]:
    """The GPU, versions and its peak: the data sheet's and a measured bf16 matmul rate."""
    torch = _torch()
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                            "cuda_available": bool(torch.cuda.is_available()), "device_count": 0}
    if sizes.smoke:
        info.update(name="cpu (smoke)", memory_bytes=None, spec_bf16_tflops=None, spec_tf32_tflops=None,
                    measured_bf16_matmul_tflops=_matmul_tflops("cpu", 256))
        return info
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA GPU: this check needs python3 with a CUDA build of torch")
    name = torch.cuda.get_device_name(0)
    spec = next((v for k, v in SPEC_PEAK_TFLOPS.items() if k in name), (None, None))
    info.update(name=name, device_count=torch.cuda.device_count(),
                memory_bytes=int(torch.cuda.get_device_properties(0).total_memory),
                spec_bf16_tflops=spec[0], spec_tf32_tflops=spec[1],
                measured_bf16_matmul_tflops=_matmul_tflops("cuda", 8192))
    return info


def _matmul_tflops(device: str, n: int, repeats: int = 10) -> float:
    torch = _torch()
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return float(f"{2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12:.4g}")


# ----------------------------------------------------------------------------- gpu tests
def gpu_tests(rc: int | None, xml: str | None) -> dict[str, Any]:
    """The pytest run's outcome: a pass needs exit 0 and at least one test that ran (not skipped).

    Exit 5 (no tests collected) and a run whose every test skipped are failures: they show nothing.
    """
    if rc is None:
        return {"ok": False, "error": "gpu_check.sh passed no --tests-rc: the GPU tests did not run",
                "exit": None, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "ran": 0}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml and Path(xml).exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in counts}
    ran = counts["tests"] - counts["skipped"]
    out: dict[str, Any] = {"exit": rc, **counts, "ran": ran, "ok": rc == 0 and ran > 0}
    if rc == 5:
        out["error"] = "pytest exit 5: no tests collected (a selection that runs nothing is a failure)"
    elif rc == 0 and ran == 0:
        out["error"] = "every selected test was skipped: nothing ran on the GPU"
    elif rc != 0:
        out["error"] = f"pytest exit {rc}"
    return out


# ----------------------------------------------------------------------------- ResNet-50 build
def _resnet_experiment(sizes: Sizes, amp: str, **changes: Any):
    from coar_dask.core.experiment import Experiment

    fields = dict(model="coar_dask.zoo.presets:seeded_model",
                  model_kwargs={"factory": sizes.factory, **sizes.factory_kwargs},
                  examples="coar_dask.zoo.presets:random_examples",
                  examples_kwargs={"n": sizes.examples, "shape": [3, sizes.image, sizes.image], "classes": sizes.classes},
                  include=("conv",), kinds=("conv2d",), alpha=0.1, batch_size=sizes.batch, device=sizes.device,
                  amp=amp)
    fields.update(changes)
    return Experiment(**fields)


def _resnet_prediction(sizes: Sizes, state: Any, masks_per_pass: int) -> int:
    from coar_dask.core.memory import build_worker_bytes
    from coar_dask.zoo.plan import largest_activation

    torch = _torch()
    act = largest_activation(sizes.meta_model(), torch.empty(1, 3, sizes.image, sizes.image, device="meta"))
    params = int(sum(p.numel() * p.element_size() for p in state.model.parameters()))
    est = build_worker_bytes(param_bytes=params, example_bytes=3 * sizes.image ** 2 * 4, n_examples=sizes.examples,
                             examples_per_pass=min(sizes.batch, sizes.examples), masks_per_pass=masks_per_pass,
                             activation_elements=act, outputs_per_example=sizes.classes, device=sizes.device)
    return int(est["device"].total)


def resnet50_build(sizes: Sizes, peak_tflops: float | None) -> dict[str, Any]:
    """Ablated ResNet-50 outputs (the build's engine) for amp off and bf16: TFLOP/s and peak memory."""
    from coar_dask.ablation.engine import compute_outputs
    from coar_dask.core.experiment import load_state
    from coar_dask.core.masks import sample_masks
    from coar_dask.zoo.plan import forward_flops

    torch = _torch()
    flops = forward_flops(sizes.meta_model(), torch.empty(1, 3, sizes.image, sizes.image, device="meta"))
    out: dict[str, Any] = {"model": sizes.factory, "image": sizes.image, "examples": sizes.examples, "masks": sizes.masks,
                           "forward_gflops_per_example": round(flops / 1e9, 3)}
    for amp in ("off", "bf16"):
        state = load_state(_resnet_experiment(sizes, amp))
        masks = sample_masks(0, range(sizes.masks), state.n_components, 0.1)
        compute_outputs(state, masks[:1])  # warm-up: cuDNN's choices, the pass shape
        before = _reset_peak(sizes.device)
        t0 = time.perf_counter()
        values = compute_outputs(state, masks)
        _sync(sizes.device)
        seconds = time.perf_counter() - t0
        tflops = flops * sizes.examples * sizes.masks / seconds / 1e12
        m = int(getattr(state, "masks_per_pass", 0) or 1)
        out[f"amp_{amp}"] = {
            "seconds": round(seconds, 3), "tflops": float(f"{tflops:.4g}"),
            "fraction_of_peak": float(f"{tflops / peak_tflops:.4g}") if peak_tflops else None,
            "finite": bool(np.isfinite(values).all()),
            "peak_gpu_bytes": _peak(sizes.device, before),
            "predicted_gpu_bytes": _resnet_prediction(sizes, state, m)}
    out["ok"] = all(out[f"amp_{a}"]["finite"] for a in ("off", "bf16"))
    return out


# ----------------------------------------------------------------------------- fits at P = 22,720
class _Rows:
    """Planted rows held once in host memory (bool masks, float16 outputs), streamed in blocks."""

    def __init__(self, n: int, P: int, K: int, seed: int = 0, block: int = 1000):
        rng = np.random.default_rng(seed)
        self.X = rng.random((n, P), dtype=np.float32) >= 0.1
        w = np.random.default_rng(99).normal(size=(P, K)).astype(np.float32) / np.sqrt(P)  # one truth for all
        self.Y = (self.X[:, :512] @ w[:512] + 0.01 * rng.normal(size=(n, K))).astype(np.float16)
        self.n_rows, self.n_features, self.n_targets, self.block = n, P, K, block

    def blocks(self):
        for a in range(0, self.n_rows, self.block):
            yield self.X[a:a + self.block], self.Y[a:a + self.block]


def fits(sizes: Sizes) -> dict[str, Any]:
    """lstsq's Gram and CG methods at P = 22,720 on the GPU: seconds and peak memory vs the model."""
    from coar_dask.core.memory import fit_bytes
    from coar_dask.solvers.lstsq import lstsq
    from coar_dask.solvers.rows import batch_rows_for

    P, K, n = sizes.fit_P, sizes.fit_K, sizes.fit_rows
    train, val = _Rows(n, P, K), _Rows(max(n // 10, 50), P, K, seed=5)
    out: dict[str, Any] = {"P": P, "K": K, "rows": n}
    for method in ("gram", "cg"):
        before = _reset_peak(sizes.device)
        t0 = time.perf_counter()
        res = lstsq(train, val, device=sizes.device, method=method, ridge=1.0, cg_max_iter=20)
        _sync(sizes.device)
        corr = np.asarray(res.info.get("val_correlation", [np.nan]), dtype=float)
        pred = fit_bytes(method, P, K, rows=batch_rows_for(P, K), n=n, device=sizes.device)
        out[method] = {"seconds": round(time.perf_counter() - t0, 2), "peak_gpu_bytes": _peak(sizes.device, before),
                       "predicted_gpu_bytes": int(pred.total),
                       "val_correlation_mean": float(np.nanmean(corr)) if corr.size else None,
                       "finite": bool(np.isfinite(res.weight).all())}
    out["ok"] = out["gram"]["finite"] and out["cg"]["finite"]
    return out


# ----------------------------------------------------------------------------- the closing note's checks
def _uuid() -> str:
    torch = _torch()
    return str(torch.cuda.get_device_properties(0).uuid)


def check_two_gpu_uuids(sizes: Sizes) -> dict[str, Any]:
    """Two GPU workers of a LocalCluster (``gpus="auto"``) each see a different device."""
    torch = _torch()
    count = torch.cuda.device_count() if not sizes.smoke else 0
    if count < 2:
        return {"ok": True, "skipped": f"{count} GPU(s) visible: the two-worker check needs 2"}
    from coar_dask.runtime.clusters.local import local_client

    with local_client(gpus=[str(i) for i in range(2)]) as client:
        uuids = client.run(_uuid)
    return {"ok": len(set(uuids.values())) == len(uuids) == 2, "uuids": sorted(uuids.values())}


def _build_store(tmp: Path, name: str, exp: Any, rows: int) -> np.ndarray:
    from coar_dask.core.store import open_store
    from coar_dask.runtime import build as B

    store = B.init_experiment_store(tmp / name, exp, rows=rows, rows_per_chunk=rows)
    B.run_build(store, exp)
    return np.asarray(open_store(tmp / name).array(exp.y_name)[:], dtype=np.float32)


def check_train_eval_peak(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    """A train and an evaluation store (same model, other examples) built in one process peak no
    higher than one store (plus half the model's bytes): the loaded state is shared."""
    from coar_dask.core.experiment import load_state

    train = _resnet_experiment(sizes, "bf16", batch_size=min(8, sizes.batch))
    evaluation = train.replace(examples_kwargs={**train.examples_kwargs, "seed": 1})
    before = _reset_peak(sizes.device)
    _build_store(tmp, "train", train, rows=4)
    single = _peak(sizes.device, before)
    _build_store(tmp, "eval", evaluation, rows=4)
    both = _peak(sizes.device, before)
    params = int(sum(p.numel() * p.element_size() for p in load_state(train).model.parameters()))
    ok = True if single is None else both <= single + params // 2
    return {"ok": ok, "single_store_peak_bytes": single, "two_store_peak_bytes": both, "model_bytes": params}


def check_oom_batch(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    """A build started at a pass shape that cannot fit (masks_per_pass x batch rows of 224^2 images)
    halves it on CUDA OOM and finishes with the outputs of a build at a shape that fits."""
    rows = max(4, sizes.masks // 8)
    fits_exp = _resnet_experiment(sizes, "off", masks_per_pass=1)
    huge = fits_exp.replace(masks_per_pass=sizes.oom_masks_per_pass, batch_size=sizes.examples)
    reference = _build_store(tmp, "fits", fits_exp, rows=rows)
    halvings = _CountWarnings("CUDA out of memory")
    logging.getLogger("coar_dask").addHandler(halvings)
    try:
        values = _build_store(tmp, "huge", huge, rows=rows)
    finally:
        logging.getLogger("coar_dask").removeHandler(halvings)
    scale = float(np.abs(reference).max()) or 1.0
    diff = float(np.abs(values - reference).max()) / scale
    ok = diff <= 2e-2 and (sizes.smoke or halvings.count > 0)
    return {"ok": ok, "rows_per_pass_started": sizes.oom_masks_per_pass * sizes.examples,
            "oom_halvings": halvings.count, "max_rel_difference": diff}


class _CountWarnings(logging.Handler):
    def __init__(self, fragment: str):
        super().__init__(logging.WARNING)
        self.fragment, self.count = fragment, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += self.fragment in record.getMessage()


def check_fast_l1_remap(sizes: Sizes) -> dict[str, Any]:
    """fast_l1 with ``device="cuda:1"`` on a process that sees one GPU runs on cuda:0 (remapped)."""
    try:
        import fast_l1  # noqa: F401
    except ImportError as exc:
        return {"ok": True, "skipped": f"fast_l1 not importable ({exc}); install it to run this check"}
    from coar_dask.solvers import registry

    torch = _torch()
    if sizes.smoke or torch.cuda.device_count() != 1:
        return {"ok": True, "skipped": "needs a process that sees exactly one GPU"}
    rows = _Rows(1000, 64, 4)
    res = registry.get_solver("fast_l1")(rows, _Rows(200, 64, 4, seed=5), device="cuda:1", lr=0.05,
                                         batch_size=100, max_epochs=50)
    return {"ok": bool(np.isfinite(res.weight).all()), "device_asked": "cuda:1"}


def checks(sizes: Sizes) -> dict[str, Any]:
    """The closing note's GPU checks, each its own ok/error."""
    with tempfile.TemporaryDirectory(prefix="coar-gpu-bench-") as tmp:
        out = {"two_gpu_uuids": _section(check_two_gpu_uuids, sizes),
               "train_eval_peak": _section(check_train_eval_peak, sizes, Path(tmp)),
               "oom_batch_same_outputs": _section(check_oom_batch, sizes, Path(tmp)),
               "fast_l1_cuda1_remap": _section(check_fast_l1_remap, sizes)}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every section into one report."""
    sizes = Sizes(args.cpu_smoke)
    report: dict[str, Any] = {"cpu_smoke": sizes.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report["device"] = _section(device_info, sizes)
    report["gpu_tests"] = gpu_tests(args.tests_rc, args.tests_xml)
    peak = report["device"].get("measured_bf16_matmul_tflops") if sizes.smoke else report["device"].get(
        "spec_bf16_tflops") or report["device"].get("measured_bf16_matmul_tflops")
    report["resnet50_build"] = _section(resnet50_build, sizes, peak)
    report["fits"] = _section(fits, sizes)
    report["checks"] = _section(checks, sizes)
    report["ok"] = all(report[s]["ok"] for s in SECTIONS)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="the JSON report to write (required unless --tests-verdict)")
    parser.add_argument("--tests-verdict", action="store_true",
                        help="only judge --tests-rc/--tests-xml (print it; exit 0 if tests ran and passed)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tests the report's keys)")
    parser.add_argument("--tests-rc", type=int, default=None, help="exit code of the gpu-marked pytest run")
    parser.add_argument("--tests-xml", default=None, help="its --junitxml file")
    args = parser.parse_args(argv)
    if args.tests_verdict:
        verdict = gpu_tests(args.tests_rc, args.tests_xml)
        print(json.dumps(verdict))
        return 0 if verdict["ok"] else 1
    if not args.out:
        parser.error("--out FILE is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.cpu_smoke:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    report = run(args)
    text = json.dumps(report, indent=2, default=str)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
