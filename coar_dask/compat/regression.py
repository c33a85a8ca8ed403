"""The seed's ``run_regression.py``, as a library function: seed settings in, attributions file out.

As in the seed, the fit uses the first ``data.num_train + data.num_val``
rows (the seed's final refit on train + validation; the row rule is
:func:`coar_dask.fit.rows.seed_split`), the columns
``data.target_start_ind:target_end_ind``, and writes ``{weight, bias, lam}``
(+ ``metadata``) to ``<cfg.out_dir>/datamodels.pt``. The solver and its
options come from :func:`coar_dask.compat.seed.solver_for`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from coar_dask.compat.seed import SeedRegressionConfig, solver_for
from coar_dask.core.output_paths import check_output_path
from coar_dask.core.store import open_store
from coar_dask.errors import ConfigError, RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.core import fit_sources
from coar_dask.fit.rows import StoreRows, infer_names, seed_split
from coar_dask.formats.beton import BetonRows, inspect_beton
from coar_dask.solvers.rows import ConcatRows, iter_batches

__all__ = ["open_rows", "run_regression", "check_targets_vary", "OUT_FILE"]

logger = logging.getLogger(__name__)

#: File name the seed writes inside ``cfg.out_dir``.
OUT_FILE = "datamodels.pt"


def _beton_rows(cfg: SeedRegressionConfig, path: Path) -> tuple[int, str, Any]:
    n = inspect_beton(path).n_rows
    where = f"{str(path)!r} has only {n} rows; lower them or write more rows into the .beton"

    def make(rows: np.ndarray) -> Any:
        return BetonRows(path, rows=rows, target_slice=(cfg.target_start_ind, cfg.target_end_ind),
                         batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 4))

    return n, where, make


def _store_rows(cfg: SeedRegressionConfig, path: Path, x_name: str | None, y_name: str | None
                ) -> tuple[int, str, Any]:
    if path.is_dir() and not (path / "zarr.json").exists() and any(path.glob("*.npy")):
        raise ConfigError(
            f"{str(path)!r} is a seed store directory of .npy files; convert it first with "
            f"`python -m coar_dask.write_dataset --cfg.data_dir {path} --cfg.out_path "
            f"{path}/component_datasets.beton --cfg.y_name NAME` or `coar-dask import-npy`."
        )
    store = open_store(path, read_only=True)
    x_name, y_name = infer_names(store, x_name, y_name)
    completed = np.flatnonzero(store.completed_rows())
    n = completed.size
    where = f"store {str(path)!r} has only {n} completed rows; lower them or build more rows"
    k = int(np.prod(store.spec[y_name].shape))
    end = k if cfg.target_end_ind == -1 else cfg.target_end_ind

    def make(rows: np.ndarray) -> Any:
        return StoreRows(store, completed[rows], x_name, y_name, (cfg.target_start_ind, end))

    return n, where, make


def open_rows(cfg: SeedRegressionConfig, *, x_name: str | None = None, y_name: str | None = None
              ) -> tuple[Any, Any]:
    """The train and validation row sources of ``cfg.data_path``.

    Train rows are the first ``num_train`` rows, validation rows the next
    ``num_val`` (as the seed's ``make_loaders``; :func:`~coar_dask.fit.rows.seed_split`).
    A ``.beton`` gives :class:`~coar_dask.formats.beton.BetonRows`; a zarr
    store gives :class:`~coar_dask.fit.rows.StoreRows` over its completed
    rows in row order (the rows a ``.beton`` of the store holds, in the same
    order).

    Returns
    -------
    tuple
        ``(train, val)``; ``val`` is ``None`` when ``num_val`` is 0.
    """
    cfg.require("data.data_path")
    path = Path(cfg.data_path)
    n, where, make = _beton_rows(cfg, path) if path.is_file() else _store_rows(cfg, path, x_name, y_name)
    train, val = seed_split(n, cfg.num_train, cfg.num_val, where)
    return make(train), (make(val) if val.size else None)


def check_targets_vary(source: Any, where: str) -> None:
    """Raise :class:`RegressionError` when every target of ``source`` is constant over its rows (e.g.
    the all-zero outputs of a store initialized but never built); stops reading at the first batch
    in which some target varies, so it costs a batch for any real dataset."""
    first = None
    for _, y in iter_batches(source, prefetch=False):
        first = y[0].copy() if first is None else first
        if (y != first).any():
            return
    raise RegressionError(
        f"all {source.n_targets} targets are constant over the {source.n_rows} rows of {where} (e.g. all zero: "
        f"outputs never computed, as when write_dataset --cfg.ignore_completed runs on a store nobody built); "
        f"there is nothing to fit. Build the outputs first (python -m coar_dask.write_dataset without "
        f"--cfg.ignore_completed, or coar-dask build), then run the regression.")


def run_regression(
    cfg: SeedRegressionConfig,
    *,
    x_name: str | None = None,
    y_name: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    solver: str = "auto",
) -> tuple[Attributions, Path]:
    """Run the seed's regression on ``cfg``; return the attributions and the file written.

    Raises
    ------
    ConfigError
        When required settings are missing or ask for what no solver here does.
    """
    cfg.require("data.data_path", "cfg.out_dir")
    solver, options = solver_for(cfg, solver)
    out = Path(cfg.out_dir) / OUT_FILE
    check_output_path(out, overwrite)  # before fitting: a refused output costs nothing
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
    check_targets_vary(train if val is None else ConcatRows(train, val), repr(str(cfg.data_path)))
    attrs = fit_sources(train, val, solver=solver, device=device, metadata=meta, **options)
    out = attrs.save(out, overwrite=overwrite)
    return attrs, out
