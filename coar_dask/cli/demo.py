"""``coar-dask demo``: the whole pipeline on the built-in digits example.

Part of the command-line layer (it prints and draws progress bars); the
stages it calls are the library's public API, so the README's Python example
and the stage-by-stage CLI give the same attributions for the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from coar_dask.cli.common import build_with_progress, echo

__all__ = ["run_demo", "run_edit_demo", "add_demo_parser", "cmd_demo"]

#: Mask seed of the held-out evaluation masks (the build uses the experiment's, 0).
EVAL_MASK_SEED = 1

Echo = Callable[..., None]


def _load_model(echo: Echo) -> float:
    """Train or load the cached digits model; returns its held-out accuracy."""
    from coar_dask.zoo import digits

    echo(f"[1/5] digits model (cache: {digits.default_cache_dir()})")
    t0 = time.perf_counter()
    accuracy = digits.heldout_accuracy(digits.load_model())
    echo(f"      held-out accuracy {accuracy:.4f} ({time.perf_counter() - t0:.1f} s)")
    return accuracy


def _build_both(store: Any, eval_store: Any, experiment: Any, eval_experiment: Any, workers: int,
                echo: Echo) -> tuple[Any, float]:
    """Build the store and the held-out store on one LocalCluster; returns the build's report and seconds."""
    from coar_dask.runtime.clusters import cluster_client

    echo(f"[3/5] building on a LocalCluster with {workers} workers")
    t0 = time.perf_counter()
    with cluster_client("local", n_workers=workers) as client:
        echo(f"      Dask dashboard: {client.dashboard_link}")
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = build_with_progress(store, experiment, client, "build")
        build_seconds = time.perf_counter() - t0
        build_with_progress(eval_store, eval_experiment, client, "held-out build")
    build_rate = report.rows_done / build_seconds if report.rows_done else float("nan")
    echo(f"      {report.rows_done} ablated models in {build_seconds:.1f} s ({build_rate:.1f} models/s; "
         f"cluster start {startup:.1f} s)")
    return report, build_seconds


def _print_table(summary: dict[str, Any], echo: Echo) -> None:
    rate = (f"{summary['build_models_per_s']:.1f} models/s" if summary["rows_built_this_run"]
            else "(already built)")
    table = [
        ("components", f"{summary['n_components']}"),
        ("examples", f"{summary['n_examples']}"),
        ("rows (ablated models)", f"{summary['n_rows']} at alpha {summary['alpha']}"),
        ("build rate", rate),
        ("fit time", f"{summary['fit_seconds']:.2f} s"),
        ("held-out correlation", f"mean {summary['mean_correlation']:.3f}, median "
                                 f"{summary['median_correlation']:.3f} ({summary['n_eval_rows']} masks"
                                 + (f"; {summary['n_nan_examples']} examples without variance: NaN, left out)"
                                    if summary.get("n_nan_examples") else ")")),
    ]
    width = max(len(k) for k, _ in table)
    echo("")
    for k, v in table:
        echo(f"  {k:<{width}}  {v}")
    echo("")


