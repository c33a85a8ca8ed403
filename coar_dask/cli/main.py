"""The ``coar-dask`` command line.

Stages: ``init`` -> ``build`` -> ``status`` -> ``fit`` -> ``evaluate``, and
``demo`` to run them all on the built-in digits example. User errors print
one line and exit with code 2; an interrupted build exits with 130 and
resumes where it stopped when run again (:func:`coar_dask.cli.common.run_command`).

The stage commands are here; each other command group has its own module in
this package, and :data:`COMMANDS` lists them all in ``--help`` order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from coar_dask._version import __version__
from coar_dask.cli.cluster import add_cluster_arguments, add_cluster_parser, client_for
from coar_dask.cli.common import build_with_progress, echo, run_command, setup_logging
from coar_dask.cli.compare import add_compare_parser
from coar_dask.cli.components import add_components_parser
from coar_dask.cli.config import add_config_parser
from coar_dask.cli.demo import add_demo_parser
from coar_dask.cli.edit import add_edit_parser
from coar_dask.cli.initialize_store import add_initialize_store_parser
from coar_dask.cli.npy import add_export_npy_parser, add_import_npy_parser
from coar_dask.cli.parser_rules import apply_parser_rules, resolve_store
from coar_dask.cli.plan import add_plan_parser
from coar_dask.cli.recorded import (command_context, describe_experiment, describe_imports, experiment_for_store,
                                    recorded_experiment)
from coar_dask.cli.run_regression import add_run_regression_parser
from coar_dask.cli.solver_flags import add_fit_solver_arguments, add_row_arguments, solver_options_from_args
from coar_dask.cli.top import add_top_parser
from coar_dask.cli.verify import add_verify_parser
from coar_dask.cli.write_dataset import add_export_beton_parser
from coar_dask.compat.seed import choose_solver
from coar_dask.core.output_paths import check_output_path
from coar_dask.errors import ConfigError
from coar_dask.solvers.registry import REGISTRY
from coar_dask.solvers.metrics import correlation_summary

__all__ = ["main", "build_parser", "COMMANDS"]

#: What Ctrl-C prints: an interrupted build keeps its completed blocks.
INTERRUPTED = "interrupted; completed blocks are kept — run the same command again to resume."


def _parse_slice(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise ConfigError(f"--target-slice must look like START:STOP (e.g. 0:1000); got {text!r}.") from None


# -- commands ---------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from coar_dask.core.store import init_store, _is_store_dir
    from coar_dask.runtime.build import init_experiment_store

    existed = _is_store_dir(Path(args.store))
    if args.spec:
        store = init_store(args.store, args.spec, rows_per_chunk=args.rows_per_chunk, mask_seed=args.mask_seed,
                           alpha=args.alpha)
    elif args.experiment:
        if not args.rows:
            raise ConfigError("init --experiment needs --rows N (the number of ablated models).")
        # the store records the experiment, so that `build STORE` needs no --experiment
        store = init_experiment_store(args.store, args.experiment, args.rows, rows_per_chunk=args.rows_per_chunk,
                                      mask_seed=args.mask_seed, alpha=args.alpha)
    else:
        raise ConfigError("init needs --spec SPEC.json, or --experiment EXP.yaml with --rows N.")
    if existed:
        echo(f"Store {args.store} already exists with this spec; nothing changed.")
    else:
        echo(f"Initialized {store.path}: {store.num_rows} rows in {store.n_blocks} blocks of "
             f"{store.rows_per_chunk}; arrays {', '.join(store.spec.names)}.")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from coar_dask.core.store import open_store

    store = open_store(args.store)
    if args.repair:
        from coar_dask.core.verify import repair_store

        repaired = repair_store(store.path)
        echo(repaired.format())
        if not repaired.ok:
            return 1
        store = open_store(args.store)
    experiment = experiment_for_store(args.experiment, store, "build")
    if not store.pending_blocks():  # plan here (it still checks the experiment); no cluster to start
        build_with_progress(store, experiment, None, "build")
        return 0
    with client_for(args) as client:
        report = build_with_progress(store, experiment, client, "build")
    status = open_store(args.store).status()
    echo(f"Built {report.rows_done} rows in {report.seconds:.1f} s ({report.rows_per_second:.1f} models/s); "
         f"{status['completed_rows']}/{status['num_rows']} rows completed.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from coar_dask.core.store import open_store
    from coar_dask.runtime.build import pass_shape_records

    store = open_store(args.store, read_only=True)
    status = store.status()
    recorded = store.meta.get("experiment")
    shapes = pass_shape_records(store)
    if args.json:
        echo(json.dumps({**status, "experiment": recorded, "pass_shapes": shapes}, indent=2))
        return 0
    echo(f"store:    {status['path']}")
    echo(f"rows:     {status['completed_rows']} / {status['num_rows']} completed "
         f"({status['completed_blocks']} / {status['n_blocks']} blocks of {status['rows_per_chunk']})")
    for name, a in status["arrays"].items():
        echo(f"array:    {name} {a['dtype']}{a['shape']}")
    echo(f"masks:    seed {status['mask_seed']}, alpha {status['alpha']}")
    fp = status["experiment_fingerprint"]
    echo(f"experiment: {str(fp)[:16] + '…' if fp else '(not built yet)'}")
    for line in [*describe_experiment(recorded), *describe_imports(recorded)] if recorded else ():
        echo(f"  {line}")
    for r in shapes:  # auto's measured choice per worker (models/s per masks x examples per pass)
        rates = ", ".join(f"{k} {v:.1f}" for k, v in r.get("rates", {}).items())
        echo(f"pass shape: {r.get('worker')} on {r.get('device')}: {r.get('masks_per_pass')} masks x "
             f"{r.get('examples_per_pass')} examples per pass (models/s: {rates})")
    return 0


def _auto_solver(args: argparse.Namespace) -> str:
    """``--solver auto`` as ``run-regression`` reads it (compat.seed.choose_solver): lstsq for
    ``--k`` 1 (or absent) and ``--max-lambda`` 0 (or absent), else saga."""
    value = getattr(args, "max_lambda", None)
    try:
        max_lambda = 0.0 if value is None else float(value)
    except ValueError:  # "auto": a lasso path
        max_lambda = -1.0
    return choose_solver(getattr(args, "k", None), max_lambda, "auto")


def cmd_fit(args: argparse.Namespace) -> int:
    from coar_dask.fit.fit import fit

    if args.solver == "auto":
        args.solver = _auto_solver(args)
    options = solver_options_from_args(args)
    out = Path(args.out)
    if out.is_dir():  # the seed's cfg.out_dir is a directory holding datamodels.pt
        out = out / "datamodels.pt"
    check_output_path(out, args.overwrite)  # refused before fitting, not after
    t0 = time.perf_counter()
    from coar_dask.fit.progress import FitProgressBar

    progress = FitProgressBar(disable=None)  # hidden when stderr is not a terminal; its unit follows the stage
    # a cluster for target slices, or (--cluster given, no --slices) for row-parallel least squares
    use_cluster = (bool(options.get("slices")) or args.cluster is not None) and args.cluster != "none"
    with (client_for(args) if use_cluster else contextlib.nullcontext()) as client:
        try:
            attrs = fit(args.store, x_name=args.x_name, y_name=args.y_name, num_train=args.num_train,
                        num_val=args.num_val, split_seed=args.split_seed, target_slice=_parse_slice(args.target_slice),
                        device=args.device, progress=progress, client=client, **options)
        finally:
            progress.close()
    path = attrs.save(out, overwrite=args.overwrite)
    echo(f"Fitted {attrs.n_components} components x {attrs.n_examples} examples with {attrs.metadata['solver']} "
         f"on {attrs.metadata['n_train']} rows in {time.perf_counter() - t0:.2f} s -> {path}")
    pending, unfitted = attrs.metadata.get("n_pending_rows"), attrs.metadata.get("unfitted_components")
    if pending or unfitted:
        echo(f"warning: {pending or 0} row(s) of the store pending (not built, not fitted on); "
             f"{len(unfitted or [])} component(s) never or always ablated in the training rows (weights unfitted)")
    corr = attrs.metadata.get("val_correlation")
    if corr:
        s = correlation_summary(corr)
        echo(f"validation correlation: mean {s['mean']:.3f} over {attrs.metadata['n_val']} rows"
             + (f" ({s['n_nan']} of {s['n']} examples without variance: NaN, left out)" if s["n_nan"] else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from coar_dask.fit.evaluate import evaluate, plot_evaluation, plot_path

    store = args.store
    if args.experiment or args.rows:
        store = _build_eval_store(args)
    elif not store:
        raise ConfigError("evaluate needs --store EVAL_STORE, or --store DIR --rows N to build one (with the "
                          "experiment of the attributions, or --experiment EXP.yaml).")
    else:
        _finish_eval_store(store, args)
    if args.plot:
        check_output_path(plot_path(args.plot), args.overwrite)  # refused before any build or read
    # the plotted examples need a second pass over the store: only read them for a plot
    result = evaluate(args.attributions, store, n_plot_examples=3 if args.plot else 0)
    summary = result.summary()
    if args.plot:
        args.plot = str(plot_evaluation(result, args.plot, overwrite=args.overwrite))
        summary["plot"] = args.plot
    if args.json:
        echo(json.dumps(summary, indent=2))
    else:
        echo(f"{result.heading()} (alpha {result.alpha}): {result.describe()}")
        if args.plot:
            echo(f"plot: {args.plot}")
    return 0


def _eval_experiment(args: argparse.Namespace) -> Any:
    """The evaluation build's experiment: --experiment, else the one the evaluation store records
    (resumed as it is), else the one the attributions record; fresh masks (mask seed + 1) by default."""
    from coar_dask.core.experiment import load_experiment
    from coar_dask.core.store import _is_store_dir
    from coar_dask.core.trust import experiment_from_record
    from coar_dask.fit.attributions import Attributions

    if args.experiment:
        exp = load_experiment(args.experiment)
    elif _is_store_dir(Path(args.store)) and recorded_experiment(args.store) is not None:
        exp = recorded_experiment(args.store)
        return exp.replace(mask_seed=exp.mask_seed if args.mask_seed is None else args.mask_seed,
                           alpha=exp.alpha if args.alpha is None else args.alpha)
    else:
        data = Attributions.load(args.attributions).metadata.get("experiment")
        if not data:
            raise ConfigError(f"attributions {args.attributions!r} do not record their experiment (their store "
                              f"recorded none); give it: --experiment EXP.yaml.")
        exp = experiment_from_record(data, f"the experiment recorded in {args.attributions!r}")
    return exp.replace(mask_seed=exp.mask_seed + 1 if args.mask_seed is None else args.mask_seed,
                       alpha=exp.alpha if args.alpha is None else args.alpha)


def _finish_eval_store(store: str, args: argparse.Namespace) -> None:
    """Build an evaluation store's pending blocks (an interrupted evaluation) with the experiment it records."""
    from coar_dask.core.store import open_store

    opened = open_store(store)
    if not opened.pending_blocks():  # nothing to build: the record's code is not needed
        return
    experiment = recorded_experiment(opened)
    if experiment is None:
        return
    with client_for(args) as client:
        build_with_progress(opened, experiment, client, "evaluation build")


