#!/usr/bin/env python
"""Bytes on disk per row of the masks, and their write/read speed: the seed's .npy vs two codecs.

The same masks (``coar_dask.core.masks.sample_masks`` at ``--alpha``, True =
kept) are written, in one run, three ways:

- ``npy``: the seed's layout, a bool ``.npy`` memmap (one byte per component);
- ``previous``: the zarr chain stores used before issue 16 (zstd level 0 with
  its frame checksum, on the bool bytes);
- ``new``: what :func:`coar_dask.core.store.init_store` gives bool arrays now
  (blosc bit-shuffle + zstd, then a crc32c checksum).

Both zarr arrays are chunked as a store chunks them
(``default_rows_per_chunk``). Write and read are timed ``--repeat`` times,
alternating the ways, best run kept; wall-clock and CPU time are both
printed (CPU time is the steadier figure on a shared machine). Reads are whole
arrays, decoded into memory, as a fit reads them. The acceptance: at alpha
0.05 and P = 2,304, ``masks_ratio_vs_npy >= 20`` and the new codec reads no
more than 10 % slower than the previous one (``read_ratio_new_vs_previous <= 1.10``).

Usage::

    python benchmarks/store_size.py            # P = 2,304 (4,000 rows) and 82,944 (400 rows)
    python benchmarks/store_size.py --json
    python benchmarks/store_size.py --quick    # fewer rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _files_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` but zarr's metadata (``zarr.json``)."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f != "zarr.json")


def _ways(rpc: int) -> dict[str, tuple[Callable[[Path, np.ndarray], None], Callable[[Path], np.ndarray]]]:
    import zarr

    from coar_dask.core.store import _compressors

    def zarr_way(compressors: Callable[[], list[Any]]):
        def write(path: Path, masks: np.ndarray) -> None:
            arr = zarr.create_array(store=str(path), shape=masks.shape, chunks=(rpc, masks.shape[1]), dtype=bool,
                                    fill_value=False, compressors=compressors(), zarr_format=3)
            for start in range(0, len(masks), rpc):  # block by block, as a build writes
                arr[start:start + rpc] = masks[start:start + rpc]

        def read(path: Path) -> np.ndarray:
            return zarr.open_array(str(path), mode="r")[:]

        return write, read

    def npy_write(path: Path, masks: np.ndarray) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=bool, shape=masks.shape)
        for start in range(0, len(masks), rpc):
            out[start:start + rpc] = masks[start:start + rpc]
        out.flush()
        del out

    def npy_read(path: Path) -> np.ndarray:
        return np.array(np.load(path, mmap_mode="r"))

    return {
        "npy": (npy_write, npy_read),
        "previous": zarr_way(lambda: [zarr.codecs.ZstdCodec(level=0, checksum=True)]),
        "new": zarr_way(lambda: _compressors(np.dtype(bool))),
    }


def bench_p(work: Path, p: int, rows: int, alpha: float, repeat: int) -> dict[str, Any]:
    from coar_dask.core.masks import sample_masks
    from coar_dask.core.spec import Spec
    from coar_dask.core.store import default_rows_per_chunk

    rpc = default_rows_per_chunk(Spec.for_experiment(rows, p, 1000))
    masks = sample_masks(0, range(rows), p, alpha)
    ways = _ways(rpc)
    best: dict[str, dict[str, float]] = {w: {} for w in ways}
    for _ in range(repeat):
        for name, (write, read) in ways.items():
            path = work / f"{name}-{p}{'.npy' if name == 'npy' else ''}"
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            w = _timed(lambda: write(path, masks))
            back: list[np.ndarray] = []
            r = _timed(lambda: back.append(read(path)))
            if not np.array_equal(back[0], masks):
                raise SystemExit(f"{name} did not read back the masks it wrote")
            b = best[name]
            for key, value in (("write_s", w[0]), ("write_cpu_s", w[1]), ("read_s", r[0]), ("read_cpu_s", r[1])):
                b[key] = min(b.get(key, float("inf")), value)
            b["bytes_per_row"] = _files_bytes(path) / rows
    for b in best.values():
        b["write_rows_per_s"] = rows / b["write_s"]
        b["read_rows_per_s"] = rows / b["read_s"]
    npy, prev, new = best["npy"]["bytes_per_row"], best["previous"]["bytes_per_row"], best["new"]["bytes_per_row"]
    return {
        "P": p, "rows": rows, "rows_per_chunk": rpc, "alpha": alpha, "ways": best,
        "masks_ratio_vs_npy": npy / new,
        "previous_ratio_vs_npy": npy / prev,
        "read_ratio_new_vs_previous": best["new"]["read_s"] / best["previous"]["read_s"],
        "read_cpu_ratio_new_vs_previous": best["new"]["read_cpu_s"] / max(best["previous"]["read_cpu_s"], 1e-9),
        "write_ratio_new_vs_previous": best["new"]["write_s"] / best["previous"]["write_s"],
        "write_cpu_ratio_new_vs_previous": best["new"]["write_cpu_s"] / max(best["previous"]["write_cpu_s"], 1e-9),
    }


def machine() -> dict[str, Any]:
    import numcodecs
    import zarr

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,000 and 100 rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = [(2304, 1000), (82944, 100)] if args.quick else [(2304, 4000), (82944, 400)]
    with tempfile.TemporaryDirectory(prefix="coar-store-size-") as tmp:
        results = [bench_p(Path(tmp), p, rows, args.alpha, args.repeat) for p, rows in sizes]
    first = results[0]
    out = {"machine": machine(), "masks_ratio_vs_npy": first["masks_ratio_vs_npy"],
           "read_ratio_new_vs_previous": first["read_ratio_new_vs_previous"], "by_P": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"machine: {out['machine']}")
    for r in results:
        print(f"\nP = {r['P']:,}, {r['rows']:,} rows at alpha {r['alpha']} ({r['rows_per_chunk']}-row chunks)")
        print(f"{'way':10} {'bytes/row':>10} {'x vs npy':>9} {'write rows/s':>13} {'write cpu s':>12} "
              f"{'read rows/s':>12} {'read cpu s':>11}")
        npy = r["ways"]["npy"]["bytes_per_row"]
        for name, b in r["ways"].items():
            print(f"{name:10} {b['bytes_per_row']:10.1f} {npy / b['bytes_per_row']:9.1f} "
                  f"{b['write_rows_per_s']:13,.0f} {b['write_cpu_s']:12.3f} {b['read_rows_per_s']:12,.0f} "
                  f"{b['read_cpu_s']:11.3f}")
        print(f"masks_ratio_vs_npy {r['masks_ratio_vs_npy']:.1f} (previous {r['previous_ratio_vs_npy']:.1f}); "
              f"new/previous: read {r['read_ratio_new_vs_previous']:.2f} wall, "
              f"{r['read_cpu_ratio_new_vs_previous']:.2f} cpu; write {r['write_ratio_new_vs_previous']:.2f} wall, "
              f"{r['write_cpu_ratio_new_vs_previous']:.2f} cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
