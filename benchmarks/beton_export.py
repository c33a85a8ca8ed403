"""Store -> .beton export rate against FFCV's raw writer on the same rows held in memory.

In one run, on the same rows (``--rows`` x ``--components`` bool masks and
``--outputs`` float16 margins, ~90% of mask entries True):

(a) ``raw``    FFCV's ``DatasetWriter.from_indexed_dataset`` on a dataset whose
               masks and float32 targets are numpy arrays already in memory:
               the fastest the writer goes, with no reading at all.
(b) ``export`` :func:`coar_dask.formats.beton.export_beton` streaming the same rows
               from a zarr store (block by block, decompressing as it goes).

Both use the same writer processes (``--workers``, default all cores), page
size and fields; each is timed ``--rounds`` times, interleaved, and the best
round kept (the machine may be shared). The figures are rows/s and MB/s of
payload (mask bytes + 4 bytes per target per row), and export/raw as a ratio
(target: >= 0.5x). FFCV's import and the store's creation are not timed.

    python benchmarks/beton_export.py                 # table
    python benchmarks/beton_export.py --json          # one JSON object
    python benchmarks/beton_export.py --rows 5000 --components 82944 --outputs 5000   # ViT-sized rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_ROOT))

# FFCV's writer draws a tqdm bar per file; keep the benchmark's output to its table.
os.environ.setdefault("TQDM_DISABLE", "1")


class InMemoryRows:
    """The raw writer's dataset: rows already decoded, in memory (like the seed's, minus the memmap)."""

    def __init__(self, masks: Any, targets: Any):
        self.masks, self.targets = masks, targets

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        return self.masks[i], self.targets[i], i


def make_store(path: Path, rows: int, p: int, k: int, rows_per_chunk: int | None, seed: int = 0) -> Any:
    import numpy as np

    from coar_dask.core.store import init_store

    store = init_store(path, {"num_models": rows, "schema": {
        "masks": {"dtype": "bool_", "shape": [p]}, "val_margins": {"dtype": "float16", "shape": [k]}}},
        rows_per_chunk=rows_per_chunk)
    rng = np.random.default_rng(seed)
    for b in store.blocks():
        store.write_block(b.index, {"masks": rng.random((len(b), p)) < 0.9,
                                    "val_margins": rng.standard_normal((len(b), k)).astype(np.float16)})
    return store


def time_raw(ffcv: Any, out: Path, masks: Any, targets: Any, workers: int, page_size: int) -> float:
    import numpy as np

    writer = ffcv.DatasetWriter(str(out), {
        "mask": ffcv.NDArrayField(dtype=masks.dtype, shape=(masks.shape[1],)),
        "targets": ffcv.NDArrayField(dtype=np.dtype("float32"), shape=(targets.shape[1],)),
        "idx": ffcv.IntField(),
    }, page_size=page_size, num_workers=workers)
    t0 = time.perf_counter()
    writer.from_indexed_dataset(InMemoryRows(masks, targets), chunksize=100)
    return time.perf_counter() - t0


def time_export(store: Any, out: Path, workers: int, page_size: int) -> float:
    from coar_dask.formats.beton import export_beton

    t0 = time.perf_counter()
    export_beton(store, out, y_name="val_margins", num_workers=workers, page_size=page_size, overwrite=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    import zarr

    from coar_dask import __version__
    from coar_dask.formats.beton import import_ffcv
    from coar_dask.formats.beton.write import _page_size

    ffcv = import_ffcv("The benchmark")
    workers = args.workers or os.cpu_count() or 1
    n, p, k = args.rows, args.components, args.outputs
    payload = n * (p + 4 * k)
    page = args.page_size or _page_size(p + 4 * k, n, workers)
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        store = make_store(tmp / "store", n, p, k, args.rows_per_chunk)
        setup_s = time.perf_counter() - t0
        masks = store.array("masks")[:]
        targets = store.array("val_margins")[:].astype(np.float32)
        raw_s, export_s = [], []
        for _ in range(args.rounds):
            raw_s.append(time_raw(ffcv, tmp / "raw.beton", masks, targets, workers, page))
            export_s.append(time_export(store, tmp / "export.beton", workers, page))
        same = (tmp / "raw.beton").stat().st_size == (tmp / "export.beton").stat().st_size
    raw, export = min(raw_s), min(export_s)
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {"coar_dask": __version__, "numpy": np.__version__, "torch": torch.__version__,
                     "zarr": zarr.__version__, "ffcv": "1.0.2 (reports %s)" % getattr(sys.modules.get("ffcv"), "__version__", "?")},
        "sizes": {"rows": n, "components": p, "outputs": k, "rows_per_chunk": store.rows_per_chunk,
                  "payload_mb": payload / 1e6, "workers": workers, "page_size": page, "rounds": args.rounds,
                  "store_setup_s": round(setup_s, 2)},
        "raw_s": raw_s,
        "export_s": export_s,
        "raw_rows_per_s": n / raw,
        "raw_mb_per_s": payload / 1e6 / raw,
        "export_rows_per_s": n / export,
        "export_mb_per_s": payload / 1e6 / export,
        "export_over_raw": raw / export,
        "same_file_size": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--components", type=int, default=2_304, help="mask width P (CIFAR ResNet: 2,304)")
    parser.add_argument("--outputs", type=int, default=1_000, help="targets per row K")
    parser.add_argument("--rows-per-chunk", type=int, default=None, help="store chunking (default: the store's)")
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    parser.add_argument("--page-size", type=int, default=None, help="FFCV page size (default: export_beton's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tmpdir", default=None, help="where to write the store and files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    s = r["sizes"]
    print(f"machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, Python {r['machine']['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    print(f"rows: {s['rows']} x ({s['components']} bool mask + {s['outputs']} float16 outputs -> float32), "
          f"{s['payload_mb']:.0f} MB payload; {s['workers']} writer processes, page {s['page_size'] >> 20} MiB, "
          f"store blocks of {s['rows_per_chunk']} rows; best of {s['rounds']}")
    print(f"{'writer':<38} {'rows/s':>10} {'MB/s':>8} {'seconds':>8}")
    print(f"{'(a) FFCV raw writer, rows in memory':<38} {r['raw_rows_per_s']:>10.0f} {r['raw_mb_per_s']:>8.1f} "
          f"{min(r['raw_s']):>8.2f}")
    print(f"{'(b) export_beton from the zarr store':<38} {r['export_rows_per_s']:>10.0f} "
          f"{r['export_mb_per_s']:>8.1f} {min(r['export_s']):>8.2f}")
    print(f"export / raw: {r['export_over_raw']:.2f}x (target >= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