def _build_eval_store(args: argparse.Namespace) -> Any:
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.core.experiment import load_state
    from coar_dask.runtime.gpu import client_experiment

    if not args.store or not args.rows:
        raise ConfigError("evaluate --experiment needs --store DIR (the evaluation store) and --rows N.")
    exp = _eval_experiment(args)
    state = load_state(client_experiment(exp))  # counts only: the client never touches a GPU
    store = eval_store_for(args.store, exp, args.rows, state.n_components, state.n_examples)
    with client_for(args) as client:
        build_with_progress(store, exp, client, "evaluation build")
    return store


# -- the stage commands' flags ------------------------------------------------
def _init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", "--logging.logdir", dest="store", required=True, help="store directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", "--logging.spec", dest="spec", help="the seed's JSON spec file")
    src.add_argument("--experiment", help="experiment YAML: derive the spec from its components and examples")
    p.add_argument("--rows", type=int, help="rows (ablated models) when using --experiment")
    p.add_argument("--rows-per-chunk", type=int, default=None, help="rows per block and chunk (default: auto, <= 100)")
    p.add_argument("--mask-seed", type=int, default=None, help="record the mask seed")
    p.add_argument("--alpha", type=float, default=None, help="record alpha")


def _build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--experiment", default=None,
                   help="experiment YAML (e.g. configs/digits.yaml); default: the one the store was built with")
    p.add_argument("--repair", action="store_true",
                   help="first reset the blocks `coar-dask verify` finds bad, so this build recomputes them")
    add_cluster_arguments(p)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--json", action="store_true", help="print JSON")


