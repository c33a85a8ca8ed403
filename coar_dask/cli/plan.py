"""``coar-dask plan``: what a build and fit of an experiment cost, before running them."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from coar_dask.zoo.plan import GPU_PEAK_FLOPS, plan_experiment, plan_json

__all__ = ["add_plan_parser", "plan_main"]


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coar-dask plan`` to an ``argparse`` subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "plan", help="predict a build's GPU-hours, disk, memory and the fit's method, without running it",
        description="From the experiment's architecture on the meta device (FLOPs; its factories are not "
                    "called, no weights are downloaded) and one timed forward block on this machine: build "
                    "GPU-hours and wall time on W workers, disk per store (the store's codecs on sampled "
                    "masks), worker peak memory, the fit method the memory model chooses with its peak and "
                    "time, and the attributions' size. Assumptions are printed with the figures.",
    )
    p.add_argument("--experiment", required=True, help="experiment YAML, e.g. configs/imagenet_vit/experiment.yaml")
    p.add_argument("--rows", type=int, required=True, help="rows (ablated models) to build")
    p.add_argument("--gpu", default="a100", choices=[*GPU_PEAK_FLOPS, "cpu"],
                   help="what the build and fit run on (default a100; cpu: this machine's timed rate)")
    p.add_argument("--workers", type=int, default=1, help="GPUs (or CPU workers) of the build (default 1)")
    p.add_argument("--preset", help="architecture preset (default: the experiment's configs/ folder name)")
    p.add_argument("--examples", type=int, help="examples per row (default: spec.json beside the experiment)")
    p.add_argument("--no-time", action="store_true", help="skip the timed block (FLOPs and assumptions only)")
    p.add_argument("--json", action="store_true", help="print JSON (keys build_gpu_hours, disk_bytes, "
                                                       "worker_peak_bytes, fit_method, fit_peak_bytes, ...)")
    p.set_defaults(func=plan_main)
    return p


def plan_main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Handler of ``coar-dask plan``."""
    out = out or sys.stdout
    plan = plan_experiment(args.experiment, args.rows, gpu=args.gpu, workers=args.workers, preset=args.preset,
                           examples=args.examples, time_block=not args.no_time)
    out.write((plan_json(plan) if args.json else str(plan)) + "\n")
    return 0
