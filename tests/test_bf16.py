"""run.amp: bf16 against off on the same masks (benchmarks/bf16_accuracy.py, run tiny as a user runs it).

bf16 autocast must really run (the outputs differ from float32's) and change little (they correlate, and
the held-out correlations of the two fits are close); the measured figures at the benchmark's default size
are in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_bf16_outputs_differ_from_float32_but_correlate():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bf16_accuracy.py"), "--json", "--models", "gpt2",
                           "--rows", "60", "--examples", "8"], capture_output=True, text=True, timeout=600,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    (gpt2,) = report["models"]
    for key in ("heldout_correlation_fp32", "heldout_correlation_bf16", "correlation_difference",
                "output_max_abs_difference", "output_correlation", "components", "rows"):
        assert key in gpt2, key
    assert gpt2["rows"] == 60 and gpt2["components"] == 896 and gpt2["examples"] == 8
    assert gpt2["output_max_abs_difference"] > 0  # autocast ran: bfloat16 rounding moved the outputs
    assert gpt2["output_correlation"] > 0.99
    assert gpt2["correlation_difference"] == pytest.approx(
        gpt2["heldout_correlation_bf16"] - gpt2["heldout_correlation_fp32"])
    assert abs(gpt2["correlation_difference"]) < 0.1
    assert report["max_abs_correlation_difference"] == abs(gpt2["correlation_difference"])
