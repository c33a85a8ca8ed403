"""Initialization of the seed's largest spec: lazy zarr store vs the seed's .npy memmaps.

The seed creates one ``np.lib.format.open_memmap`` per array; this package
creates a zarr v3 group whose chunks are written only by the build. Prints
seconds and bytes on disk for each, and their ratios.

    python benchmarks/init_store.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

from coar_dask import __version__, init_store

VIT_SPEC = {
    "num_models": 200_000,
    "schema": {"masks": {"dtype": "bool_", "shape": [82944]}, "val_margins": {"dtype": "float16", "shape": [5000]}},
}


def disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def seed_way(path: str) -> None:
    os.makedirs(path)
    n = VIT_SPEC["num_models"]
    for name, a in VIT_SPEC["schema"].items():
        np.lib.format.open_memmap(os.path.join(path, f"{name}.npy"), mode="w+",
                                  dtype=getattr(np, a["dtype"]), shape=(n, *a["shape"])).flush()
    np.lib.format.open_memmap(os.path.join(path, "_completed.npy"), mode="w+", dtype=bool, shape=(n,)).flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        t = time.perf_counter()
        init_store(os.path.join(tmp, "zarr"), VIT_SPEC)
        zarr_s = time.perf_counter() - t
        t = time.perf_counter()
        seed_way(os.path.join(tmp, "npy"))
        npy_s = time.perf_counter() - t
        res = {
            "zarr_seconds": zarr_s, "zarr_disk_bytes": disk_bytes(os.path.join(tmp, "zarr")),
            "npy_seconds": npy_s, "npy_disk_bytes": disk_bytes(os.path.join(tmp, "npy")),
            "npy_apparent_bytes": sum(os.path.getsize(os.path.join(tmp, "npy", f)) for f in os.listdir(os.path.join(tmp, "npy"))),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["seconds_ratio_npy_over_zarr"] = res["npy_seconds"] / res["zarr_seconds"]
    if args.json:
        print(json.dumps(res))
        return
    print(f"coar_dask {__version__}, numpy {np.__version__}, {platform.machine()}, {os.cpu_count()} cores")
    print("spec: 200,000 rows x 82,944 bool masks + 5,000 float16 margins (the seed's ImageNet ViT)")
    print(f"zarr store (this package): {res['zarr_seconds']:.3f} s, {res['zarr_disk_bytes'] / 1e3:.0f} kB on disk")
    print(f"seed .npy memmaps:         {res['npy_seconds']:.3f} s, {res['npy_disk_bytes'] / 1e3:.0f} kB on disk "
          f"(sparse; apparent size {res['npy_apparent_bytes'] / 1e9:.1f} GB)")
    print(f"time ratio npy / zarr: {res['seconds_ratio_npy_over_zarr']:.2f}")


if __name__ == "__main__":
    main()
