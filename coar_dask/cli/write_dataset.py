"""``python -m coar_dask.write_dataset``: a store -> FFCV ``.beton``, the seed's flags.

Same flags as the research code's ``write_dataset.py``::

    python -m coar_dask.write_dataset --cfg.data_dir $STORE_DIR \\
        --cfg.out_path $STORE_DIR/component_datasets.beton \\
        --cfg.x_name masks --cfg.y_name val_margins --cfg.ignore_completed

``--cfg.data_dir`` is a zarr store, or a seed store directory of ``.npy``
files. The ``.beton`` has the seed's fields (``mask``, ``targets`` as
float32, ``idx``) and is written block by block (see
:func:`coar_dask.formats.beton.export_beton`). Without ``--cfg.ignore_completed``
only completed rows are written; unlike the seed they are not rounded down
to a multiple of 2,000. ``--cfg.y_slice K`` keeps output column ``K`` only.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from coar_dask.cli._seed import register, run_main, standalone_parser
from coar_dask.errors import ConfigError
from coar_dask.compat.seed import read_config_files

__all__ = ["build_parser", "add_export_beton_parser", "run", "main"]

_KEYS = ("data_dir", "out_path", "x_name", "y_name", "y_slice", "completed_name", "ignore_completed")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", "--config-file", action="append", default=[], dest="config_files",
                   help="YAML/JSON file with a 'cfg:' section (fastargs style; repeatable)")
    p.add_argument("--cfg.data_dir", "--store", dest="data_dir", default=None,
                   help="zarr store, or seed store directory of .npy files")
    p.add_argument("--cfg.out_path", "--out", dest="out_path", default=None, help=".beton file to write")
    p.add_argument("--cfg.x_name", "--x-name", dest="x_name", default=None,
                   help="mask array (default: masks)")
    p.add_argument("--cfg.y_name", "--y-name", dest="y_name", default=None,
                   help="output array (required for a seed directory; inferred for a two-array store)")
    p.add_argument("--cfg.y_slice", "--y-slice", dest="y_slice", type=int, default=None,
                   help="keep only this output column (-1, the default: all)")
    p.add_argument("--cfg.completed_name", "--completed-name", dest="completed_name", default=None,
                   help="completion array of a seed directory (default: _completed)")
    p.add_argument("--cfg.ignore_completed", "--ignore-completed", dest="ignore_completed",
                   action="store_true", default=None, help="write every row, completed or not")
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--page-size", type=int, default=None, help="FFCV page size in bytes (power of two >= 2 MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .beton at the output path")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m coar_dask.write_dataset``."""
    return standalone_parser("write_dataset", "Write a store's rows to an FFCV .beton (the seed's write_dataset.py).", _add_arguments)


def add_export_beton_parser(subparsers: Any, name: str = "export-beton",
                            aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Register ``export-beton`` on a ``coar-dask`` subparsers object (handler: :func:`run`)."""
    return register(subparsers, name, aliases, "write a store's rows to an FFCV .beton (seed flags --cfg.data_dir/--cfg.out_path/... accepted)",
                    "Write a store's rows to an FFCV .beton with the seed's fields mask/targets/idx.", _add_arguments, run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    files = read_config_files(args.config_files)
    out = {k: files.get(f"cfg.{k}") for k in _KEYS}
    out.update({k: getattr(args, k) for k in _KEYS if getattr(args, k) is not None})
    if not out["data_dir"] or not out["out_path"]:
        raise ConfigError(
            "missing --cfg.data_dir and/or --cfg.out_path; e.g. --cfg.data_dir STORE_DIR "
            "--cfg.out_path STORE_DIR/component_datasets.beton --cfg.y_name val_margins"
        )
    return out


def run(args: argparse.Namespace) -> int:
    """Write the .beton; print what was written."""
    from coar_dask.formats.beton import export_beton

    s = _settings(args)
    y_slice = s["y_slice"]
    t0 = time.perf_counter()
    info = export_beton(
        s["data_dir"],
        s["out_path"],
        x_name=s["x_name"] or "masks",
        y_name=s["y_name"],
        ignore_completed=bool(s["ignore_completed"]),
        y_slice=None if y_slice in (None, -1) else int(y_slice),
        completed_name=s["completed_name"] or "_completed",
        num_workers=args.num_workers,
        page_size=args.page_size,
        overwrite=args.overwrite,
    )
    dt = time.perf_counter() - t0
    print(
        f"wrote {info.n_rows} rows ({info.n_features} {info.x_dtype} mask entries, {info.n_targets} "
        f"float32 targets) to {info.path}: {info.nbytes / 2**20:.1f} MiB in {dt:.1f} s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coar_dask.write_dataset``."""
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
