#!/usr/bin/env python
"""bfloat16 autocast's effect on COAR: held-out correlation with ``run.amp: off`` and ``run.amp: bf16``.

For each model, the same masks (one mask seed, the same rows) are ablated
twice by the real engine (:func:`coar_dask.ablation.engine.compute_outputs`),
once with ``run.amp: off`` (float32) and once with ``run.amp: bf16``
(bfloat16 autocast; here on the CPU, the same ``torch.autocast`` path a GPU
takes), then ``lstsq`` fits each set of outputs on the training rows (ridge
chosen on validation rows) and the fit is scored on test rows it never saw:
the mean over examples of the Pearson correlation between predicted and
actual outputs, each scored against its own precision's outputs. The report
gives both correlations, their difference (the issue's goal: within 0.01),
and how far bf16 moved the outputs themselves (max absolute difference and
their correlation), so that a zero difference cannot hide an autocast that
did not run.

Models: the digits ResNet (``coar_dask.zoo.digits``, trained here and cached,
``margin``) and a tiny seeded GPT-2 (``coar_dask.zoo.hf:tiny_gpt2``, random
weights, no download, ``lm_margin``).

Usage::

    python benchmarks/bf16_accuracy.py            # a table
    python benchmarks/bf16_accuracy.py --json     # one JSON object
    python benchmarks/bf16_accuracy.py --rows 300 --models digits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: GPT-2's components: the Conv1D rows of attention and MLP (as configs/gpt2_tinystories selects them).
GPT2_SELECTION = dict(include=(r"attn\.c_attn$", r"attn\.c_proj$", r"mlp\.c_fc$", r"mlp\.c_proj$"),
                      kinds=("conv1d",))
#: Ridge penalties tried on the validation rows (relative: times the features' mean variance sum).
RIDGE_GRID = "auto:8"


class _Rows:
    """Masks and outputs in memory as a solver's row source."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, block: int = 256):
        self.X, self.Y, self.block = X, Y, block
        self.n_rows, self.n_features = X.shape
        self.n_targets = Y.shape[1]

    def blocks(self):
        for s in range(0, self.n_rows, self.block):
            yield self.X[s:s + self.block], self.Y[s:s + self.block]


def experiment(model: str, amp: str, examples: int) -> Any:
    """The benchmark's experiment for ``model`` (``"digits"`` or ``"gpt2"``) with ``run.amp`` = ``amp``."""
    from coar_dask.core.experiment import Experiment

    if model == "digits":
        from coar_dask.zoo import digits

        return digits.experiment(amp=amp)  # its 360 held-out images
    if model == "gpt2":
        return Experiment(model="coar_dask.zoo.hf:tiny_gpt2", examples="coar_dask.zoo.hf:token_examples",
                          examples_kwargs={"n": examples or 32}, output="lm_margin", alpha=0.025, batch_size=64,
                          device="cpu", amp=amp, **GPT2_SELECTION)
    raise SystemExit(f"unknown model {model!r}: use digits or gpt2")


def heldout_correlation(result: Any, X: np.ndarray, Y: np.ndarray) -> float:
    """Mean over examples (columns) of the Pearson correlation between ``X @ w + b`` and ``Y``."""
    pred = X.astype(np.float64) @ result.weight.astype(np.float64) + result.bias.astype(np.float64)
    p = pred - pred.mean(0)
    a = Y.astype(np.float64) - Y.mean(0)
    denom = np.sqrt((p * p).sum(0) * (a * a).sum(0))
    ok = denom > 0
    return float(((p * a).sum(0)[ok] / denom[ok]).mean())


def _fit_and_score(masks: np.ndarray, Y: np.ndarray, n_train: int, n_val: int) -> float:
    from coar_dask.solvers.lstsq import lstsq

    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    result = lstsq(_Rows(masks[tr], Y[tr]), _Rows(masks[va], Y[va]), ridge_grid=RIDGE_GRID, method="gram")
    return heldout_correlation(result, masks[te], Y[te])


def measure(model: str, rows: int, examples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Outputs of the same ``rows`` masks under ``amp`` off and bf16, each fitted and scored on held-out rows.

    Rows split 60% training, 20% validation (the ridge), 20% test (the reported correlation).
    """
    import torch

    from coar_dask.ablation.engine import compute_outputs
    from coar_dask.core.experiment import load_state
    from coar_dask.core.masks import sample_masks

    out: dict[str, Any] = {"model": model, "rows": rows}
    outputs: dict[str, np.ndarray] = {}
    masks = None
    for amp in ("off", "bf16"):
        torch.manual_seed(seed)
        state = load_state(experiment(model, amp, examples))
        if masks is None:
            alpha = state.experiment.alpha
            masks = sample_masks(seed, range(rows), state.n_components, alpha)
            out.update(components=int(state.n_components), examples=int(state.n_examples), alpha=float(alpha))
        t0 = time.perf_counter()
        outputs[amp] = compute_outputs(state, masks).astype(np.float64)
        out[f"build_seconds_{amp}"] = round(time.perf_counter() - t0, 2)
    n_train, n_val = int(0.6 * rows), int(0.2 * rows)
    fp32, bf16 = outputs["off"], outputs["bf16"]
    out["heldout_correlation_fp32"] = _fit_and_score(masks, fp32, n_train, n_val)
    out["heldout_correlation_bf16"] = _fit_and_score(masks, bf16, n_train, n_val)
    out["correlation_difference"] = out["heldout_correlation_bf16"] - out["heldout_correlation_fp32"]
    out["output_max_abs_difference"] = float(np.abs(bf16 - fp32).max())
    out["output_std"] = float(fp32.std())
    out["output_correlation"] = float(np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--models", default="digits,gpt2", help="comma-separated: digits, gpt2")
    parser.add_argument("--rows", type=int, default=250, help="masks per model (60/20/20 train/val/test)")
    parser.add_argument("--examples", type=int, default=0,
                        help="GPT-2's sequences (0: 32); digits always uses its 360 held-out images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [measure(m.strip(), args.rows, args.examples) for m in args.models.split(",") if m.strip()]
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "platform": platform.platform(), "threads": args.threads},
              "goal": "abs(correlation_difference) <= 0.01", "models": results,
              "max_abs_correlation_difference": max(abs(r["correlation_difference"]) for r in results),
              "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'model':<8} {'P':>6} {'K':>5} {'rows':>5} {'fp32 r':>8} {'bf16 r':>8} {'diff':>8} {'out max|d|':>10}")
    for r in results:
        print(f"{r['model']:<8} {r['components']:>6} {r['examples']:>5} {r['rows']:>5} "
              f"{r['heldout_correlation_fp32']:>8.4f} {r['heldout_correlation_bf16']:>8.4f} "
              f"{r['correlation_difference']:>+8.4f} {r['output_max_abs_difference']:>10.4f}")
    print(f"{report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
