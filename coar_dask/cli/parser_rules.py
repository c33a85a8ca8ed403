"""The rules every ``coar-dask`` subcommand's parser follows, applied in one place.

After the command table (:data:`coar_dask.cli.main.COMMANDS`) has added the
subcommands, :func:`apply_parser_rules` makes them consistent, whoever wrote
them:

- a command that takes a store (a ``--store`` flag) also takes it as its
  first free positional argument: ``coar-dask status S`` is ``coar-dask
  status --store S`` (:func:`resolve_store` merges the two after parsing);
- ``-v``/``--verbose`` works after the subcommand too;
- a command that may run the experiment a store or attributions file records
  (:data:`TRUST_COMMANDS`) takes ``--trust-recorded``, the user's consent to
  import the code that record names (:mod:`coar_dask.core.trust`);
- help and descriptions are plain text: the docstrings' reStructuredText
  (````code````, ``:func:`name```) is rewritten as it reads.
"""

from __future__ import annotations

import argparse
import re
from typing import Iterator

from coar_dask.errors import ConfigError

__all__ = ["apply_parser_rules", "resolve_store", "plain_text", "subcommand_parsers", "TRUST_COMMANDS"]

#: The commands that may run a recorded experiment: they take ``--trust-recorded``.
TRUST_COMMANDS = ("build", "fit", "evaluate", "compare", "edit", "plan")

_POSITIONAL = "_store_positional"
_RULE = "_store_rule"
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|obj|exc|ref):`~?([^`]+)`")


def plain_text(text: str | None) -> str | None:
    """``text`` without reStructuredText markup: ``:func:`~a.b``` -> ``b``, ````x```` -> ``x``."""
    if not text or text is argparse.SUPPRESS:
        return text

    def role(match: re.Match) -> str:
        name = match.group(1)
        whole = match.group(0)
        return name.rsplit(".", 1)[-1] if "`~" in whole else name

    return _ROLE.sub(role, text).replace("``", "`")


def subcommand_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Each subcommand's parser once (aliases share a parser), with its name."""
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield name, sub


def _plain_help(parser: argparse.ArgumentParser) -> None:
    parser.description = plain_text(parser.description)
    parser.epilog = plain_text(parser.epilog)
    for action in parser._actions:
        action.help = plain_text(action.help)
        for choice in getattr(action, "_choices_actions", ()):
            choice.help = plain_text(choice.help)
    for group in parser._action_groups:
        group.description = plain_text(group.description)


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    if "-v" not in parser._option_string_actions:
        # SUPPRESS: without -v here, the value given before the subcommand (or 0) stays
        parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                            help="more logging (-vv for debug); also accepted before the command")


def _trust_flag(name: str, parser: argparse.ArgumentParser) -> None:
    if name in TRUST_COMMANDS and "--trust-recorded" not in parser._option_string_actions:
        parser.add_argument(
            "--trust-recorded", action="store_true",
            help="import and run the code (factories, output) that the store's or attributions' recorded "
                 "experiment names; without it only coar_dask's built-ins run, since a file may come from "
                 "someone else (`coar-dask status STORE` lists what would be imported)")


def _store_both_ways(name: str, parser: argparse.ArgumentParser) -> None:
    option = parser._option_string_actions.get("--store")
    positional = any(not a.option_strings and a.dest == "store" for a in parser._actions)
    if option is None or positional:
        return
    parser.add_argument(_POSITIONAL, nargs="?", default=None, metavar="STORE",
                        help=f"the store directory (the same as {option.option_strings[0]} STORE)")
    parser.set_defaults(**{_RULE: (name, option.dest, bool(option.required))})
    option.required = False


def apply_parser_rules(parser: argparse.ArgumentParser) -> None:
    """Apply the rules above to ``parser`` and each of its subcommands."""
    _plain_help(parser)
    for name, sub in subcommand_parsers(parser):
        _store_both_ways(name, sub)
        _trust_flag(name, sub)
        _verbose_flag(sub)
        _plain_help(sub)


def resolve_store(args: argparse.Namespace) -> argparse.Namespace:
    """Put a positional store where ``--store`` would have put it; refuse two different ones."""
    rule = getattr(args, _RULE, None)
    if rule is None:
        return args
    command, dest, required = rule
    positional, option = getattr(args, _POSITIONAL, None), getattr(args, dest, None)
    if positional and option and positional != option:
        raise ConfigError(f"two different stores given ({positional!r} and --store {option!r}); give one.")
    if positional:
        setattr(args, dest, positional)
    if required and not getattr(args, dest, None):
        raise ConfigError(f"{command} needs a store directory: `coar-dask {command} STORE` "
                          f"(or --store STORE).")
    return args

