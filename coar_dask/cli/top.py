"""``coar-dask top``: the components that raise and lower one example's output the most."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coar_dask.cli.common import echo
from coar_dask.fit.attributions import Attributions

__all__ = ["add_top_parser", "cmd_top"]


def add_top_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``top`` (handler: :func:`cmd_top`)."""
    p = subparsers.add_parser(
        "top", help="the components with the largest positive and negative attributions for one example",
        description="List the k components whose weights for an example are the most positive (keeping "
                    "them raises its output) and the most negative, by name (layer[unit]) when the "
                    "attributions know the names, else by index.",
    )
    p.add_argument("--attributions", required=True, help="attributions .pt from `coar-dask fit`")
    p.add_argument("--example", type=int, required=True, help="the example's index in the experiment")
    p.add_argument("-k", type=int, default=10, help="components of each sign to list (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: {example, positive: [[component, weight], ...], negative: [...]}")
    p.set_defaults(func=cmd_top)
    return p


def cmd_top(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask top``."""
    attrs = Attributions.load(args.attributions)
    top = attrs.top_components(args.example, args.k)
    if args.json:
        echo(json.dumps({"example": top.example, "positive": top.positive, "negative": top.negative}, indent=2))
    else:
        echo(top.format())
    return 0
