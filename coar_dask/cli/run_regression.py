"""``python -m coar_dask.cli.run_regression``: the seed's regression command, on CPU or GPU.

Same flags and YAML as the research code's ``run_regression.py``::

    python -m coar_dask.cli.run_regression --config regression_config.yaml \\
        --data.data_path $STORE_DIR/component_datasets.beton \\
        --cfg.out_dir $STORE_DIR/coar_attributions.pt

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
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coar_dask._version import __version__
from coar_dask.cli._seed import register, run_main, standalone_parser
from coar_dask.errors import ConfigError, RegressionError
from coar_dask.compat.seed import KNOWN_KEYS, SeedRegressionConfig, load_regression_config

__all__ = [
    "build_parser",
    "add_run_regression_parser",
    "open_rows",
    "solver_for",
    "fit_rows",
    "run_regression",
    "run",
    "main",
    "OUT_FILE",
]

logger = logging.getLogger(__name__)

#: File name the seed writes inside ``cfg.out_dir``.
OUT_FILE = "datamodels.pt"
#: Solvers that fit the seed's lasso path (they take the validation rows apart).
_PATH_SOLVERS = ("saga", "fast_l1")


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
    p.add_argument("--solver", default="auto", choices=["auto", "lstsq", *_PATH_SOLVERS],
                   help="auto (default): exact least squares for k: 1 and manual_max_lambda: 0, "
                        "else the SAGA lasso path; saga / fast_l1 to force the seed's algorithm")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out_dir>/datamodels.pt")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m coar_dask.cli.run_regression``."""
    return standalone_parser("run_regression", "Fit attributions from a .beton or a store with the seed's regression YAML.", _add_arguments, epilog="Every key of the YAML is also a flag: --data.num_train N, --cfg.batch_size B, ...")


def add_run_regression_parser(subparsers: Any, name: str = "run-regression",
                              aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Register ``run-regression`` on a ``coar-dask`` subparsers object (handler: :func:`run`)."""
    return register(subparsers, name, aliases, "the seed's run_regression command (--config YAML, --data.data_path, --cfg.out_dir)",
                    "Fit attributions from a .beton or a store with the seed's regression YAML.", _add_arguments, run)


# --------------------------------------------------------------------------
# The work, callable from Python
# --------------------------------------------------------------------------
def solver_for(cfg: SeedRegressionConfig, solver: str = "auto") -> tuple[str, dict[str, Any]]:
    """The solver and its options for the seed's settings.

    ``auto``: exact least squares for ``k: 1, manual_max_lambda: 0`` (the
    seed's configs), the SAGA lasso path otherwise.

    Raises
    ------
    ConfigError
        For ``use_bias: 0``, or ``--solver lstsq`` with settings that need a path.
    """
    if cfg.use_bias != 1:
        raise ConfigError(
            f"cfg.use_bias={cfg.use_bias}: fitting without an intercept is not supported; set cfg.use_bias: 1."
        )
    plain = cfg.k == 1 and cfg.manual_max_lambda == 0
    choices = ("auto", "lstsq", *_PATH_SOLVERS)
    if solver not in choices:
        raise ConfigError(f"--solver {solver!r}: choose one of {list(choices)}.")
    if solver == "auto":
        solver = "lstsq" if plain else "saga"
    if solver == "lstsq":
        if not plain:
            raise ConfigError(
                f"cfg.k={cfg.k}, cfg.manual_max_lambda={cfg.manual_max_lambda} ask for a lasso path, which "
                f"the exact least-squares solver does not fit; use --solver saga (or auto), or set cfg.k: 1 "
                f"and cfg.manual_max_lambda: 0."
            )
        return "lstsq", {}
    max_lambda: Any = "auto" if cfg.manual_max_lambda == -1 else float(cfg.manual_max_lambda)
    options = {
        "lr": cfg.lr,
        "k": cfg.k,
        "eps": cfg.eps,
        "max_lambda": max_lambda,
        "batch_size": cfg.batch_size,
        "early_stop_every": cfg.early_stopping_check_every,
        "early_stop_eps": cfg.early_stopping_eps,
    }
    return solver, options


def _split(n: int, cfg: SeedRegressionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and validation rows: the seed's ``range(num_train)``
    and ``range(num_train, num_train + num_val)``; all rows when neither is set."""
    if cfg.num_train is None and cfg.num_val is None:
        return np.arange(n), np.arange(0)
    num_val = cfg.num_val or 0
    num_train = n - num_val if cfg.num_train is None else cfg.num_train
    if num_train <= 0:
        raise ConfigError(f"data.num_train must be positive; found {num_train}.")
    return np.arange(num_train), np.arange(num_train, num_train + num_val)


def open_rows(
    cfg: SeedRegressionConfig,
    *,
    x_name: str | None = None,
    y_name: str | None = None,
) -> tuple[Any, Any]:
    """The train and validation row sources of ``cfg.data_path``.

    Train rows are the first ``num_train`` rows, validation rows the next
    ``num_val`` (as the seed's ``make_loaders``). A ``.beton`` gives
    :class:`~coar_dask.formats.beton.BetonRows`; a zarr store gives
    :class:`~coar_dask.fit.fit.StoreRows` over its completed rows in row
    order (the rows a ``.beton`` of the store holds, in the same order).

    Returns
    -------
    tuple
        ``(train, val)``; ``val`` is ``None`` when ``num_val`` is 0.
    """
    cfg.require("data.data_path")
    path = Path(cfg.data_path)
    end = cfg.target_end_ind
    if path.is_file():
        from coar_dask.formats.beton import BetonRows, inspect_beton

        n = inspect_beton(path).n_rows
        where = f"{str(path)!r} has only {n} rows; lower them or write more rows into the .beton"

        def make(rows: np.ndarray) -> Any:
            return BetonRows(path, rows=rows, target_slice=(cfg.target_start_ind, end),
                             batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 4))
    else:
        from coar_dask.fit.fit import StoreRows, infer_names
        from coar_dask.core.store import open_store

        if path.is_dir() and not (path / "zarr.json").exists() and any(path.glob("*.npy")):
            raise ConfigError(
                f"{str(path)!r} is a seed store directory of .npy files; convert it first with "
                f"`python -m coar_dask.cli.write_dataset --cfg.data_dir {path} --cfg.out_path "
                f"{path}/component_datasets.beton --cfg.y_name NAME` or `coar-dask import-npy`."
            )
        store = open_store(path, read_only=True)
        x_name, y_name = infer_names(store, x_name, y_name)
        completed = np.flatnonzero(store.completed_rows())
        n = completed.size
        where = f"store {str(path)!r} has only {n} completed rows; lower them or build more rows"
        k = int(np.prod(store.spec[y_name].shape))

        def make(rows: np.ndarray) -> Any:
            return StoreRows(store, completed[rows], x_name, y_name,
                             (cfg.target_start_ind, k if end == -1 else end))
    train, val = _split(n, cfg)
    if train.size + val.size > n:
        raise RegressionError(
            f"data.num_train + data.num_val = {train.size + val.size} rows, but {where}."
        )
    return make(train), (make(val) if val.size else None)


def fit_rows(train: Any, val: Any = None, *, solver: str = "lstsq", device: str | None = None,
             metadata: dict[str, Any] | None = None, **options: Any) -> Any:
    """Fit row sources with a registered solver -> :class:`~coar_dask.fit.fit.Attributions`.

    As the seed's final refit does, the weights are fitted on the train and
    validation rows together. The exact solver (``lstsq``) gets them as one
    source (with the seed's ``k: 1, manual_max_lambda: 0`` the validation
    rows choose nothing); a path solver (``saga``, ``fast_l1``) gets them
    apart, chooses each target's penalty on the validation rows and refits
    on both. This is the one place this module calls the regression API.
    """
    from coar_dask.fit.fit import SIGN_CONVENTION, Attributions
    from coar_dask.solvers.lstsq import get_solver

    fn = get_solver(solver)
    if solver in _PATH_SOLVERS:
        result = fn(train, val, device=device, **options)
        n_fit = train.n_rows + (0 if val is None else val.n_rows)
    else:
        rows = train if val is None else _Concat(train, val)
        result = fn(rows, None, device=device, **options)
        n_fit = rows.n_rows
    meta = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, list))}
    meta.update({
        "package_version": __version__,
        "solver": solver,
        "n_train": int(train.n_rows),
        "n_val": 0 if val is None else int(val.n_rows),
        "n_fit": int(n_fit),
        "sign_convention": SIGN_CONVENTION,
        **(metadata or {}),
    })
    return Attributions(result.weight, result.bias, result.lam, meta)


