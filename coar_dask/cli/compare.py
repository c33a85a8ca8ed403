"""``coar-dask compare``: COAR, leave-one-out, gradient x parameter, neuron conductance and internal influence
on the same held-out rows."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coar_dask.cli.cluster import add_cluster_arguments, client_for
from coar_dask.cli.common import echo

__all__ = ["add_compare_parser", "cmd_compare"]


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``compare`` (handler: :func:`cmd_compare`)."""
    p = subparsers.add_parser(
        "compare", help="COAR against the baselines (LOO, GP, NC, II) on held-out masks",
        description="Fit COAR on a built store, compute the baselines as Dask tasks (leave-one-out, gradient x "
                    "parameter, and with Captum installed neuron conductance and internal influence), evaluate "
                    "all on each held-out store and print mean and median correlation and the time of each "
                    "method. The leave-one-out rows are kept in a store of their own (--loo-store, default "
                    "STORE-loo, where `coar-dask demo` keeps them too), reused and resumed by later runs.",
    )
    p.add_argument("--store", required=True, help="the built store COAR is fitted on")
    p.add_argument("--eval-store", action="append", required=True, metavar="HELD",
                   help="a held-out store (repeatable: one per alpha for the plot)")
    p.add_argument("--experiment", default=None,
                   help="experiment YAML of the baselines (default: the one the store records)")
    p.add_argument("--loo-store", default=None,
                   help="leave-one-out store directory (default: STORE-loo beside the store, as the demo writes)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of coar,loo,gp,nc,ii (default: all; nc and ii only with Captum "
                        "installed). Attention in-projections have no hook form: use coar,loo for them")
    p.add_argument("--plot", default=None, help="write a PNG: correlation per method and held-out alpha")
    p.add_argument("--json", action="store_true",
                   help='print JSON: {"results": {alpha: {method: {mean, median}}}, "seconds": {method: s}}')
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask compare``."""
    from coar_dask.fit.compare import compare, plot_comparison

    if args.plot:
        from coar_dask.core.output_paths import check_output_path
        from coar_dask.fit.evaluate import plot_path

        check_output_path(plot_path(args.plot), args.overwrite)  # refused before any computing
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    with client_for(args) as client:
        result = compare(args.store, args.eval_store, experiment=args.experiment, client=client,
                         loo_store=args.loo_store, methods=methods)
    if args.plot:
        args.plot = str(plot_comparison(result, args.plot, overwrite=args.overwrite))
    if args.json:
        echo(json.dumps({"results": result.to_dict(), "seconds": result.seconds,
                         **({"plot": str(args.plot)} if args.plot else {})}, indent=2))
        return 0
    echo(result.table())
    echo("time: COAR = its fit on the built store (the build not counted); leave-one-out = its P + 1 ablated "
         "models (0 when reused); gradient x parameter = its backward passes; neuron conductance and internal "
         "influence = their path integrals (steps x component layers forward and backward passes).")
    if args.plot:
        echo(f"plot: {args.plot}")
    return 0
