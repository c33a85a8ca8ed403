"""Shared plumbing of the research code's commands (``python -m coar_dask.<name>``).

Each seed command module defines ``_add_arguments(parser)`` and ``run(args)``;
these helpers give it a stand-alone parser, a ``coar-dask`` subcommand and a
``main()`` with the package's error handling (a :class:`CoarError` is one line
on stderr and exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from coar_dask.errors import CoarError

AddArguments = Callable[[argparse.ArgumentParser], None]


def standalone_parser(module: str, description: str, add_arguments: AddArguments,
                      epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``python -m coar_dask.<module>``."""
    p = argparse.ArgumentParser(prog=f"python -m coar_dask.{module}", description=description, epilog=epilog)
    add_arguments(p)
    return p


def register(subparsers: Any, name: str, aliases: Sequence[str], help: str, description: str,
             add_arguments: AddArguments, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add the command to ``coar-dask``'s subparsers, with ``run`` as its handler."""
    p = subparsers.add_parser(name, aliases=list(aliases), help=help, description=description)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None, done: str | None = None) -> int:
    """Parse ``argv``, run, and turn a :class:`CoarError` into exit code 2."""
    args = parser.parse_args(argv)
    try:
        code = run(args)
    except CoarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if done:
        print(done)
    return code
