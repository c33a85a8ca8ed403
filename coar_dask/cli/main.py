"""The ``coar-dask`` command line.

Stages: ``init`` -> ``build`` -> ``status`` -> ``fit`` -> ``evaluate``, and
``demo`` to run them all on the built-in digits example. User errors print
one line and exit with code 2; an interrupted build exits with 130 and
resumes where it stopped when run again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from coar_dask._version import __version__
from coar_dask.errors import CoarError, ConfigError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("coar_dask.cli.main")


def _out(*args: Any) -> None:
    print(*args, flush=True)


# -- shared pieces ----------------------------------------------------------
def _quiet_dask(verbose: int) -> None:
    """Keep Dask's INFO chatter out of the CLI's output unless -v is given."""
    if verbose:
        return
    import dask

    # Read by distributed when it is first imported...
    dask.config.set({"logging": {"distributed": "error", "bokeh": "error", "tornado": "error"}})
    # ...and, if it already was, set directly.
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    from coar_dask.runtime.cluster import add_cluster_arguments

    add_cluster_arguments(p)


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """A Dask client for the cluster flags, or ``None`` for ``--cluster none``."""
    from coar_dask.runtime.cluster import cluster_client, cluster_from_args

    kwargs = cluster_from_args(args)
    if kwargs.pop("kind") == "none":
        yield None
        return
    kind = args.cluster or "local"
    with cluster_client(kind, **kwargs) as client:
        _out(f"Dask dashboard: {client.dashboard_link}")
        yield client


def _progress_bar(total: int, desc: str, unit: str = "block") -> tuple[Any, Callable[..., None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)

    def update(result: Any, done: int, n: int) -> None:
        bar.update(1)
        bar.set_postfix(rows=result.rows, refresh=False)

    return bar, update


def _build(store: Any, experiment: Any, client: Any, desc: str) -> Any:
    from coar_dask.runtime.build import execute_plan, plan_build

    plan = plan_build(store, experiment)
    if not plan.blocks:
        _out(f"{desc}: all {plan.n_blocks_total} blocks already completed.")
        from coar_dask.runtime.build import BuildReport

        return BuildReport()
    bar, update = _progress_bar(len(plan.blocks), desc)
    try:
        return execute_plan(plan, client, progress=update)
    finally:
        bar.close()


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

    existed = _is_store_dir(Path(args.store))
    if args.spec:
        spec: Any = args.spec
        mask_seed, alpha = args.mask_seed, args.alpha
    elif args.experiment:
        from coar_dask.core.experiment import load_experiment, load_state
        from coar_dask.core.spec import Spec

        if not args.rows:
            raise ConfigError("init --experiment needs --rows N (the number of ablated models).")
        exp = load_experiment(args.experiment)
        state = load_state(exp)
        spec = Spec.for_experiment(args.rows, state.n_components, state.n_examples,
                                   x_name=exp.x_name, y_name=exp.y_name, y_dtype=exp.y_dtype)
        mask_seed = exp.mask_seed if args.mask_seed is None else args.mask_seed
        alpha = exp.alpha if args.alpha is None else args.alpha
    else:
        raise ConfigError("init needs --spec SPEC.json, or --experiment EXP.yaml with --rows N.")
    store = init_store(args.store, spec, rows_per_chunk=args.rows_per_chunk, mask_seed=mask_seed, alpha=alpha)
    if existed:
        _out(f"Store {args.store} already exists with this spec; nothing changed.")
    else:
        _out(f"Initialized {store.path}: {store.num_rows} rows in {store.n_blocks} blocks of "
             f"{store.rows_per_chunk}; arrays {', '.join(store.spec.names)}.")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from coar_dask.core.store import open_store

    store = open_store(args.store)
    if args.repair:
        from coar_dask.core.verify import repair_store

        repaired = repair_store(store.path)
        _out(repaired.format())
        if not repaired.ok:
            return 1
        store = open_store(args.store)
    with _client(args) as client:
        report = _build(store, args.experiment, client, "build")
    status = open_store(args.store).status()
    _out(f"Built {report.rows_done} rows in {report.seconds:.1f} s ({report.rows_per_second:.1f} models/s); "
         f"{status['completed_rows']}/{status['num_rows']} rows completed.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from coar_dask.core.store import open_store

    status = open_store(args.store, read_only=True).status()
    if args.json:
        _out(json.dumps(status, indent=2))
        return 0
    _out(f"store:    {status['path']}")
    _out(f"rows:     {status['completed_rows']} / {status['num_rows']} completed "
         f"({status['completed_blocks']} / {status['n_blocks']} blocks of {status['rows_per_chunk']})")
    for name, a in status["arrays"].items():
        _out(f"array:    {name} {a['dtype']}{a['shape']}")
    _out(f"masks:    seed {status['mask_seed']}, alpha {status['alpha']}")
    fp = status["experiment_fingerprint"]
    _out(f"experiment: {fp[:16] + '…' if fp else '(not built yet)'}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from coar_dask.fit.fit import fit, solver_options_from_args

    options = solver_options_from_args(args)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(file=sys.stderr, disable=None, unit="step")

    def progress(p: Any) -> None:  # a coar_dask.solvers.lstsq.FitProgress
        bar.total = p.total
        bar.n = p.done
        bar.set_description_str(p.describe(), refresh=False)
        bar.refresh()

    use_cluster = bool(options.get("slices")) and (args.cluster or "local") != "none"
    with (_client(args) if use_cluster else contextlib.nullcontext()) as client:
        try:
            attrs = fit(args.store, x_name=args.x_name, y_name=args.y_name, num_train=args.num_train,
                        num_val=args.num_val, split_seed=args.split_seed, target_slice=_parse_slice(args.target_slice),
                        device=args.device, progress=progress, client=client, **options)
        finally:
            bar.close()
    out = Path(args.out)
    if out.is_dir():  # the seed's cfg.out_dir is a directory holding datamodels.pt
        out = out / "datamodels.pt"
    path = attrs.save(out)
    _out(f"Fitted {attrs.n_components} components x {attrs.n_examples} examples with {attrs.metadata['solver']} "
         f"on {attrs.metadata['n_train']} rows in {time.perf_counter() - t0:.2f} s -> {path}")
    corr = attrs.metadata.get("val_correlation")
    if corr:
        import numpy as np

        _out(f"validation correlation: mean {np.nanmean(corr):.3f} over {attrs.metadata['n_val']} rows")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from coar_dask.runtime.cluster import cluster_dry_run_main

    if args.dry_run:
        return cluster_dry_run_main(args)
    with _client(args) as client:
        if client is None:
            raise ConfigError("`coar-dask cluster` starts a cluster; --cluster none has nothing to start.")
        _out(f"Scheduler: {client.scheduler.address}\nUse it with --cluster address --address "
             f"{client.scheduler.address}. Ctrl-C stops the cluster.")
        while True:
            time.sleep(3600)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from coar_dask.fit.evaluate import evaluate, plot_evaluation

    store = args.store
    if args.experiment:
        store = _build_eval_store(args)
    elif not store:
        raise ConfigError("evaluate needs --store EVAL_STORE, or --experiment EXP.yaml --store DIR --rows N "
                          "to build one.")
    result = evaluate(args.attributions, store)
    summary = result.summary()
    if args.plot:
        plot_evaluation(result, args.plot)
        summary["plot"] = str(args.plot)
    if args.json:
        _out(json.dumps(summary, indent=2))
    else:
        _out(f"held-out correlation over {result.n_rows} masks (alpha {result.alpha}): "
             f"mean {result.mean:.4f}, median {result.median:.4f}")
        if args.plot:
            _out(f"plot: {args.plot}")
    return 0


def _build_eval_store(args: argparse.Namespace) -> Any:
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.core.experiment import load_experiment, load_state

    if not args.store or not args.rows:
        raise ConfigError("evaluate --experiment needs --store DIR (the evaluation store) and --rows N.")
    exp = load_experiment(args.experiment)
    exp = exp.replace(mask_seed=exp.mask_seed + 1 if args.mask_seed is None else args.mask_seed,
                      alpha=exp.alpha if args.alpha is None else args.alpha)
    state = load_state(exp)
    store = eval_store_for(args.store, exp, args.rows, state.n_components, state.n_examples)
    with _client(args) as client:
        _build(store, exp, client, "evaluation build")
    return store


def cmd_demo(args: argparse.Namespace) -> int:
    from coar_dask.cli.demo import run_demo

    summary = run_demo(out=args.out, rows=args.rows, eval_rows=args.eval_rows, workers=args.workers,
                       cache_dir=args.cache_dir, alpha=args.alpha, echo=_out)
    return 0 if summary else 1


# -- parser -----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coar-dask",
        description="COAR component attributions on Dask: init a store from a spec, build it with "
                    "ablated models on a cluster, fit attributions, evaluate them on held-out masks.",
        epilog="Start with `coar-dask demo --out demo-out`. Each command has --help.",
    )
    parser.add_argument("--version", action="version", version=f"coar_dask {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in digits example",
                       description="Train (or load from the cache) a small ResNet on scikit-learn's digits, "
                                   "build ablated models on a LocalCluster, fit attributions, evaluate them "
                                   "on fresh masks; writes a table, a plot and summary.json to --out.")
    p.add_argument("--out", required=True, help="output directory (stores, attributions, plot, summary.json)")
    p.add_argument("--rows", type=int, default=2000, help="ablated models to build (default 2000)")
    p.add_argument("--eval-rows", type=int, default=500, help="held-out masks to evaluate on (default 500)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    p.add_argument("--alpha", type=float, default=0.05, help="fraction of components ablated (default 0.05)")
    p.add_argument("--cache-dir", default=None, help="where the trained model is cached "
                                                     "(default $COAR_DASK_CACHE or ~/.cache/coar_dask)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("init", help="create a store from a spec (or an experiment)",
                       description="Create a zarr store. Instant: no chunk is written until the build.")
    p.add_argument("--store", "--logging.logdir", dest="store", required=True, help="store directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", "--logging.spec", dest="spec", help="the seed's JSON spec file")
    src.add_argument("--experiment", help="experiment YAML: derive the spec from its components and examples")
    p.add_argument("--rows", type=int, help="rows (ablated models) when using --experiment")
    p.add_argument("--rows-per-chunk", type=int, default=None, help="rows per block and chunk (default: auto, <= 100)")
    p.add_argument("--mask-seed", type=int, default=None, help="record the mask seed")
    p.add_argument("--alpha", type=float, default=None, help="record alpha")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("build", help="compute the pending blocks of a store on a Dask cluster",
                       description="Run one task per pending block; rerun to resume after an interruption.")
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--experiment", required=True, help="experiment YAML (e.g. configs/digits.yaml)")
    p.add_argument("--repair", action="store_true",
                   help="first reset the blocks `coar-dask verify` finds bad, so this build recomputes them")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("status", help="show a store's rows, blocks and settings")
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fit", help="fit attributions on a store's completed rows",
                       description="Per-example linear models of outputs on masks, streamed over row blocks. "
                                   "Weights are in mask units: prediction = mask @ weight + bias (1 = kept).")
    p.add_argument("--store", "--data.data_path", dest="store", required=True, help="store directory")
    p.add_argument("--out", "--cfg.out_dir", dest="out", required=True, help="output .pt file (an existing directory gets DIR/datamodels.pt, as the seed)")
    p.add_argument("--x-name", "--cfg.x_name", dest="x_name", default=None, help="mask array (default: the bool one)")
    p.add_argument("--y-name", "--cfg.y_name", dest="y_name", default=None, help="output array (default: the other one)")
    p.add_argument("--num-train", "--data.num_train", dest="num_train", type=int, default=None,
                   help="train rows (default: all completed rows not used for validation)")
    p.add_argument("--num-val", "--data.num_val", dest="num_val", type=int, default=0, help="validation rows (default 0)")
    p.add_argument("--split-seed", "--data.seed", dest="split_seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--target-slice", default=None, help="fit only outputs START:STOP")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    from coar_dask.fit.fit import add_fit_solver_arguments

    add_fit_solver_arguments(p)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="correlation of predicted and actual outputs on held-out masks",
                       description="Evaluate attributions on an evaluation store (fresh masks). With --experiment, "
                                   "the evaluation store is created and built first (mask seed + 1 by default).")
    p.add_argument("--attributions", required=True, help="attributions .pt from `coar-dask fit`")
    p.add_argument("--store", help="evaluation store directory")
    p.add_argument("--experiment", help="experiment YAML: build the evaluation store first")
    p.add_argument("--rows", type=int, help="rows of the evaluation store to build")
    p.add_argument("--mask-seed", type=int, default=None, help="mask seed of the evaluation masks")
    p.add_argument("--alpha", type=float, default=None, help="alpha of the evaluation masks")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_evaluate)

    from coar_dask.core.components import add_components_parser
    from coar_dask.cli.initialize_store import add_initialize_store_parser
    from coar_dask.cli.run_regression import add_run_regression_parser
    from coar_dask.formats.npy import add_export_npy_parser, add_import_npy_parser
    from coar_dask.core.verify import add_verify_parser
    from coar_dask.cli.write_dataset import add_export_beton_parser

    add_components_parser(sub)
    add_verify_parser(sub)

    p = sub.add_parser("cluster", help="show the SLURM job script (--dry-run), or start a cluster and wait",
                       description="With --dry-run, print the settings and the job script SLURM would run. "
                                   "Without, start the cluster described by the flags, print its scheduler "
                                   "address and dashboard, and keep it up until Ctrl-C.")
    p.add_argument("--dry-run", action="store_true", help="print the SLURM job script and exit")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_cluster)

    add_export_beton_parser(sub, aliases=("write-dataset",))
    add_import_npy_parser(sub)
    add_export_npy_parser(sub)
    add_initialize_store_parser(sub)
    add_run_regression_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``coar-dask``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _quiet_dask(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CoarError as exc:
        print(f"coar-dask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coar-dask {args.command}: interrupted; completed blocks are kept — run the same command "
              f"again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
