#!/usr/bin/env bash
# The wheels a lent GPU machine needs for benchmarks/gpu_check.sh (issue 23), downloaded HERE (where
# PyPI is reachable) for THAT machine's Python: everything coar_dask needs beyond torch, <= 64 MiB.
#
#   bash benchmarks/gpu_wheels.sh DIR                 # build coar_dask's wheel, resolve, download into DIR
#   bash benchmarks/gpu_wheels.sh DIR --list          # resolve only: print the set it would download
#   bash benchmarks/gpu_wheels.sh DIR --list --from-report REPORT.json   # no network: filter a pip report
#
# 1. `pip wheel --no-deps` builds coar_dask from this tree into DIR.
# 2. `pip install --dry-run --ignore-installed --report` resolves its requirements for the GPU machine
#    (--python-version, default 3.12; manylinux x86_64 platforms; binary wheels only).
# 3. Dropped: torch, nvidia-*, triton, cuda-* (the machine's CUDA stack, never replaced) and what the
#    lent image already holds (IMAGE_HAS below, from /work/.library/device/KINDS.md; --all keeps them).
# 4. Each remaining name==version: `pip download --no-deps --only-binary=:all:` for those platforms;
#    a pure-Python sdist is built to a wheel here instead (`pip wheel --no-deps`).
# 5. The total size is printed; over 64 MiB (the device tool's carry limit) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
pyver="3.12" list=0 report="" keep_all=0 dir=""
LIMIT_BYTES=$((64 * 1024 * 1024))
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
# On the lent image's python3 already (KINDS.md, 2026-11-17): not downloaded unless --all.
IMAGE_HAS="numpy scipy scikit-learn joblib threadpoolctl matplotlib contourpy cycler fonttools kiwisolver pillow
pyparsing python-dateutil six packaging pyyaml tqdm cloudpickle fsspec toolz msgpack psutil sortedcontainers
click jinja2 markupsafe urllib3 typing-extensions pandas zipp pytest pluggy iniconfig filelock networkx sympy mpmath
setuptools pygments"

usage() { echo "usage: $0 DIR [--list] [--from-report FILE] [--python-version X.Y] [--all]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --list) list=1; shift ;;
        --from-report) report="${2:?--from-report needs a file}"; shift 2 ;;
        --python-version) pyver="${2:?}"; shift 2 ;;
        --all) keep_all=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "gpu_wheels.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$dir" ] || usage; dir="$1"; shift ;;
    esac
done
[ -n "$dir" ] || usage
work="$(mktemp -d "${TMPDIR:-/tmp}/coar-gpu-wheels.XXXXXX")"
trap 'rm -rf "$work"' EXIT
plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
target=(--python-version "$pyver" --implementation cp "${plat[@]}" --only-binary=:all:)

if [ -z "$report" ]; then
    mkdir -p "$dir"
    "$PY" -m pip wheel -q --no-deps -w "$dir" . >"$work/wheel.log" 2>&1 || { cat "$work/wheel.log" >&2; exit 1; }
    own="$(ls -t "$dir"/coar_dask-*.whl | head -1)"
    echo "[gpu_wheels] built $own"
    report="$work/report.json"
    "$PY" -m pip install -q --dry-run --ignore-installed --target "$work/t" "${target[@]}" --report "$report" "$own" \
        >"$work/resolve.log" 2>&1 || { cat "$work/resolve.log" >&2; echo "gpu_wheels: resolving failed" >&2; exit 1; }
fi

# name==version per line of what to fetch; the dropped ones on stderr
"$PY" - "$report" "$keep_all" "$IMAGE_HAS" >"$work/wanted" <<'PY'
import json, re, sys
report, keep_all, image = json.load(open(sys.argv[1])), sys.argv[2] == "1", set(sys.argv[3].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
cuda = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
for item in report["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    if name == "coar-dask":
        continue  # built from the tree
    if cuda.match(name):
        print(f"[gpu_wheels] skip {name}=={version}: the GPU machine's own CUDA stack", file=sys.stderr)
    elif name in image and not keep_all:
        print(f"[gpu_wheels] skip {name}=={version}: on the lent image already", file=sys.stderr)
    else:
        print(f"{name}=={version}")
PY
echo "[gpu_wheels] for Python $pyver: $(tr '\n' ' ' <"$work/wanted")"
if [ "$list" = 1 ]; then cat "$work/wanted"; exit 0; fi

while read -r req; do
    if ! "$PY" -m pip download -q --no-deps "${target[@]}" -d "$dir" "$req" >"$work/dl.log" 2>&1; then
        echo "[gpu_wheels] $req: no binary wheel; building one from its sdist"
        "$PY" -m pip wheel -q --no-deps -w "$dir" "$req" >"$work/dl.log" 2>&1 || { cat "$work/dl.log" >&2; exit 1; }
    fi
done <"$work/wanted"
total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "[gpu_wheels] $(ls "$dir"/*.whl | wc -l) wheels in $dir: $total bytes ($((total / 1024 / 1024)) MiB; limit 64 MiB)"
[ "$total" -le "$LIMIT_BYTES" ] || { echo "gpu_wheels: $dir holds $total bytes, over 64 MiB: drop a wheel the image has" >&2; exit 1; }
