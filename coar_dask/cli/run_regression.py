"""``python -m coar_dask.run_regression``: the seed's regression command, on CPU or GPU.

Same flags and YAML as the research code's ``run_regression.py``::

    python -m coar_dask.run_regression --config regression_config.yaml \\
        --data.data_path $STORE_DIR/component_datasets.beton \\
        --cfg.out_dir $STORE_DIR/coar_attributions.pt

This module parses and prints; the work is :func:`coar_dask.compat.regression.run_regression`.
``data.data_path`` is a ``.beton`` (read through FFCV, see
:class:`coar_dask.formats.beton.BetonRows`) or a zarr store (its completed rows in
order, i.e. the rows a ``.beton`` of it holds). As in the seed, the fit uses
the first ``data.num_train + data.num_val`` rows (the seed's final refit on
train + validation), the columns ``data.target_start_ind:target_end_ind``,
and writes ``{weight, bias, lam}`` (+ ``metadata``) to
``<cfg.out_dir>/datamodels.pt`` -- ``cfg.out_dir`` is a directory, as in the
seed, even when it is named ``*.pt``.

Solvers (``--solver``, default ``auto``): with the seed's configs (``k: 1``,
``manual_max_lambda: 0``) the fit is exact least squares with an intercept,
what the seed asks SAGA to approximate, and the SAGA settings (``cfg.lr``,
``cfg.eps``, ``early_stopping.*``) are reported as unused. Settings that
need a lasso path (``k > 1``, or ``manual_max_lambda`` -1 = each target's
lambda_max, or another penalty) run :func:`coar_dask.solvers.saga.saga`, fast_l1's
algorithm in torch, with the seed's settings: path on the train rows,
penalty chosen on the validation rows, refit on both. ``--solver saga``
forces it (to reproduce the seed's approximate fit), ``--solver fast_l1``
uses the fast_l1 package itself on a GPU. ``cfg.use_bias: 0`` is not
supported.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from coar_dask.cli._seed import register, run_main, standalone_parser
from coar_dask.compat.regression import OUT_FILE, open_rows, run_regression
from coar_dask.compat.seed import KNOWN_KEYS, SEED_SOLVERS, load_regression_config, solver_for
from coar_dask.fit.core import fit_sources as fit_rows

__all__ = [
    "build_parser",
    "add_run_regression_parser",
    "run",
    "main",
    # the work, from coar_dask.compat (kept importable here)
    "open_rows",
    "solver_for",
    "fit_rows",
    "run_regression",
    "OUT_FILE",
]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", "--config-file", "--config", action="append", default=[], dest="config_files",
                   help="the seed's regression YAML (repeatable; later files win)")
    for key in KNOWN_KEYS:
        p.add_argument(f"--{key}", dest=key, default=None, metavar="VALUE",
                       help=argparse.SUPPRESS if key not in ("data.data_path", "cfg.out_dir") else
                       ("a .beton or a zarr store" if key == "data.data_path" else
                        "output directory; the attributions go to <out_dir>/datamodels.pt"))
    p.add_argument("--x-name", default=None, help="mask array, when data_path is a zarr store")
    p.add_argument("--y-name", default=None, help="output array, when data_path is a zarr store")
    p.add_argument("--device", default=None, help="solver device: cpu (default) or cuda")
    p.add_argument("--solver", default="auto", choices=list(SEED_SOLVERS),
                   help="auto (default): exact least squares for k: 1 and manual_max_lambda: 0, "
                        "else the SAGA lasso path; saga / fast_l1 to force the seed's algorithm")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out_dir>/datamodels.pt")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m coar_dask.run_regression``."""
    return standalone_parser("run_regression", "Fit attributions from a .beton or a store with the seed's regression YAML.", _add_arguments, epilog="Every key of the YAML is also a flag: --data.num_train N, --cfg.batch_size B, ...")


def add_run_regression_parser(subparsers: Any, name: str = "run-regression",
                              aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Register ``run-regression`` on a ``coar-dask`` subparsers object (handler: :func:`run`)."""
    return register(subparsers, name, aliases, "the seed's run_regression command (--config YAML, --data.data_path, --cfg.out_dir)",
                    "Fit attributions from a .beton or a store with the seed's regression YAML.", _add_arguments, run)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Handler: read the YAML and flags, fit, save; print where."""
    overrides = {key: getattr(args, key) for key in KNOWN_KEYS}
    cfg = load_regression_config(args.config_files, overrides, solver=args.solver)
    t0 = time.perf_counter()
    attrs, out = run_regression(
        cfg, x_name=args.x_name, y_name=args.y_name, device=args.device, overwrite=args.overwrite,
        solver=args.solver,
    )
    print(
        f"wrote attributions ({attrs.weight.shape[0]} components x {attrs.weight.shape[1]} examples, "
        f"fitted on {attrs.metadata.get('n_fit')} rows) to {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coar_dask.run_regression``."""
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
