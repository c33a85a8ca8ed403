"""What a paper-sized COAR run costs, before running it: ``coar-dask plan``.

From an experiment YAML and a number of rows, without calling its factories
(they load hub weights and data the user supplies): the preset's architecture
is built on the ``meta`` device, its forward FLOPs per example counted there
(``torch.utils.flop_counter.FlopCounterMode``), one small block timed on the
local device with random weights, the codec's ratio measured on sampled masks
and synthetic outputs, and every memory figure taken from
:mod:`coar_dask.core.memory`. The result is a frozen :class:`Plan`.

It lives in ``zoo`` because it plans the paper's presets: it needs the
presets (``zoo``), the pass shape (``ablation``), the store's codecs (``core``)
and the memory model (``core``), all below ``zoo``.

Assumptions (stated in every plan's ``assumptions``): dense bf16 peak per GPU
kind (:data:`GPU_PEAK_FLOPS`), a utilisation of :data:`UTILISATION` of it for
the build, float32 (no tensor cores, TF32 off) peak for the fit's moments
(:data:`GPU_FP32_FLOPS`), the CPU moment rate measured by
``benchmarks/fit_scaling.py`` (:data:`CPU_MOMENT_FLOPS`), and
:data:`CG_ITERATIONS` conjugate-gradient iterations.

Examples
--------
>>> plan = plan_experiment("configs/cifar_resnet/experiment.yaml", rows=50_000, gpu="a100")  # doctest: +SKIP
>>> plan.fit_method, round(plan.build_gpu_hours)                                              # doctest: +SKIP
('gram', 11)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coar_dask.ablation.engine import AUTO_TARGET_ELEMENTS, auto_pass_shape
from coar_dask.core.components import select_components
from coar_dask.core.experiment import load_experiment
from coar_dask.core.masks import sample_masks
from coar_dask.core.memory import (
    GPU_MEMORY_FRACTION, available_host_bytes, build_worker_bytes, choose_fit_method, client_bytes, fit_bytes,
    human, slice_bytes, slices_needed,
)
from coar_dask.core.spec import load_spec
from coar_dask.core.store import init_store
from coar_dask.errors import ExperimentError, RegressionError
from coar_dask.solvers.rows import batch_rows_for
from coar_dask.zoo.presets import PRESETS, build_model, get_preset

__all__ = ["Plan", "plan_experiment", "GPU_PEAK_FLOPS", "GPU_FP32_FLOPS", "GPU_MEMORY_BYTES", "UTILISATION",
           "CPU_MOMENT_FLOPS", "CG_ITERATIONS", "forward_flops", "largest_activation"]

logger = logging.getLogger(__name__)

#: Dense bf16 peak FLOP/s per GPU (vendor data sheets: A100 312, H100 SXM 989, H200 989 TFLOP/s).
GPU_PEAK_FLOPS = {"a100": 312e12, "h100": 989e12, "h200": 989e12}
#: Float32 peak without tensor cores (the fit's products run at full float32 precision, TF32 off).
GPU_FP32_FLOPS = {"a100": 19.5e12, "h100": 67e12, "h200": 67e12}
#: GPU memory per kind (A100 80 GB, H100 80 GB, H200 141 GB).
GPU_MEMORY_BYTES = {"a100": 80e9, "h100": 80e9, "h200": 141e9}
#: Fraction of peak a build and a fit sustain: an assumption until ``benchmarks/gpu_check.sh`` measures it.
UTILISATION = 0.4
#: Moments per CPU core, measured (``benchmarks/fit_scaling.py``: 91 GFLOP/s, one worker on one core).
CPU_MOMENT_FLOPS = 91e9
#: Conjugate-gradient iterations assumed (each streams the rows once).
CG_ITERATIONS = 100
#: Tokens per story assumed for GPT-2 (the configuration pads to the longest story, at most 1,024).
LM_TOKENS = 512


@dataclass(frozen=True)
class Plan:
    """Predicted cost of a build and fit; ``to_dict()`` is ``coar-dask plan --json``."""

    experiment: str
    preset: str
    rows: int
    gpu: str
    workers: int
    components: int
    examples: int
    flops_per_example: float
    timed_block: dict[str, Any]
    build_flops: float
    build_gpu_hours: float
    build_wall_hours: float
    blocks: int
    disk_bytes: int
    disk: dict[str, Any]
    worker_peak_bytes: int
    worker_host_bytes: int
    worker: dict[str, Any]
    fit_method: str
    fit_slices: int
    fit_peak_bytes: int
    fit_hours: float
    fit_budget_bytes: float
    fit_rows: int
    attributions_bytes: int
    client_peak_bytes: int
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["assumptions"] = list(self.assumptions)
        return out

    def __str__(self) -> str:
        return "\n".join([
            f"{self.preset}: {self.rows:,} rows x {self.components:,} components, {self.examples:,} examples "
            f"({self.flops_per_example / 1e9:.3g} GFLOPs each)",
            f"build: {self.build_flops:.3g} FLOPs = {self.build_gpu_hours:,.1f} {self.gpu}-hours "
            f"({'CPU' if self.gpu == 'cpu' else 'GPU'}), {self.build_wall_hours:,.2f} h on {self.workers} "
            f"worker(s) ({self.blocks:,} blocks)",
            f"worker peak: {human(self.worker_peak_bytes)} on the device, {human(self.worker_host_bytes)} host "
            f"({self.worker['masks_per_pass']} masks x {self.worker['examples_per_pass']} examples per pass)",
            f"disk: {human(self.disk_bytes)} (masks {human(self.disk['masks_bytes'])} at "
            f"{self.disk['masks_ratio']:.1f}x, outputs {human(self.disk['outputs_bytes'])} at "
            f"{self.disk['outputs_ratio']:.2f}x)",
            f"fit: {self.fit_method}" + (f" in {self.fit_slices} target slices" if self.fit_slices > 1 else "")
            + f", peak {human(self.fit_peak_bytes)} of {human(self.fit_budget_bytes)}, {self.fit_hours:,.2f} h",
            f"attributions: {human(self.attributions_bytes)}; client peak {human(self.client_peak_bytes)}",
            "assumptions: " + "; ".join(self.assumptions),
        ])


def plan_experiment(experiment: str | os.PathLike, rows: int, *, gpu: str = "a100", workers: int = 1,
                    preset: str | None = None, examples: int | None = None, time_block: bool = True) -> Plan:
    """Plan a build of ``rows`` rows and its fit for ``experiment`` (a YAML path) on ``workers`` GPUs
    of kind ``gpu`` (``a100``, ``h100``, ``h200``) or CPU workers (``cpu``).

    Parameters
    ----------
    experiment
        The experiment YAML; its factories are not called.
    rows
        Rows (ablated models) of the build.
    gpu, workers
        Where the build and fit run.
    preset
        The architecture (default: the experiment's folder name under ``configs/``, or ``preset NAME``
        in its description).
    examples
        Examples (outputs per row); default from ``spec.json`` beside the experiment.
    time_block
        Time one small forward block on this machine (``False``: FLOPs only, no local rate).
    """
    path = Path(experiment)
    if not path.is_file():
        raise ExperimentError(f"experiment file {str(path)!r} does not exist; pass configs/<name>/experiment.yaml.")
    if gpu not in (*GPU_PEAK_FLOPS, "cpu"):
        raise ExperimentError(f"gpu must be one of {sorted(GPU_PEAK_FLOPS)} or 'cpu'; found {gpu!r}.")
    if rows < 1 or workers < 1:
        raise ExperimentError(f"rows and workers must be >= 1; found rows={rows}, workers={workers}.")
    exp = load_experiment(path)
    name = _preset_name(path, exp.description if hasattr(exp, "description") else None, preset)
    model = build_model(name, device="meta")
    P = len(select_components(model, include=exp.include, exclude=exp.exclude, kinds=exp.kinds))
    K = int(examples or _examples_from_spec(path, exp.y_name))
    example = _meta_example(name, 1)
    flops = forward_flops(model, example)
    block = _timed_block(name) if time_block else {}
    build = _build_cost(flops * K * rows, gpu, workers, block)
    rpc = min(100, rows)
    worker = _worker(name, model, example, exp, K, gpu)
    disk = _disk(P, K, rows, exp.alpha)
    fit = _fit(P, K, rows, gpu, workers)
    assumptions = (
        f"build at {UTILISATION:.0%} of {gpu} dense bf16 peak ({GPU_PEAK_FLOPS[gpu] / 1e12:.0f} TFLOP/s)"
        if gpu != "cpu" else f"build at the timed block's rate per worker ({block.get('flops_per_s', 0) / 1e9:.1f} "
                             "GFLOP/s, this machine)",
        f"fit moments at {UTILISATION:.0%} of {GPU_FP32_FLOPS.get(gpu, 0) / 1e12:.1f} TFLOP/s float32" if gpu != "cpu"
        else f"fit moments at {CPU_MOMENT_FLOPS / 1e9:.0f} GFLOP/s per worker (benchmarks/fit_scaling.py)",
        f"cg: {CG_ITERATIONS} iterations", f"fit memory: {GPU_MEMORY_FRACTION:.0%} of "
        + (f"{human(GPU_MEMORY_BYTES[gpu])} per GPU" if gpu != "cpu" else "this machine's available memory"),
        "outputs ratio measured on synthetic margins (masks @ w + noise, float16)",
    ) + ((f"GPT-2 stories of {LM_TOKENS} tokens",) if name == "gpt2_tinystories" else ())
    return Plan(
        experiment=str(path), preset=name, rows=int(rows), gpu=gpu, workers=int(workers), components=int(P),
        examples=K, flops_per_example=float(flops), timed_block=block, build_flops=float(flops * K * rows),
        build_gpu_hours=build["hours"], build_wall_hours=build["hours"] / max(1, min(workers, -(-rows // rpc))),
        blocks=-(-rows // rpc), disk_bytes=int(disk["masks_bytes"] + disk["outputs_bytes"]), disk=disk,
        worker_peak_bytes=worker["device_bytes"], worker_host_bytes=worker["host_bytes"], worker=worker,
        fit_method=fit["method"], fit_slices=fit["slices"], fit_peak_bytes=fit["peak"], fit_hours=fit["hours"],
        fit_budget_bytes=fit["budget"], fit_rows=fit["rows"], attributions_bytes=int(4 * P * K + 8 * K),
        client_peak_bytes=client_bytes(P, K, slices=fit["slices"]).total, assumptions=assumptions,
    )


def _preset_name(path: Path, description: str | None, preset: str | None) -> str:
    if preset:
        return get_preset(preset).name
    if path.parent.name in PRESETS:
        return path.parent.name
    found = re.search(r"preset (\w+)", description or "") or re.search(r"preset `?(\w+)", path.read_text())
    if found and found.group(1) in PRESETS:
        return found.group(1)
    raise ExperimentError(f"cannot tell which of the presets {sorted(PRESETS)} {str(path)!r} runs; "
                          "pass --preset NAME.")


def _examples_from_spec(path: Path, y_name: str) -> int:
    spec_path = path.parent / "spec.json"
    if not spec_path.is_file():
        raise ExperimentError(f"no spec.json beside {str(path)!r} to count the examples; pass --examples K.")
    spec = load_spec(spec_path)
    return int(np.prod(spec[y_name].shape))


def _meta_example(name: str, batch: int, device: str = "meta", tokens: int = LM_TOKENS) -> Any:
    import torch

    shape = get_preset(name).input_shape
    if name == "gpt2_tinystories":
        return torch.zeros((batch, tokens), dtype=torch.long, device=device)
    return torch.zeros((batch, *shape), device=device)


def forward_flops(model: Any, example: Any) -> float:
    """FLOPs (2 per multiply-add) of one forward pass over ``example`` (on any device, ``meta`` too),
    per example of its batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return float(counter.get_total_flops()) / int(example.shape[0])


