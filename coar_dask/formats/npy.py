"""The research code's store layout: a directory of ``.npy`` memory maps.

The seed (and its parent, ``datamodels``) keeps a store as one ``.npy`` file
per schema array, ``<name>.npy`` of shape ``(num_models, *shape)``, plus
``_completed.npy`` (bool, ``(num_models,)``). :func:`import_npy` copies such a
directory into a zarr store and :func:`export_npy` writes a zarr store back
to that layout. Both go one row block at a time through memory maps, so a
200,000-row store never has to fit in memory, and ``export_npy`` followed by
``import_npy`` gives the same arrays back.

``coar-dask import-npy`` and ``coar-dask export-npy`` (:mod:`coar_dask.cli.npy`)
run them from the command line.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coar_dask.errors import ConfigError, StoreError
from coar_dask.core.output_paths import check_output_path, os_error_message
from coar_dask.core.spec import Spec
from coar_dask.core.store import COMPLETED, Store, init_store, open_store

__all__ = ["npy_spec", "import_npy", "export_npy"]

logger = logging.getLogger(__name__)


def _dtype_name(dtype: np.dtype, file: Path) -> str:
    """The numpy attribute name of ``dtype`` as the seed's spec writes it."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return "bool_"
    name = dtype.newbyteorder("=").name
    if dtype.kind not in "iuf" or not hasattr(np, name):
        raise StoreError(
            f"{str(file)!r} has dtype {dtype}, which a store cannot hold; stores hold numpy "
            f"bool, integer and float arrays."
        )
    return name


def _memmap(file: Path) -> np.ndarray:
    try:
        return np.lib.format.open_memmap(file, mode="r")
    except (ValueError, OSError) as exc:
        raise StoreError(f"{str(file)!r} is not a readable .npy file ({exc}).") from None


