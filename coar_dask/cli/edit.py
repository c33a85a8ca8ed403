"""``coar-dask edit``: COAR-Edit a model with its attributions, against a random and a target-only control."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coar_dask.cli.cluster import add_cluster_arguments, client_for
from coar_dask.cli.common import echo
from coar_dask.errors import ConfigError

__all__ = ["add_edit_parser", "cmd_edit", "format_sweep"]


def add_edit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``edit`` (handler: :func:`cmd_edit`)."""
    p = subparsers.add_parser(
        "edit", help="COAR-Edit: ablate the k components that separate target examples from references",
        description="Score every component by a Welch t-test of its attributions on the target examples "
                    "against the reference examples, ablate the k best (largest scores to lower the targets' "
                    "outputs, smallest to raise them) for each k of the sweep (each k a Dask task), and report "
                    "when the targets flip and the references' accuracy, next to two controls: the same k at "
                    "random, and the same k from the targets' own attributions (no reference set).",
    )
    p.add_argument("--attributions", required=True, help="attributions .pt from `coar-dask fit`")
    p.add_argument("--experiment", default=None,
                   help="experiment YAML (default: the one the attributions record)")
    p.add_argument("--target", required=True,
                   help="target examples: indices like 12,40, class:3 (every example of class 3) or "
                        "misclassified (every example the model gets wrong)")
    p.add_argument("--each", action="store_true",
                   help="edit each target on its own (one edit per target) instead of all together")
    p.add_argument("--reference", default="random:50",
                   help="reference examples: random:N (N non-targets, seeded), rest, or indices (default random:50)")
    p.add_argument("--held-out", default="rest",
                   help="examples never used for scoring, whose accuracy judges the edit: rest (every example "
                        "neither a target nor a reference; default), random:N, indices, or none")
    p.add_argument("--held-out-targets", type=float, default=0.0, metavar="FRACTION",
                   help="hold this fraction of the targets out of scoring (e.g. 0.5 with class:3) and report "
                        "their accuracy: does the edit reach unseen members of the group? (default 0)")
    p.add_argument("--direction", choices=("lower", "raise"), default="lower",
                   help="lower the targets' outputs (flip correct ones) or raise them (fix wrong ones)")
    p.add_argument("--k", default="1:20", help="components to ablate: 1:20, 1:40:2 or 1,2,5 (default 1:20)")
    p.add_argument("--draws", type=int, default=5, help="draws of the random control (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference and random draws (default 0)")
    p.add_argument("--plot", default=None,
                   help="write a PNG against k: flips, held-out accuracy, and the targets' predicted and actual "
                        "output change for the top k")
    p.add_argument("--json", action="store_true",
                   help="print JSON: per target, k at flip (null: none) and the accuracy of the references, the "
                        "held-out examples and the held-out targets at the flip, for COAR-Edit and both controls, "
                        "and their medians (median_held_out_accuracy_at_flip, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_edit)
    return p


def _experiment(args: argparse.Namespace, attributions: Any) -> Any:
    from coar_dask.core.experiment import load_experiment
    from coar_dask.core.trust import experiment_from_record

    if args.experiment:
        return load_experiment(args.experiment)
    data = attributions.metadata.get("experiment")
    if not data:
        raise ConfigError(f"attributions {args.attributions!r} do not record their experiment; give it: "
                          f"--experiment EXP.yaml.")
    return experiment_from_record(data, f"the experiment recorded in {args.attributions!r}")


def format_sweep(sweep: Any) -> str:
    """The summary as aligned text: per method, median k at flip and the accuracy of the references and
    of the held-out examples (and held-out targets, when there are any) at the flip."""
    s = sweep.summary()
    base = s["unedited"]
    held_targets = s["unedited"]["held_out_target_accuracy"] is not None

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{len(sweep.cases)} edit(s), direction {sweep.direction}, k in {s['ks'][0]}..{s['ks'][-1]}, "
             f"{sweep.n_components} components; unedited accuracy: references {num(base['reference_accuracy'])}, "
             f"held-out {num(base['held_out_accuracy'])}"
             + (f", held-out targets {num(base['held_out_target_accuracy'])}" if held_targets else ""),
             "  median at the flip:",
             f"  {'method':<12} {'k':>6} {'references':>11} {'held-out':>9}" + (f" {'held-out targets':>17}"
                                                                               if held_targets else "")]
    for m in ("coar", "random", "target_only"):
        k = s["median_k_flip"][m]
        line = (f"  {m:<12} {'none' if k is None else k:>6} {num(s['median_reference_accuracy_at_flip'][m]):>11} "
                f"{num(s['median_held_out_accuracy_at_flip'][m]):>9}")
        if held_targets:
            line += f" {num(s['median_held_out_target_accuracy_at_flip'][m]):>17}"
        lines.append(line)
    return "\n".join(lines)


def _cases(args: argparse.Namespace, state: Any, correct: Any) -> list[Any]:
    from coar_dask.fit.edit import EditCase, parse_held_out, parse_reference, parse_targets, split_targets

    targets = parse_targets(args.target, state.labels.cpu().numpy(), correct)
    scored, held_targets = split_targets(targets, args.held_out_targets, seed=args.seed)
    groups = [[t] for t in scored] if args.each else [scored]
    cases = []
    for g in groups:
        reference = parse_reference(args.reference, state.n_examples, [*g, *held_targets], seed=args.seed)
        held = parse_held_out(args.held_out, state.n_examples, [*targets, *reference], seed=args.seed)
        cases.append(EditCase(g, reference, held, held_targets))
    return cases


def cmd_edit(args: argparse.Namespace) -> int:
    """Handler of ``coar-dask edit``."""
    from coar_dask.core.experiment import load_state
    from coar_dask.fit.attributions import Attributions
    from coar_dask.fit.edit import base_predictions, parse_ks, plot_edit, sweep_edit
    from coar_dask.runtime.gpu import client_experiment

    if args.plot:
        from coar_dask.core.output_paths import check_output_path
        from coar_dask.fit.evaluate import plot_path

        check_output_path(plot_path(args.plot), args.overwrite)  # refused before any computing
    attributions = Attributions.load(args.attributions)
    experiment = _experiment(args, attributions)
    ks = parse_ks(args.k)
    state = load_state(client_experiment(experiment))  # labels and counts only: the client stays on the CPU
    with client_for(args) as client:
        correct, _ = base_predictions(experiment, client=client)
        cases = _cases(args, state, correct)
        sweep = sweep_edit(experiment, attributions, cases, ks, direction=args.direction, client=client,
                           random_draws=args.draws, seed=args.seed)
    if args.plot:
        args.plot = str(plot_edit(sweep, args.plot, overwrite=args.overwrite))
    if args.json:
        echo(json.dumps({**sweep.summary(), **({"plot": str(args.plot)} if args.plot else {})}, indent=2))
        return 0
    echo(format_sweep(sweep))
    if args.plot:
        echo(f"plot: {args.plot}")
    return 0