def largest_activation(model: Any, example: Any) -> int:
    """Elements, per example, of the largest tensor any leaf module outputs (a forward on ``example``)."""
    import torch

    sizes: list[int] = []

    def hook(_m: Any, _i: Any, out: Any) -> None:
        out = getattr(out, "logits", out)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                sizes.append(t.numel())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return max(sizes) // int(example.shape[0])


def _timed_block(name: str, batch: int = 2, tokens: int = 64) -> dict[str, Any]:
    """One forward block of the architecture with random weights on this machine: FLOP/s."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(name, device=device)
    example = _meta_example(name, batch, device=device, tokens=tokens)
    flops = forward_flops(model, example) * batch
    with torch.no_grad():
        model(example)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(example)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"device": device, "batch": batch, "flops": flops, "seconds": round(seconds, 4),
            "flops_per_s": flops / seconds, "threads": torch.get_num_threads()}


def _build_cost(total_flops: float, gpu: str, workers: int, block: dict[str, Any]) -> dict[str, float]:
    if gpu == "cpu":
        rate = block.get("flops_per_s")
        if not rate:
            raise ExperimentError("a CPU plan needs the timed block (its rate); run without --no-time.")
    else:
        rate = UTILISATION * GPU_PEAK_FLOPS[gpu]
    return {"hours": total_flops / rate / 3600}


def _worker(name: str, model: Any, example: Any, exp: Any, K: int, gpu: str) -> dict[str, Any]:
    device = "cpu" if gpu == "cpu" else "cuda"
    act = largest_activation(model, example)
    per_pass = min(int(exp.batch_size), K)
    m, per_pass = (1, per_pass) if exp.masks_per_pass == 1 else auto_pass_shape(
        per_pass, act, 100, target_elements=AUTO_TARGET_ELEMENTS[device])
    if exp.masks_per_pass:
        m = int(exp.masks_per_pass)
    example_bytes = int(example[0].numel() * example.element_size())
    params = int(sum(p.numel() * p.element_size() for p in model.parameters()))
    est = build_worker_bytes(param_bytes=params, example_bytes=example_bytes, n_examples=K,
                             examples_per_pass=per_pass, masks_per_pass=m, activation_elements=act,
                             activation_itemsize=2 if getattr(exp, "amp", "off") in ("bf16", "fp16") else 4,
                             outputs_per_example=0, device=device,
                             batchnorm=any("BatchNorm" in type(mod).__name__ for mod in model.modules()))
    return {"device_bytes": est["device"].total, "host_bytes": est["host"].total, "masks_per_pass": m,
            "examples_per_pass": per_pass, "largest_activation_per_example": act, "param_bytes": params,
            "parts": dict(est["device"].parts)}


def _disk(P: int, K: int, rows: int, alpha: float, sample_rows: int = 200) -> dict[str, Any]:
    """Bytes per store from the store's own codecs on ``sample_rows`` sampled masks and synthetic outputs."""
    n = int(min(sample_rows, rows))
    masks = sample_masks(0, range(n), P, alpha)
    w = np.random.default_rng(0).normal(size=(P, 1)).astype(np.float32) / math.sqrt(P)
    y = (20 + masks.astype(np.float32) @ w + np.random.default_rng(1).normal(size=(n, K)).astype(np.float32) * 0.5)
    spec = {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                        "outputs": {"dtype": "float16", "shape": [K]}}}
    with tempfile.TemporaryDirectory(prefix="coar-plan-") as tmp:
        store = init_store(Path(tmp) / "s", spec, rows_per_chunk=n, digests=False)
        store.write_block(0, {"masks": masks, "outputs": y.astype(np.float16)})
        stored = {name: _folder_bytes(Path(tmp) / "s" / name) for name in ("masks", "outputs")}
    m_ratio = n * P / stored["masks"]
    o_ratio = 2 * n * K / stored["outputs"]
    return {"masks_ratio": m_ratio, "outputs_ratio": o_ratio, "masks_bytes": int(rows * P / m_ratio),
            "outputs_bytes": int(2 * rows * K / o_ratio), "masks_npy_bytes": int(rows * P), "sample_rows": n}


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def _fit(P: int, K: int, n: int, gpu: str, workers: int) -> dict[str, Any]:
    device = "cpu" if gpu == "cpu" else "cuda"
    budget = GPU_MEMORY_FRACTION * GPU_MEMORY_BYTES[gpu] if gpu != "cpu" else float(available_host_bytes())
    rows = batch_rows_for(P, K)
    try:
        method, slices = choose_fit_method(P, K, budget, rows=rows, device=device), 1
    except RegressionError:
        method, slices = "cg", slices_needed("cg", P, K, budget, rows=rows, device=device) or 0
    peak = slice_bytes(method, P, K, max(slices, 1), rows=rows, device=device).total
    rate = CPU_MOMENT_FLOPS if gpu == "cpu" else UTILISATION * GPU_FP32_FLOPS[gpu]
    moments = n * P * P + 2.0 * n * P * K
    flops = (moments + P**3 / 3 + 2.0 * P * P * K) if method == "gram" else (
        2.0 * n * P * K + CG_ITERATIONS * 4.0 * n * P * K) * max(slices, 1) / max(1, min(workers, max(slices, 1)))
    return {"method": method, "slices": max(slices, 1), "peak": int(peak), "hours": flops / rate / 3600,
            "budget": budget, "rows": rows}


def plan_json(plan: Plan) -> str:
    """``plan`` as indented JSON."""
    return json.dumps(plan.to_dict(), indent=2, default=float)
