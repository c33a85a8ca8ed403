"""``coar-dask verify`` and ``coar-dask repair``: the store checks of :mod:`coar_dask.core.verify`.

Exit codes: 0 when all is well, 1 when the store has bad or (for verify)
pending blocks, 2 for a user error (e.g. the path is not a store).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from coar_dask.cli.common import echo, progress_bar
from coar_dask.core.verify import repair_store, verify_store
from coar_dask.errors import ConfigError

__all__ = ["add_verify_parser", "cmd_verify", "cmd_repair"]


def _store_arg(args: argparse.Namespace) -> str:
    store = args.store or args.store_option
    if args.store and args.store_option and args.store != args.store_option:
        raise ConfigError(f"two different stores given ({args.store!r} and --store {args.store_option!r}); give one.")
    if not store:
        raise ConfigError(f"{args.command} needs a store directory, e.g. `coar-dask {args.command} demo-out/store`.")
    return store


def cmd_verify(args: argparse.Namespace) -> int:
    """``coar-dask verify``: exit 0 only when the store is intact (and complete,
    unless ``--allow-incomplete``); 1 otherwise."""
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:  # the number of blocks is known once the store is open
            bars.append(progress_bar(total, "verify"))
        bars[0].update(done - bars[0].n)

    try:
        report = verify_store(_store_arg(args), progress=update)
    finally:
        for bar in bars:
            bar.close()
    echo(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    good = report.intact and (report.complete or args.allow_incomplete)
    return 0 if good else 1


def cmd_repair(args: argparse.Namespace) -> int:
    """``coar-dask repair``: reset bad blocks to pending; exit 1 when store-level
    problems remain that a rebuild cannot fix."""
    result = repair_store(_store_arg(args), dry_run=args.dry_run)
    echo(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0 if result.ok else 1


def _store_command(subparsers: Any, name: str, help: str, description: str, json_help: str,
                   func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A subcommand that takes a store (positional or ``--store``) and ``--json``."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("store", nargs="?", help="store directory")
    p.add_argument("--store", dest="store_option", metavar="STORE", help="store directory (same as the positional)")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=func)
    return p


def add_verify_parser(subparsers: Any) -> None:
    """Add the ``verify`` and ``repair`` commands to ``coar-dask``'s subparsers."""
    p = _store_command(
        subparsers, "verify",
        help="check a store: masks regenerated from (seed, row), finite outputs, layout, damaged chunks",
        description="Read every completed block: regenerate its masks from (mask seed, row) and compare them "
                    "bitwise, check that its outputs are finite, that its chunk files are files that decode and "
                    "match the digest its build recorded (chunks swapped, copied from another store or linked "
                    "are found; stores written before digests say so), check the spec "
                    "fingerprint and chunk layout, and list incomplete blocks. Exit code 0 only when the store "
                    "is intact and complete; 1 otherwise (run `coar-dask repair` for bad blocks).",
        json_help="print the report as JSON", func=cmd_verify,
    )
    p.add_argument("--allow-incomplete", action="store_true",
                   help="exit 0 for an intact store that still has pending blocks (e.g. during a build)")

    p = _store_command(
        subparsers, "repair",
        help="mark the blocks verify finds bad as pending, so the next build recomputes them",
        description="Verify the store, delete the undecodable chunk files of bad blocks, clear their "
                    "_completed flags and remove leftover temporary files; other blocks are not touched. Then "
                    "run `coar-dask build` with the store's experiment to recompute them. Do not run it while "
                    "a build writes to the store.",
        json_help="print what was done as JSON", func=cmd_repair,
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be reset and removed")
