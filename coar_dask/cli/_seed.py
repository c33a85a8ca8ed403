"""Shared plumbing of the research code's commands (``python -m coar_dask.<name>``).

Each seed command module defines ``_add_arguments(parser)`` and ``run(args)``;
these helpers give it a stand-alone parser, a ``coar-dask`` subcommand and a
``main()`` with the package's one error handler
(:func:`coar_dask.cli.common.run_command`: a :class:`CoarError` is one line on
stderr and exit code 2, Ctrl-C exit code 130).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from coar_dask.cli.common import echo, run_command

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
    """Parse ``argv`` and run; a :class:`CoarError` is exit code 2, Ctrl-C 130. Prints ``done`` after a success."""
    args = parser.parse_args(argv)
    code = run_command(run, args, parser.prog)
    if done and code == 0:
        echo(done)
    return code