def npy_spec(directory: str | os.PathLike, names: Sequence[str] | None = None,
             completed_name: str = COMPLETED) -> Spec:
    """The spec of a seed store directory, read from its ``.npy`` headers.

    Parameters
    ----------
    directory
        A directory with ``<name>.npy`` files (and ``_completed.npy``).
    names
        The arrays to take (default: every ``.npy`` except the completion flags).

    Examples
    --------
    >>> spec = npy_spec("seed_store")                         # doctest: +SKIP
    >>> spec.to_dict()                                        # doctest: +SKIP
    {'num_models': 100, 'schema': {'masks': {'dtype': 'bool_', 'shape': [2304]}, ...}}
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreError(f"{str(directory)!r} is not a directory; pass a seed store directory.")
    available = sorted(p.stem for p in directory.glob("*.npy") if p.stem != completed_name)
    if names is None:
        names = available
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise StoreError(
            f"{str(directory)!r} has no {[f'{n}.npy' for n in missing] or 'schema .npy files'}; "
            f"it has {[f'{n}.npy' for n in available]}."
        )
    schema: dict[str, Any] = {}
    rows: dict[str, int] = {}
    for name in names:
        file = directory / f"{name}.npy"
        arr = _memmap(file)
        if arr.ndim < 1:
            raise StoreError(f"{str(file)!r} is a scalar; a store array has one row per model.")
        schema[name] = {"dtype": _dtype_name(arr.dtype, file), "shape": list(arr.shape[1:])}
        rows[name] = int(arr.shape[0])
    if len(set(rows.values())) != 1:
        raise StoreError(
            f"the arrays of {str(directory)!r} have different row counts {rows}; every array "
            f"must have one row per model."
        )
    return Spec.from_dict({"num_models": next(iter(rows.values())), "schema": schema})


def import_npy(
    directory: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    completed_name: str = COMPLETED,
    mark_all_completed: bool = False,
    rows_per_chunk: int | None = None,
    mask_seed: int | None = None,
    alpha: float | None = None,
    overwrite: bool = False,
) -> Store:
    """Copy a seed store directory into a new zarr store, block by block.

    Parameters
    ----------
    directory
        The seed directory (``masks.npy``, ``<name>.npy``, ``_completed.npy``).
    store_path
        Where to create the zarr store.
    names
        Arrays to import (default all).
    completed_name
        Name of the completion array (``_completed``).
    mark_all_completed
        Mark every row completed; needed when the directory has no
        ``_completed.npy``.
    rows_per_chunk, mask_seed, alpha
        As for :func:`~coar_dask.core.store.init_store`. The seed drew its masks
        without a seed, so leave ``mask_seed`` unset unless you know it.
    overwrite
        Replace an existing store at ``store_path``.

    Returns
    -------
    Store
        The new store, with the same rows, values and completion flags.
    """
    directory = Path(directory)
    spec = npy_spec(directory, names, completed_name)
    completed_file = directory / f"{completed_name}.npy"
    if not completed_file.is_file() and not mark_all_completed:
        raise StoreError(
            f"{str(directory)!r} has no {completed_file.name}, so which rows are done is unknown; "
            f"pass mark_all_completed=True (--mark-all-completed) if every row is filled."
        )
    store_path = Path(store_path)
    if (store_path / "zarr.json").exists():
        if not overwrite:
            raise StoreError(
                f"{str(store_path)!r} already holds a store; choose a new path or pass "
                f"overwrite=True (--overwrite) to replace it."
            )
        open_store(store_path)  # only a coar_dask store is replaced: another tool's zarr group is refused
        shutil.rmtree(store_path)
    store = init_store(
        store_path, spec, rows_per_chunk=rows_per_chunk, mask_seed=mask_seed, alpha=alpha,
        extra_meta={"imported_from": str(directory.resolve())},
    )
    done = None
    if completed_file.is_file():
        done = _memmap(completed_file)
        if done.reshape(-1).shape[0] != spec.num_models:
            raise StoreError(
                f"{str(completed_file)!r} has {done.shape[0]} rows but the arrays have "
                f"{spec.num_models}; is it from another store?"
            )
        done = done.reshape(-1)
    sources = {a.name: _memmap(directory / f"{a.name}.npy") for a in spec.schema}
    for block in store.blocks():
        sl = slice(block.start, block.stop)
        # Reading a row range of a memory map touches only those pages. Each block goes through
        # write_block, so its digest is recorded and readers check it as for a built store.
        store.write_block(block.index, {a.name: np.asarray(sources[a.name][sl]) for a in spec.schema},
                          completed=None if done is None else np.asarray(done[sl], dtype=bool))
    logger.info("imported %s into %s (%d rows, %d blocks)", directory, store_path,
                spec.num_models, store.n_blocks)
    return open_store(store_path)


def export_npy(
    store: Store | str | os.PathLike,
    directory: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a zarr store as a seed store directory of ``.npy`` files.

    Each array becomes ``<name>.npy`` (the store's dtype and shape) and the
    completion flags ``_completed.npy``, written block by block through
    memory maps, so the seed's scripts (``write_dataset.py``,
    ``make_dataset.py``) can use the directory directly.

    Returns
    -------
    pathlib.Path
        ``directory``.
    """
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    names = list(store.spec.names if names is None else names)
    for n in names:
        store.array(n)  # raises StoreError naming the store's arrays
    directory = Path(directory)
    targets = {n: directory / f"{n}.npy" for n in [*names, COMPLETED]}
    try:
        for target in targets.values():  # every file checked before any is written
            check_output_path(target, overwrite)
    except ConfigError as exc:  # this module's errors are StoreErrors
        raise StoreError(str(exc)) from None
    try:
        _write_npy(store, directory, targets)
    except OSError as exc:
        raise StoreError(os_error_message(exc, directory)) from None
    logger.info("exported %s to %s (%d rows)", store.path, directory, store.num_rows)
    return directory


def _write_npy(store: Store, directory: Path, targets: dict[str, Path]) -> None:
    """Write each array into a temporary ``.npy`` beside its target, block by block, then rename them all."""
    directory.mkdir(parents=True, exist_ok=True)
    n = store.num_rows
    tmps = {name: t.with_name(f".{t.stem}.partial.npy") for name, t in targets.items()}
    try:
        outs = {}
        for name, tmp in tmps.items():
            dtype, shape = ((np.bool_, (n,)) if name == COMPLETED
                            else (store.spec[name].np_dtype, (n, *store.spec[name].shape)))
            outs[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            with open(tmp, "r+b") as f:  # the space up front: a full disk is then an error, not a SIGBUS
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        for block in store.blocks():
            sl = slice(block.start, block.stop)
            for name, out in outs.items():
                out[sl] = store.array(name)[sl]
        for out in outs.values():
            out.flush()
        del outs
        for name, tmp in tmps.items():
            os.replace(tmp, targets[name])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
