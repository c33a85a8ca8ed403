"""``coar-dask import-npy`` and ``coar-dask export-npy``: the seed's ``.npy`` store layout (:mod:`coar_dask.formats.npy`)."""

from __future__ import annotations

import argparse
from typing import Any

from coar_dask.cli.common import echo
from coar_dask.formats.npy import export_npy, import_npy

__all__ = ["add_import_npy_parser", "add_export_npy_parser", "run_import_npy", "run_export_npy"]


def add_import_npy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``import-npy`` (handler: :func:`run_import_npy`)."""
    p = subparsers.add_parser(
        "import-npy",
        help="copy a seed store directory (masks.npy, <name>.npy, _completed.npy) into a zarr store",
        description=import_npy.__doc__.split("\n\n")[0],
    )
    p.add_argument("source", help="seed store directory (the seed's --logging.logdir)")
    p.add_argument("--store", "--cfg.data_dir", dest="store", required=True, help="zarr store to create")
    p.add_argument("--names", nargs="+", default=None, help="arrays to import (default all)")
    p.add_argument("--rows-per-chunk", type=int, default=None,
                   help="rows per block and chunk of the new store (default: auto, <= 100)")
    p.add_argument("--mask-seed", type=int, default=None,
                   help="record the mask seed the seed's masks were drawn with (lets verify regenerate them)")
    p.add_argument("--alpha", type=float, default=None, help="record the masks' alpha")
    p.add_argument("--mark-all-completed", action="store_true",
                   help="mark every row completed (when there is no _completed.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=run_import_npy)
    return p


def run_import_npy(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask import-npy``."""
    store = import_npy(
        args.source, args.store, names=args.names, rows_per_chunk=args.rows_per_chunk,
        mask_seed=args.mask_seed, alpha=args.alpha, mark_all_completed=args.mark_all_completed,
        overwrite=args.overwrite,
    )
    echo(store)
    return 0


def add_export_npy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``export-npy`` (handler: :func:`run_export_npy`)."""
    p = subparsers.add_parser(
        "export-npy",
        help="write a zarr store as a seed store directory of .npy files",
        description=export_npy.__doc__.split("\n\n")[0],
    )
    p.add_argument("--store", "--cfg.data_dir", dest="store", required=True, help="zarr store to read")
    p.add_argument("--out", "--logging.logdir", dest="out", required=True, help="directory to write")
    p.add_argument("--names", nargs="+", default=None, help="arrays to export (default all)")
    p.add_argument("--overwrite", action="store_true", help="replace existing .npy files")
    p.set_defaults(func=run_export_npy)
    return p


def run_export_npy(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask export-npy``."""
    out = export_npy(args.store, args.out, names=args.names, overwrite=args.overwrite)
    echo(f"wrote {sorted(p.name for p in out.glob('*.npy'))} to {out}")
    return 0
