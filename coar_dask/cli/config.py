"""``coar-dask config``: the packaged settings files, printed or written where a user can edit them.

::

    coar-dask config                          # print coar_dask's commented defaults (dask config)
    coar-dask config --write [PATH]           # write them to ~/.config/dask/coar_dask.yaml (or PATH)
    coar-dask config slurm --example          # print a commented SLURM settings file (--slurm-config)

Importing the package writes nothing; this command is the only writer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coar_dask.cli.common import echo
from coar_dask.config import DEFAULTS_FILE, SLURM_EXAMPLE_FILE, user_config_path, write_user_config
from coar_dask.errors import ConfigError

__all__ = ["add_config_parser", "cmd_config"]


def _defaults(args: argparse.Namespace) -> int:
    if args.example:
        raise ConfigError("--example is for `coar-dask config slurm --example`; `coar-dask config` alone prints "
                          "coar_dask's defaults.")
    if args.write is None:
        echo(DEFAULTS_FILE.read_text().rstrip("\n"))
        return 0
    target = Path(args.write) if args.write else user_config_path()
    existed = target.exists()
    path = write_user_config(target, overwrite=args.force)
    if existed and not args.force:
        echo(f"{path} already exists; kept it (--force overwrites it with the defaults).")
    else:
        echo(f"wrote coar_dask's commented defaults to {path}; dask reads it at start (edit it there).")
    return 0


def _slurm(args: argparse.Namespace) -> int:
    if args.write is not None:
        raise ConfigError("--write is for coar_dask's defaults; for SLURM settings run "
                          "`coar-dask config slurm --example > slurm.yaml` and pass --slurm-config slurm.yaml.")
    if not args.example:
        raise ConfigError("`coar-dask config slurm` needs --example: it prints a commented SLURM settings file, "
                          "e.g. `coar-dask config slurm --example > slurm.yaml`.")
    echo(SLURM_EXAMPLE_FILE.read_text().rstrip("\n"))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask config``."""
    return _slurm(args) if args.topic == "slurm" else _defaults(args)


def add_config_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coar-dask config`` to ``coar-dask``'s subparsers."""
    p = subparsers.add_parser(
        "config", help="print or write the commented settings files (defaults; a SLURM example)",
        description="Without arguments, print coar_dask's commented defaults (dask config keys "
                    "coar-dask.*). --write puts them in dask's user config folder to edit. "
                    "`config slurm --example` prints a commented settings file for --slurm-config.")
    p.add_argument("topic", nargs="?", choices=("defaults", "slurm"), default="defaults",
                   help="defaults (coar_dask's dask config, the default) or slurm (a --slurm-config file)")
    p.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                   help=f"write the defaults to PATH (default {user_config_path()})")
    p.add_argument("--force", action="store_true", help="with --write: replace an existing file")
    p.add_argument("--example", action="store_true", help="with slurm: print the commented example")
    p.set_defaults(func=cmd_config)
    return p