def _fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", "--data.data_path", dest="store", required=True, help="store directory")
    p.add_argument("--out", "--cfg.out_dir", dest="out", required=True, help="output .pt file (an existing directory gets DIR/datamodels.pt, as the seed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--x-name", "--cfg.x_name", dest="x_name", default=None, help="mask array (default: the bool one)")
    p.add_argument("--y-name", "--cfg.y_name", dest="y_name", default=None, help="output array (default: the other one)")
    add_row_arguments(p)
    p.add_argument("--target-slice", default=None, help="fit only outputs START:STOP")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--solver", choices=("auto", *sorted(REGISTRY)), default="lstsq",
                   help=", ".join(f"{name} ({e.description})" for name, e in REGISTRY.items())
                   + "; auto: as run-regression, lstsq for --k 1 and --max-lambda 0 (or absent), else saga")
    add_fit_solver_arguments(p)
    add_cluster_arguments(p)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attributions", required=True, help="attributions .pt from `coar-dask fit`")
    p.add_argument("--store", help="evaluation store directory (its pending blocks are built first)")
    p.add_argument("--experiment",
                   help="experiment YAML of the evaluation build (default: the one the evaluation store or the "
                        "attributions record)")
    p.add_argument("--rows", type=int, help="rows of the evaluation store to build (creates it)")
    p.add_argument("--mask-seed", type=int, default=None, help="mask seed of the evaluation masks")
    p.add_argument("--alpha", type=float, default=None, help="alpha of the evaluation masks")
    p.add_argument("--plot", help="write a PNG plot here (.png is added to a name without a suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_cluster_arguments(p)


#: The stage commands: name, help, description, flags, handler.
STAGES: tuple[tuple[str, str, str | None, Callable[[argparse.ArgumentParser], None],
                    Callable[[argparse.Namespace], int]], ...] = (
    ("init", "create a store from a spec (or an experiment)",
     "Create a zarr store. Instant: no chunk is written until the build.", _init_arguments, cmd_init),
    ("build", "compute the pending blocks of a store on a Dask cluster",
     "Run one task per pending block; rerun to resume after an interruption.", _build_arguments, cmd_build),
    ("status", "show a store's rows, blocks and settings", None, _status_arguments, cmd_status),
    ("fit", "fit attributions on a store's completed rows",
     "Per-example linear models of outputs on masks, streamed over row blocks. "
     "Weights are in mask units: prediction = mask @ weight + bias (1 = kept).", _fit_arguments, cmd_fit),
    ("evaluate", "correlation of predicted and actual outputs on held-out masks",
     "Evaluate attributions on an evaluation store (fresh masks). With --experiment, "
     "the evaluation store is created and built first (mask seed + 1 by default).", _evaluate_arguments,
     cmd_evaluate),
)


def add_stage_parsers(subparsers: Any) -> None:
    """Add ``init``, ``build``, ``status``, ``fit`` and ``evaluate`` (:data:`STAGES`)."""
    for name, help, description, arguments, handler in STAGES:
        p = subparsers.add_parser(name, help=help, description=description)
        arguments(p)
        p.set_defaults(func=handler)


def _add_export_beton(subparsers: Any) -> None:
    add_export_beton_parser(subparsers, aliases=("write-dataset",))


#: Every command group, in ``coar-dask --help`` order: each adds its subcommands.
COMMANDS: tuple[Callable[[Any], Any], ...] = (
    add_demo_parser,
    add_stage_parsers,
    add_compare_parser,
    add_edit_parser,
    add_components_parser,
    add_plan_parser,
    add_top_parser,
    add_verify_parser,
    add_cluster_parser,
    add_config_parser,
    _add_export_beton,
    add_import_npy_parser,
    add_export_npy_parser,
    add_initialize_store_parser,
    add_run_regression_parser,
)


# -- parser and entry point ---------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``coar-dask`` parser: one subcommand per command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="coar-dask",
        description="COAR component attributions on Dask: init a store from a spec, build it with "
                    "ablated models on a cluster, fit attributions, evaluate them on held-out masks.",
        epilog="Start with `coar-dask demo --out demo-out`. Each command has --help.",
    )
    parser.add_argument("--version", action="version", version=f"coar_dask {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    apply_parser_rules(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``coar-dask``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    with command_context(args):  # the current folder importable, recorded code agreed to: only when asked
        return run_command(lambda a: a.func(resolve_store(a)), args, f"coar-dask {args.command}", INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