class _Concat:
    """Row sources read one after the other (train, then validation rows)."""

    def __init__(self, *sources: Any):
        self.sources = sources
        self.n_rows = sum(s.n_rows for s in sources)
        self.n_features = sources[0].n_features
        self.n_targets = sources[0].n_targets

    def blocks(self) -> Any:
        for s in self.sources:
            yield from s.blocks()


def run_regression(
    cfg: SeedRegressionConfig,
    *,
    x_name: str | None = None,
    y_name: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    solver: str = "auto",
) -> tuple[Any, Path]:
    """Run the seed's regression on ``cfg``; return the attributions and the file written.

    Raises
    ------
    ConfigError
        When required settings are missing or ask for what no solver here does.
    """
    cfg.require("data.data_path", "cfg.out_dir")
    solver, options = solver_for(cfg, solver)
    out = Path(cfg.out_dir) / OUT_FILE
    if out.exists() and not overwrite:
        raise ConfigError(
            f"{str(out)!r} exists; choose another --cfg.out_dir or pass --overwrite."
        )
    train, val = open_rows(cfg, x_name=x_name, y_name=y_name)
    logger.info("fitting %s on %d + %d rows x %d components -> %d targets", solver, train.n_rows,
                0 if val is None else val.n_rows, train.n_features, train.n_targets)
    meta = {
        "data_path": str(Path(cfg.data_path).resolve()),
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "target_slice": list(train.target_slice),
        "seed_config": {k: v for k, v in cfg.values.items() if isinstance(v, (int, float, str, bool))},
        "seed_config_unused": list(cfg.unused),
        "seed_config_unknown": list(cfg.unknown),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    attrs = fit_rows(train, val, solver=solver, device=device, metadata=meta, **options)
    attrs.save(out)
    return attrs, out


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
    """Entry point of ``python -m coar_dask.cli.run_regression``."""
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
