#!/usr/bin/env bash
# One GPU check of the CUDA path (issue 18), under 5 minutes on one GPU, with the project's own set-up:
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with an NVIDIA GPU
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # also writes $OUT/gpu_check.json
#
# 1. `make venv` (the project's .venv; set TORCH=torch==X+cuXYZ or an index for a CUDA build of torch).
# 2. The gpu-marked tests: a device-cuda build with and without AMP against the CPU build (stated
#    tolerances in tests/test_gpu.py), the batched ablation path taken (not fallen back), lstsq Gram and
#    CG, SAGA and (if installed) fast_l1 on CUDA against the CPU fit with TF32 enabled, and the Gram
#    choice against this GPU's free memory.
# 3. The build benchmark on CUDA (models/s, and the ratio to a plain CUDA forward floor).
# Figures go to one JSON: the GPU, versions, the test outcome and the benchmark's figures.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
work="$(mktemp -d "${TMPDIR:-/tmp}/coar-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

timeout 240 make venv VENV="$VENV" >/dev/null
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA GPU: install a CUDA build of torch (make venv TORCH=...)")'

set +e
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_solvers.py \
    -o addopts="" -rs --junitxml="$work/gpu-tests.xml" 2>&1 | tail -25
tests_rc=${PIPESTATUS[0]}
timeout 120 "$PY" benchmarks/build_throughput.py --device cuda --workers 1 --rounds 2 --build-repeats 1 \
    --json >"$work/bench.json" 2>"$work/bench.err"
bench_rc=$?
set -e
[ "$bench_rc" -eq 0 ] || tail -5 "$work/bench.err"

"$PY" - "$work" "$tests_rc" "$bench_rc" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, tests_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
suite = ET.parse(work / "gpu-tests.xml").getroot().find("testsuite") if (work / "gpu-tests.xml").exists() else None
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
bench = json.loads((work / "bench.json").read_text()) if bench_rc == 0 else {"error": f"exit {bench_rc}"}
free, total = torch.cuda.mem_get_info()
report = {
    "gpu": torch.cuda.get_device_name(0), "gpu_memory_bytes": total, "gpu_free_bytes": free,
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "tests_exit": tests_rc, "tests": tests, "build_benchmark": bench,
}
text = json.dumps(report, indent=2, default=str)
print(text)
if os.environ.get("OUT"):
    Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
    (Path(os.environ["OUT"]) / "gpu_check.json").write_text(text)
sys.exit(1 if tests_rc not in (0, 5) or bench_rc else 0)
PY
