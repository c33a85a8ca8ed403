"""``python -m coar_dask.initialize_store``: the seed's store initialization, on zarr.

Same flags as the research code's ``initialize_store.py``::

    python -m coar_dask.initialize_store --logging.logdir $STORE_DIR --logging.spec spec.json

It creates a zarr store (lazily: no chunk is written) for the seed's JSON
spec at ``--logging.logdir``. Run again with the same spec, it opens the
existing store and changes nothing (the seed skipped an existing directory);
with another spec it stops with an error instead of mixing two experiments.
``--rows-per-chunk``, ``--mask-seed`` and ``--alpha`` are additions.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from coar_dask.cli._seed import register, run_main, standalone_parser
from coar_dask.errors import ConfigError
from coar_dask.compat.seed import read_config_files

__all__ = ["build_parser", "add_initialize_store_parser", "run", "main"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", "--config-file", action="append", default=[], dest="config_files",
                   help="YAML/JSON file with a 'logging:' section (fastargs style; repeatable)")
    p.add_argument("--logging.logdir", "--store", dest="logdir", default=None,
                   help="store directory to create (the seed's store directory)")
    p.add_argument("--logging.spec", "--spec", dest="spec", default=None,
                   help="the seed's JSON spec file")
    p.add_argument("--rows-per-chunk", type=int, default=None,
                   help="rows per block and chunk (default: at most 100, chunks under 64 MiB)")
    p.add_argument("--mask-seed", type=int, default=None, help="record the mask seed in the store")
    p.add_argument("--alpha", type=float, default=None,
                   help="record the ablation fraction in the store")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m coar_dask.initialize_store``."""
    return standalone_parser("initialize_store", "Initialize a zarr store from the seed's JSON spec (the seed's initialize_store.py).", _add_arguments)


def add_initialize_store_parser(subparsers: Any, name: str = "initialize-store",
                                aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Register ``initialize-store`` on a ``coar-dask`` subparsers object (handler: :func:`run`)."""
    return register(subparsers, name, aliases, "the seed's initialize_store command (--logging.logdir, --logging.spec)",
                    "Initialize a zarr store from the seed's JSON spec.", _add_arguments, run)


def run(args: argparse.Namespace) -> int:
    """Create (or reopen) the store; print it."""
    from coar_dask.core.store import init_store

    files = read_config_files(args.config_files)
    logdir = args.logdir or files.get("logging.logdir")
    spec = args.spec or files.get("logging.spec")
    missing = [flag for flag, value in (("--logging.logdir", logdir), ("--logging.spec", spec)) if not value]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)}; e.g. --logging.logdir STORE_DIR --logging.spec spec.json")
    store = init_store(
        logdir, spec, rows_per_chunk=args.rows_per_chunk, mask_seed=args.mask_seed, alpha=args.alpha
    )
    print(store)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coar_dask.initialize_store``."""
    return run_main(build_parser(), run, argv, done="Done!")


if __name__ == "__main__":
    sys.exit(main())
