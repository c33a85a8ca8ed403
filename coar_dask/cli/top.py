"""``coar-dask top``: the components that raise and lower one example's output the most."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from coar_dask.cli.common import echo
from coar_dask.errors import ConfigError
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
    p.add_argument("--example", type=int, help="the example's index in the experiment (not with --by)")
    p.add_argument("--by", choices=("layer", "class"),
                   help="instead of one example: a table by layer (mean |weight| of its components, over the "
                        "examples) or by class (each layer's summed weights averaged over the class's "
                        "examples; needs labels)")
    p.add_argument("--labels", help="with --by class: a .npy of one integer label per example, when the "
                                    "attributions record none (Attributions.with_labels records them)")
    p.add_argument("-k", type=int, default=10, help="components of each sign to list (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: {example, positive: [[component, weight], ...], negative: [...]}")
    p.set_defaults(func=cmd_top)
    return p


def _summary_table(attrs: Attributions, by: str, labels_path: str | None) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of ``top --by layer|class``."""
    if by == "layer":
        table = attrs.by_layer("mean_abs")
        values, rows = _values_and_rows(table)
        n_units = {layer: n for layer, n in _units(attrs)}
        return (["layer", "units", "mean |weight|", "max over examples"],
                [[r, n_units.get(r, "?"), f"{np.nanmean(v):.4g}", f"{np.nanmax(v):.4g}"] for r, v in zip(rows, values)])
    labels = None
    if labels_path is not None:
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--labels {labels_path!r} is not a readable .npy of labels ({exc}).") from None
        attrs = attrs.with_labels(labels)
    table = attrs.by_class(by="layer", reduce="sum")
    values, rows = _values_and_rows(table)
    classes = list(table.columns)
    return ["layer"] + [f"class {c}" for c in classes], [[r, *(f"{x:+.4g}" for x in v)] for r, v in zip(rows, values)]


def _values_and_rows(table: Any) -> tuple[np.ndarray, list[Any]]:
    """``(values, row names)`` of a pandas DataFrame or a :class:`coar_dask.fit.summaries.Table`."""
    if hasattr(table, "to_numpy"):
        return table.to_numpy(), list(table.index)
    return table.values, list(table.rows)


def _units(attrs: Attributions) -> list[tuple[str, int]]:
    summary = attrs.metadata.get("components") or {}
    return [(str(layer.get("module")), layer.get("units")) for layer in summary.get("layers", [])]


def cmd_top(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask top``."""
    attrs = Attributions.load(args.attributions)
    if args.by is not None:
        if args.example is not None:
            raise ConfigError("give either --example N or --by layer|class, not both.")
        header, rows = _summary_table(attrs, args.by, args.labels)
        if args.json:
            echo(json.dumps({"by": args.by, "columns": header, "rows": rows}, indent=2, default=str))
            return 0
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for row in (header, *rows):
            echo("  ".join(f"{str(x):<{w}}" for x, w in zip(row, widths)).rstrip())
        return 0
    if args.example is None:
        raise ConfigError("top needs --example N (one example's components) or --by layer|class (a table).")
    top = attrs.top_components(args.example, args.k)
    if args.json:
        echo(json.dumps({"example": top.example, "positive": top.positive, "negative": top.negative}, indent=2))
    else:
        echo(top.format())
    return 0
