"""``coar-dask components``: the layers, units and total of a preset or an experiment's model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from coar_dask.zoo import presets

__all__ = ["add_components_parser", "components_main"]


def add_components_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coar-dask components`` to an ``argparse`` subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "components", help="list the components (layers, units, total) of a preset or an experiment",
        description="Print the selected layers, the units of each and the total number of components, "
                    "for one of the paper's presets (built on the meta device: no weights, no download) "
                    "or an experiment YAML (its model and examples factories are called, on the CPU; the "
                    "number of examples is printed too).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (see --list)")
    src.add_argument("--experiment", help="experiment YAML whose model and component selection to list")
    src.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true",
                   help="print JSON: {layers: [...], total: N} (and examples: K with --experiment)")
    p.set_defaults(func=components_main)
    return p


def components_main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Handler of ``coar-dask components``: write the listing to ``out`` (default stdout)."""
    out = out or sys.stdout
    if getattr(args, "list", False):
        info = {name: p.description for name, p in presets.PRESETS.items()}
        aliases = ", ".join(f"{old} = {new}" for old, new in presets.ALIASES.items())
        out.write((json.dumps(info, indent=2) if args.json else
                   "\n".join([*(f"{n:<18} {d}" for n, d in info.items()), f"(earlier names: {aliases})"])) + "\n")
        return 0
    examples: dict[str, int] = {}
    if args.preset:
        comps = presets.preset_components(args.preset)
        source = {"preset": args.preset}
    else:
        comps, n_examples = presets.experiment_counts(args.experiment)
        source, examples = {"experiment": str(args.experiment)}, {"examples": n_examples}
    if args.json:
        out.write(json.dumps({**source, **comps.summary(), **examples}, indent=2) + "\n")
    else:
        out.write(comps.table() + "\n")
        if examples:
            out.write(f"examples: {examples['examples']:,} (outputs per row)\n")
    return 0
