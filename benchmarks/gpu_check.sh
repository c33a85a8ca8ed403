#!/usr/bin/env bash
# The GPU check (issue 23): on a lent GPU machine whose python3 already has a CUDA torch and which
# reaches no package index. Under 8 minutes; writes ONE JSON.
#
#   bash benchmarks/gpu_wheels.sh .whl                                  # here, where PyPI is reachable
#   bash benchmarks/gpu_check.sh --wheels .whl --out gpu_check.json     # there (carry .whl)
#   bash benchmarks/gpu_check.sh --wheels .whl --dry-run                # anywhere: the steps, exit 0
#
# Steps:
#  1. python3's torch must be a CUDA build that sees a GPU (never replaced: no torch wheel is installed).
#  2. pip install --no-index --no-deps --target <tmp>/site DIR/*.whl; PYTHONPATH=<tmp>/site. Any failure
#     stops the check with the pip output.
#  3. import coar_dask and what it needs from that folder; torch must still be the system's.
#  4. pytest -m gpu over tests/test_gpu.py and tests/test_solvers.py (junit XML). Exit 5 (nothing
#     collected) or every test skipped is a FAILURE.
#  5. benchmarks/gpu_bench.py: ResNet-50-shaped build (run.amp off and bf16: TFLOP/s, fraction of peak),
#     lstsq Gram and CG at P = 22,720, peak GPU memory beside core.memory's prediction, and the closing
#     note's checks (2-GPU UUIDs, train+eval peak, OOM pass shape, fast_l1 cuda:1). Writes --out.
#
# --tests-only [--pytest-args "ARGS"]: step 4 alone with the current python3 (no wheels); exit 0 only if
# tests ran and passed (tests/test_gpu.py runs it on an empty selection: exit 5 must fail).
set -euo pipefail
cd "$(dirname "$0")/.."

# A test of this script runs pytest, which must never run this script again (a selection matching the
# calling test recursed without end once): an inner call refuses.
[ -z "${COAR_GPU_CHECK_INNER:-}" ] || { echo "gpu_check.sh: called from its own pytest run; not recursing" >&2; exit 3; }
export COAR_GPU_CHECK_INNER=1

PY="${PYTHON:-python3}"
wheels="" out="gpu_check.json" dry=0 tests_only=0
pytest_args="-m gpu tests/test_gpu.py tests/test_solvers.py"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"

usage() { echo "usage: $0 --wheels DIR [--out FILE] [--dry-run] | --tests-only [--pytest-args ARGS]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --out) out="${2:?--out needs a file}"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --tests-only) tests_only=1; shift ;;
        --pytest-args) pytest_args="${2:?--pytest-args needs arguments}"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$wheels" ] || [ "$tests_only" = 1 ] || { echo "gpu_check.sh: --wheels DIR is required (make it with benchmarks/gpu_wheels.sh DIR)" >&2; usage; }

work="$(mktemp -d "${TMPDIR:-/tmp}/coar-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
site="$work/site" xml="$work/gpu-tests.xml"

step() {  # step NAME WHAT COMMAND...: print what it does; run it unless --dry-run
    local name="$1" what="$2"; shift 2
    printf '[gpu_check] step %s: %s\n' "$name" "$what"
    [ "$dry" = 1 ] && return 0
    "$@"
}

check_torch() {
    "$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: python3 torch {torch.__version__} sees no CUDA GPU: run this where a GPU is lent")
print("[gpu_check] torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
}

install_wheels() {
    shopt -s nullglob
    local files=("$wheels"/*.whl)
    [ "${#files[@]}" -gt 0 ] || { echo "gpu_check: no wheels in $wheels (run benchmarks/gpu_wheels.sh $wheels here)" >&2; exit 1; }
    for f in "${files[@]}"; do
        case "$(basename "$f")" in torch-*|nvidia_*|nvidia-*|triton-*)
            echo "gpu_check: $f would replace the machine's CUDA stack; remove it" >&2; exit 1 ;; esac
    done
    if ! "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${files[@]}" \
            >"$work/pip.log" 2>&1; then
        cat "$work/pip.log" >&2; echo "gpu_check: installing the wheels failed (above)" >&2; exit 1
    fi
    echo "[gpu_check] installed ${#files[@]} wheels into $site"
}

check_imports() {
    "$PY" - "$site" <<'PY'
import importlib, sys
site = sys.argv[1]
for name in ("coar_dask", "dask", "distributed", "zarr", "numcodecs", "yaml", "numpy", "sklearn", "tqdm",
             "coar_dask.runtime.build", "coar_dask.solvers.lstsq"):
    importlib.import_module(name)
import coar_dask, torch
if not coar_dask.__file__.startswith(site):
    sys.exit(f"gpu_check: coar_dask imported from {coar_dask.__file__}, not the installed wheel in {site}")
if torch.__file__.startswith(site):
    sys.exit("gpu_check: torch came from the wheels folder, not the machine's CUDA build")
print("[gpu_check] imports ok; coar_dask", getattr(coar_dask, "__version__", "?"), "from", coar_dask.__file__)
PY
}

run_tests() {  # sets tests_rc; never fails the script itself (the verdict does)
    set +e
    # shellcheck disable=SC2086  # pytest_args is a word list
    timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs --junitxml="$xml" $pytest_args 2>&1 | tail -30
    tests_rc=${PIPESTATUS[0]}
    set -e
}

tests_verdict() {
    "$PY" benchmarks/gpu_bench.py --tests-verdict --tests-rc "$tests_rc" --tests-xml "$xml"
}

tests_rc=""
if [ "$tests_only" = 1 ]; then
    step gpu-tests "timeout $TESTS_TIMEOUT $PY -m pytest -q -o addopts= --junitxml=$xml $pytest_args" run_tests
    [ "$dry" = 1 ] && exit 0
    tests_verdict
    exit $?
fi

[ "$dry" = 1 ] && echo "[gpu_check] dry run: nothing is installed or run; python3 is $PY"
step torch "$PY -c 'import torch; torch.cuda.is_available()' (a CUDA build that sees a GPU, else stop)" check_torch
step install-wheels "$PY -m pip install --no-index --no-deps --no-compile --target $site $wheels/*.whl (no torch, nvidia-*, triton)" install_wheels
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
step imports "PYTHONPATH=$site $PY: import coar_dask, dask, distributed, zarr, numcodecs, yaml, sklearn (coar_dask from $site, torch not)" check_imports
step gpu-tests "timeout $TESTS_TIMEOUT $PY -m pytest -q -o addopts= --junitxml=$xml $pytest_args (exit 5 or all skipped = failure)" run_tests
step bench "timeout $BENCH_TIMEOUT $PY benchmarks/gpu_bench.py --out $out --tests-rc PYTEST_EXIT --tests-xml $xml (ResNet-50 build amp off/bf16, Gram+CG at P=22,720, peak vs core.memory, 2-GPU UUIDs, train+eval peak, OOM pass shape, fast_l1 cuda:1)" timeout "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_bench.py --out "$out" --tests-rc "${tests_rc:-PYTEST_EXIT}" --tests-xml "$xml"
[ "$dry" = 1 ] && { echo "[gpu_check] dry run done: would write $out"; exit 0; }
echo "[gpu_check] wrote $out"