def run_demo(
    out: str | os.PathLike,
    *,
    rows: int = 2000,
    eval_rows: int = 500,
    workers: int = 2,
    cache_dir: str | os.PathLike | None = None,
    alpha: float = 0.05,
    echo: Echo = print,
) -> dict[str, Any]:
    """Train/load the digits model, build, fit, evaluate; write plot and summary.json.

    Returns the summary dictionary (also written to ``out/summary.json``).
    """
    from coar_dask.core.experiment import load_state
    from coar_dask.fit.evaluate import eval_store_for, evaluate, plot_evaluation
    from coar_dask.fit.fit import fit
    from coar_dask.zoo import digits

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cache_dir:
        # Workers inherit the environment, so they find the same cached model.
        os.environ["COAR_DASK_CACHE"] = str(Path(cache_dir).resolve())
    accuracy = _load_model(echo)

    experiment = digits.experiment(alpha=alpha)
    eval_experiment = experiment.replace(mask_seed=EVAL_MASK_SEED)
    state = load_state(experiment)
    P, K = state.n_components, state.n_examples
    store = eval_store_for(out / "store", experiment, rows, P, K)
    eval_store = eval_store_for(out / "eval_store", eval_experiment, eval_rows, P, K)
    echo(f"[2/5] stores: {rows} rows x {P} components x {K} examples -> {store.path}; "
         f"{eval_rows} held-out rows -> {eval_store.path}")
    report, build_seconds = _build_both(store, eval_store, experiment, eval_experiment, workers, echo)

    echo("[4/5] fitting attributions (exact least squares)")
    t0 = time.perf_counter()
    attributions = fit(store)
    fit_seconds = time.perf_counter() - t0
    attributions.save(out / "attributions.pt", overwrite=True)  # a rerun replaces its own outputs

    echo("[5/5] evaluating on held-out masks")
    result = evaluate(attributions, eval_store)
    plot = plot_evaluation(result, out / "evaluation.png", title=f"COAR on digits (alpha {alpha})", overwrite=True)
    summary = {
        "n_components": P,
        "n_examples": K,
        "n_rows": rows,
        "n_eval_rows": result.n_rows,
        "alpha": alpha,
        "heldout_accuracy": accuracy,
        "build_seconds": round(build_seconds, 3),
        "build_models_per_s": round(report.rows_done / build_seconds, 2) if report.rows_done else None,
        "rows_built_this_run": report.rows_done,
        "fit_seconds": round(fit_seconds, 3),
        "mean_correlation": result.mean,
        "median_correlation": result.median,
        "n_nan_examples": result.n_nan,
        "workers": workers,
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "attributions": str(out / "attributions.pt"),
        "plot": str(plot),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_table(summary, echo)
    echo(f"plot: {plot}\nsummary: {out / 'summary.json'}")
    _compare(out, store, eval_store, experiment, echo)
    return summary


def _compare(out: Path, store: Any, eval_store: Any, experiment: Any, echo: Echo) -> dict[str, Any]:
    """COAR and the baselines (LOO, GP, and NC and II with Captum) on the held-out store:
    ``out/compare.json`` and a plot. The LOO rows go where ``coar-dask compare`` looks for them
    (:func:`~coar_dask.fit.compare.default_loo_store`: ``out/store-loo``)."""
    from coar_dask.fit.compare import compare, default_methods, plot_comparison

    names = {"loo": "leave-one-out", "gp": "gradient x parameter", "nc": "neuron conductance",
             "ii": "internal influence"}
    methods = default_methods()
    echo(f"[+] baselines: {', '.join(names[m] for m in methods if m in names)} on the same held-out masks"
         + ("" if "nc" in methods else " (pip install 'coar_dask[baselines]' adds neuron conductance and "
                                      "internal influence)"))
    comparison = compare(store, [eval_store], experiment=experiment, methods=methods)
    result = comparison.to_dict()
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    plot = plot_comparison(comparison, out / "compare.png", title="COAR vs baselines on digits", overwrite=True)
    echo(comparison.table())
    echo(f"compare: {out / 'compare.json'}, plot: {plot}")
    return result


#: The editing example's sweep: k = 1, 5, 10, ..., 150 components of the wide model's 1,568.
EDIT_KS = (1, *range(5, 151, 5))


#: The class-level edit of the editing example: forget this class, scoring on half of its members and
#: judging on the other half (never used for scoring).
EDIT_CLASS = 3


def _edit_cases(experiment: Any, n_targets: int, n_reference: int, client: Any) -> tuple[list[Any], Any]:
    """``n_targets`` correctly classified examples (seeded), each with its own random references and,
    held out, every other example; and the class-level case of :data:`EDIT_CLASS`."""
    import numpy as np

    from coar_dask.core.experiment import load_state
    from coar_dask.fit.edit import EditCase, base_predictions, parse_held_out, parse_reference, split_targets
    from coar_dask.runtime.gpu import client_experiment

    correct, _ = base_predictions(experiment, client=client)
    K = correct.size
    targets = np.random.default_rng(0).choice(np.flatnonzero(correct), size=n_targets, replace=False)
    cases = []
    for t in (int(t) for t in targets):
        reference = parse_reference(f"random:{n_reference}", K, [t], seed=t)
        cases.append(EditCase([t], reference, parse_held_out("rest", K, [t, *reference])))
    labels = load_state(client_experiment(experiment)).labels.cpu().numpy()  # labels only, on the CPU
    members = [int(i) for i in np.flatnonzero(labels == EDIT_CLASS)]
    scored, unseen = split_targets(members, 0.5, seed=0)
    reference = parse_reference(f"random:{n_reference}", K, members, seed=EDIT_CLASS)
    held = parse_held_out("rest", K, [*members, *reference])
    return cases, EditCase(scored, reference, held, unseen)


def run_edit_demo(out: str | os.PathLike, *, rows: int = 3000, workers: int = 2, n_targets: int = 20,
                  n_reference: int = 50, cache_dir: str | os.PathLike | None = None,
                  echo: Echo = print) -> dict[str, Any]:
    """The editing example on the wide model: train/load, build, fit, COAR-Edit each of ``n_targets``
    examples (lowering it until it flips) against the random and target-only controls, judged on the
    examples never used for scoring; then forget class :data:`EDIT_CLASS` (half its members scored, the
    other half held out). Writes ``out/edit.json`` (:meth:`~coar_dask.fit.edit.EditSweep.summary`, with
    ``median_held_out_accuracy_at_flip``; the class edit under ``class_edit``) and ``out/edit.png``."""
    from coar_dask.cli.edit import format_sweep
    from coar_dask.core.experiment import load_state
    from coar_dask.fit.edit import plot_edit, sweep_edit
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.fit.fit import fit
    from coar_dask.runtime.clusters import cluster_client
    from coar_dask.runtime.gpu import client_experiment
    from coar_dask.zoo import wide

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cache_dir:
        os.environ["COAR_DASK_CACHE"] = str(Path(cache_dir).resolve())
    t0 = time.perf_counter()
    echo(f"[1/4] wide digits model (cache: {wide.default_cache_dir()})")
    echo(f"      held-out accuracy {wide.heldout_accuracy(wide.load_model()):.4f}")
    experiment = wide.experiment()
    state = load_state(client_experiment(experiment))
    store = eval_store_for(out / "edit_store", experiment, rows, state.n_components, state.n_examples)
    with cluster_client("local", n_workers=workers) as client:
        echo(f"[2/4] building {rows} ablated models of {state.n_components} components; dashboard "
             f"{client.dashboard_link}")
        build_with_progress(store, experiment, client, "build")
        echo("[3/4] fitting attributions (exact least squares)")
        attributions = fit(store)
        attributions.save(out / "edit_attributions.pt", overwrite=True)
        cases, class_case = _edit_cases(experiment, n_targets, n_reference, client)
        echo(f"[4/4] COAR-Edit of {len(cases)} targets, k in {EDIT_KS[0]}..{EDIT_KS[-1]} (each k a Dask task); "
             f"then class {EDIT_CLASS} ({len(class_case.target)} members scored, "
             f"{len(class_case.held_out_target)} held out)")
        sweep = sweep_edit(experiment, attributions, cases, EDIT_KS, direction="lower", client=client)
        class_sweep = sweep_edit(experiment, attributions, [class_case], EDIT_KS, direction="lower",
                                 client=client, random_draws=2)
    summary = {**sweep.summary(), "class_edit": {"class": EDIT_CLASS, **class_sweep.summary()}}
    (out / "edit.json").write_text(json.dumps(summary, indent=2))
    plot = plot_edit(sweep, out / "edit.png", title="COAR-Edit on the wide digits model", overwrite=True)
    echo(format_sweep(sweep))
    echo(f"class {EDIT_CLASS}:\n" + format_sweep(class_sweep))
    echo(f"edit: {out / 'edit.json'}, plot: {plot} ({time.perf_counter() - t0:.1f} s)")
    return summary


def cmd_demo(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask demo``."""
    if args.edit:
        return 0 if run_edit_demo(out=args.out, workers=args.workers, cache_dir=args.cache_dir, echo=echo) else 1
    summary = run_demo(out=args.out, rows=args.rows, eval_rows=args.eval_rows, workers=args.workers,
                       cache_dir=args.cache_dir, alpha=args.alpha, echo=echo)
    return 0 if summary else 1


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coar-dask demo`` to ``coar-dask``'s subparsers."""
    p = subparsers.add_parser("demo", help="run the whole pipeline on the built-in digits example",
                              description="Train (or load from the cache) a small ResNet on scikit-learn's "
                                          "digits, build ablated models on a LocalCluster, fit attributions, "
                                          "evaluate them on fresh masks; writes a table, a plot and "
                                          "summary.json to --out, and compare.json (COAR against leave-one-out, "
                                          "gradient x parameter, and with Captum neuron conductance and internal "
                                          "influence, on the same held-out masks). With --edit: the "
                                          "editing example (edit.json).")
    p.add_argument("--out", required=True, help="output directory (stores, attributions, plot, summary.json)")
    p.add_argument("--rows", type=int, default=2000, help="ablated models to build (default 2000)")
    p.add_argument("--eval-rows", type=int, default=500, help="held-out masks to evaluate on (default 500)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    p.add_argument("--alpha", type=float, default=0.05, help="fraction of components ablated (default 0.05)")
    p.add_argument("--cache-dir", default=None, help="where the trained model is cached "
                                                     "(default $COAR_DASK_CACHE or ~/.cache/coar_dask)")
    p.add_argument("--edit", action="store_true",
                   help="run the editing example instead: COAR-Edit on a 1,568-component wide CNN (20 targets, "
                        "random and target-only controls, judged on examples never used for scoring) and "
                        "forgetting class 3; writes edit.json and edit.png to --out")
    p.set_defaults(func=cmd_demo)
    return p
