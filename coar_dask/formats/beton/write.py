"""Writing a ``.beton``: :func:`export_beton` streams a zarr store (or a seed
directory of ``.npy`` memory maps) into FFCV's own
:class:`~ffcv.writer.DatasetWriter` with the seed's fields
(:mod:`~coar_dask.formats.beton.layout`); each writer process keeps one row
block of the source in memory at a time, never the whole store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coar_dask.core.output_paths import check_output_path, write_atomically
from coar_dask.errors import BetonError, CoarError, CorruptBlockError, StoreError
from coar_dask.formats.beton.layout import BLOCK_BYTES, FIELD_IDX, FIELD_X, FIELD_Y, BetonInfo, import_ffcv

__all__ = ["export_beton"]

logger = logging.getLogger(__name__)

#: Smallest and default page size of FFCV's writer (2 MiB and 8 MiB).
_MIN_PAGE = 1 << 21
_DEFAULT_PAGE = 1 << 23


# --------------------------------------------------------------------------
# Sources: a zarr store or a seed directory of .npy memory maps, read by block
# --------------------------------------------------------------------------
class _Source:
    """Rows of an x and a y array, read one block at a time.

    Instances are created in the parent process and copied into FFCV's writer
    processes; the underlying files are opened lazily in each process
    (:meth:`_handles` checks the pid), so nothing opened before the fork is
    shared.
    """

    kind = "source"

    def __init__(self, path: Path, x_name: str, y_name: str, completed_name: str):
        self.path = Path(path)
        self.x_name, self.y_name, self.completed_name = x_name, y_name, completed_name
        self._pid: int | None = None
        self._h: Any = None

    # subclasses set: n_total, block_rows, x_dtype, x_size, y_size
    def _open(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _handles(self) -> Any:
        if self._pid != os.getpid():
            self._h = self._open()
            self._pid = os.getpid()
        return self._h

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pid"], state["_h"] = None, None
        return state

    def completed(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_block(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {str(self.path)!r}"


class _ZarrSource(_Source):
    kind = "store"

    def __init__(self, store: Any, x_name: str, y_name: str, completed_name: str):
        super().__init__(store.path, x_name, y_name, completed_name)
        spec = store.spec
        for label, name in (("x_name", x_name), ("y_name", y_name)):
            if name not in spec:
                raise StoreError(
                    f"{label}={name!r} is not an array of store {str(store.path)!r}; its arrays "
                    f"are {list(spec.names)}."
                )
        if completed_name != "_completed":
            raise StoreError(
                f"completed_name={completed_name!r}: a zarr store keeps its completion flags in "
                f"'_completed'; drop --cfg.completed_name."
            )
        self.n_total = store.num_rows
        self.block_rows = store.rows_per_chunk
        self.x_dtype = spec[x_name].np_dtype
        self.x_size = int(np.prod(spec[x_name].shape))
        self.y_size = int(np.prod(spec[y_name].shape))

    def _open(self) -> Any:
        from coar_dask.core.store import open_store

        store = open_store(self.path, read_only=True)
        # Opened once per process: looking an array up reads its metadata.
        return store, {n: store.array(n) for n in (self.x_name, self.y_name, "_completed")}

    def completed(self) -> np.ndarray:
        return self._handles()[0].completed_rows()

    def read_block(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Block ``index``; a block with completed rows is checked (chunk files, digests), one that no
        build wrote is read as it is (the seed's ``ignore_completed`` exports such rows)."""
        store, arrays = self._handles()
        start = index * self.block_rows
        stop = min(start + self.block_rows, self.n_total)
        if np.asarray(arrays["_completed"][start:stop]).any():
            data = store.read_verified(index, [self.x_name, self.y_name], arrays=arrays)
            return start, data[self.x_name], data[self.y_name]
        return start, arrays[self.x_name][start:stop], arrays[self.y_name][start:stop]


class _NpySource(_Source):
    """The seed's layout: ``<x_name>.npy``, ``<y_name>.npy``, ``<completed_name>.npy``."""

    kind = "seed store directory"

    def __init__(self, path: Path, x_name: str, y_name: str, completed_name: str):
        super().__init__(path, x_name, y_name, completed_name)
        x, y = self._memmap(x_name), self._memmap(y_name)
        if x.shape[0] != y.shape[0]:
            raise StoreError(
                f"{x_name}.npy has {x.shape[0]} rows but {y_name}.npy has {y.shape[0]} in "
                f"{str(self.path)!r}; both must have one row per model."
            )
        self.n_total = int(x.shape[0])
        self.x_dtype = x.dtype.newbyteorder("=") if x.dtype.byteorder == ">" else x.dtype
        self.x_size = int(np.prod(x.shape[1:]))
        self.y_size = int(np.prod(y.shape[1:]))
        row_bytes = max(1, x.dtype.itemsize * self.x_size + y.dtype.itemsize * self.y_size)
        self.block_rows = int(max(1, min(self.n_total, BLOCK_BYTES // row_bytes)))

    def _memmap(self, name: str) -> np.ndarray:
        file = self.path / f"{name}.npy"
        if not file.is_file():
            found = sorted(p.name for p in self.path.glob("*.npy"))
            raise StoreError(
                f"no {file.name} in {str(self.path)!r} (it holds {found}); pass the array's name "
                f"with --cfg.x_name / --cfg.y_name."
            )
        return np.lib.format.open_memmap(file, mode="r")

    def _open(self) -> Any:
        return {"x": self._memmap(self.x_name), "y": self._memmap(self.y_name)}

    def completed(self) -> np.ndarray:
        done = np.asarray(self._memmap(self.completed_name), dtype=bool).reshape(-1)
        if done.shape[0] != self.n_total:
            raise StoreError(
                f"{self.completed_name}.npy has {done.shape[0]} rows, not {self.n_total}; is it "
                f"from another store?"
            )
        return done

    def read_block(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        h = self._handles()
        start = index * self.block_rows
        stop = min(start + self.block_rows, self.n_total)
        return start, np.asarray(h["x"][start:stop]), np.asarray(h["y"][start:stop])


def _open_source(source: Any, x_name: str, y_name: str | None, completed_name: str) -> _Source:
    from coar_dask.core.store import Store, open_store

    if isinstance(source, Store):
        store = source
    else:
        path = Path(source)
        if (path / "zarr.json").is_file():
            store = open_store(path, read_only=True)
        elif path.is_dir() and any(path.glob("*.npy")):
            if y_name is None:
                raise StoreError(
                    f"{str(path)!r} is a seed store directory; name its output array with "
                    f"y_name (--cfg.y_name), e.g. val_margins."
                )
            return _NpySource(path, x_name, y_name, completed_name)
        else:
            store = open_store(path, read_only=True)  # raises StoreNotFoundError with the fix
    if y_name is None:
        others = [n for n in store.spec.names if n != x_name]
        if len(others) != 1:
            raise StoreError(
                f"cannot tell which array of {str(store.path)!r} holds the outputs among {others}; "
                f"pass y_name (--cfg.y_name)."
            )
        y_name = others[0]
    return _ZarrSource(store, x_name, y_name, completed_name)


def _parse_y_slice(y_slice: Any, k: int) -> tuple[int, int]:
    """Normalise ``y_slice`` (None/-1, an int column, ``(start, stop)`` or a slice)."""
    if y_slice is None or (isinstance(y_slice, (int, np.integer)) and not isinstance(y_slice, bool) and y_slice == -1):
        return 0, k
    if isinstance(y_slice, (int, np.integer)) and not isinstance(y_slice, bool):
        start, stop = int(y_slice), int(y_slice) + 1
    elif isinstance(y_slice, slice):
        if y_slice.step not in (None, 1):
            raise StoreError(f"y_slice must be contiguous (step 1); found {y_slice!r}.")
        start, stop, _ = y_slice.indices(k)
    elif isinstance(y_slice, (tuple, list)) and len(y_slice) == 2:
        start, stop = int(y_slice[0]), int(y_slice[1])
        if stop == -1:
            stop = k
    else:
        raise StoreError(
            f"y_slice must be a column index, (start, stop) or a slice; found {y_slice!r}."
        )
    if not 0 <= start < stop <= k:
        raise StoreError(
            f"y_slice {y_slice!r} selects columns [{start}, {stop}), outside the {k} outputs; "
            f"use an index in 0..{k - 1} (or -1 for all)."
        )
    return start, stop


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------
class _BlockDataset:
    """An indexed dataset for FFCV's writer: item ``i`` is row ``rows[i]``
    as ``(mask, targets, idx)``, served from a one-block cache per process."""

    def __init__(self, source: _Source, rows: np.ndarray, y_cols: tuple[int, int], errors: Path | None = None):
        self.source = source
        self.rows = rows
        self.y_cols = y_cols
        #: Where a writer process records a block it cannot read: FFCV's writer waits forever
        #: for rows of a process that raised, so the process writes zeros and the parent refuses.
        self.errors = errors
        self._block = -1
        self._start = 0
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_block=-1, _x=None, _y=None)
        return state

    def __len__(self) -> int:
        return int(self.rows.size)

    def _load(self, block: int) -> None:
        start, x, y = self.source.read_block(block)
        n = x.shape[0]
        s0, s1 = self.y_cols
        self._x = np.ascontiguousarray(np.asarray(x).reshape(n, -1), dtype=self.source.x_dtype)
        self._y = np.ascontiguousarray(np.asarray(y).reshape(n, -1)[:, s0:s1], dtype=np.float32)
        self._block, self._start = block, start

    def _fail(self, block: int, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, CoarError) else (
            f"block {block} of {self.source.describe()} cannot be read ({type(exc).__name__}: {exc}); run "
            f"`coar-dask verify` on it, then `coar-dask repair`.")
        if self.errors is None:
            raise exc
        with open(self.errors, "a") as f:
            f.write(message.replace("\n", " ") + "\n")
        start = block * self.source.block_rows
        n = min(start + self.source.block_rows, self.source.n_total) - start
        self._x = np.zeros((n, self.source.x_size), dtype=self.source.x_dtype)
        self._y = np.zeros((n, self.y_cols[1] - self.y_cols[0]), dtype=np.float32)
        self._block, self._start = block, start

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        row = int(self.rows[i])
        block = row // self.source.block_rows
        if block != self._block:
            try:
                self._load(block)
            except Exception as exc:  # noqa: BLE001 - any failure is reported by the parent, see errors
                self._fail(block, exc)
        local = row - self._start
        return self._x[local], self._y[local], row


def _page_size(row_bytes: int, n_rows: int, workers: int) -> int:
    """FFCV's default 8 MiB pages, smaller for small exports (each writer
    process pads its last page), larger when one row would not fit."""
    need = 1 << max(0, int(row_bytes) - 1).bit_length()
    per_worker = (n_rows * row_bytes) // max(workers, 1)
    size = _DEFAULT_PAGE if per_worker >= _DEFAULT_PAGE else _MIN_PAGE
    return max(size, need)


def export_beton(
    source: Any,
    out_path: str | os.PathLike,
    *,
    x_name: str = "masks",
    y_name: str | None = None,
    ignore_completed: bool = False,
    y_slice: int | tuple[int, int] | slice | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    completed_name: str = "_completed",
    num_workers: int | None = None,
    page_size: int | None = None,
    overwrite: bool = False,
) -> BetonInfo:
    """Stream a store's rows into an FFCV ``.beton`` with the seed's fields.

    Parameters
    ----------
    source
        A :class:`~coar_dask.core.store.Store`, a store path, or a seed store
        directory of ``.npy`` memory maps (``masks.npy``, ``<y_name>.npy``,
        ``_completed.npy``).
    out_path
        The ``.beton`` to write, through a temporary file renamed into place
        (:func:`~coar_dask.core.output_paths.write_atomically`): never over a
        store's own files nor a non-regular file, and over an existing file
        only with ``overwrite`` (the command line's ``--overwrite``).
    x_name, y_name
        The mask array (field ``mask``, its own dtype) and the output array
        (field ``targets``, written as float32). ``y_name`` is inferred for a
        zarr store with two arrays.
    ignore_completed
        Write every row, completed or not (the seed's ``--cfg.ignore_completed``).
        By default only completed rows are written, in row order. Unlike the
        seed, the completed rows are not rounded down to a multiple of 2,000.
        As in the seed, rows never built are written as they read (zeros);
        a warning gives their number (:attr:`BetonInfo.n_incomplete`).
    y_slice
        Keep only some output columns: a column index (the seed's
        ``--cfg.y_slice``; ``-1`` = all), ``(start, stop)`` or a slice.
    rows
        Write exactly these rows (sorted first), instead of the completed ones.
    completed_name
        Name of the completion array of a seed directory.
    num_workers
        Writer processes (default: every core).
    page_size
        FFCV page size in bytes (a power of two >= 2 MiB); chosen from the
        data size by default.

    Returns
    -------
    BetonInfo
        What was written.

    Examples
    --------
    >>> info = export_beton("store", "store/component_datasets.beton",
    ...                     y_name="val_margins")                 # doctest: +SKIP
    >>> info.n_rows, info.n_features, info.n_targets              # doctest: +SKIP
    (50000, 2304, 10000)
    """
    out_path = check_output_path(out_path, overwrite)  # before reading anything
    ffcv = import_ffcv("Writing a .beton")
    src = _open_source(source, x_name, y_name, completed_name)
    y_cols = _parse_y_slice(y_slice, src.y_size)
    n_incomplete = 0
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= src.n_total):
            raise StoreError(f"rows must lie in 0..{src.n_total - 1}; found {rows[0]}..{rows[-1]}.")
    elif ignore_completed:
        rows = np.arange(src.n_total, dtype=np.int64)
        n_incomplete = int(src.n_total - np.count_nonzero(src.completed()))
        if n_incomplete:
            logger.warning("ignore_completed: %d of %d rows written were never completed (they hold zeros, "
                           "as in the research code)", n_incomplete, src.n_total)
    else:
        rows = np.flatnonzero(src.completed()).astype(np.int64)
    if rows.size == 0:
        raise StoreError(
            f"{src.describe()} has no completed rows to write; build some first, or pass "
            f"ignore_completed=True (--cfg.ignore_completed) to write every row."
        )
    workers = int(num_workers or os.cpu_count() or 1)
    workers = max(1, min(workers, -(-rows.size // src.block_rows)))
    n_targets = y_cols[1] - y_cols[0]
    row_bytes = src.x_dtype.itemsize * src.x_size + 4 * n_targets
    page = int(page_size or _page_size(row_bytes, int(rows.size), workers))
    fields = {
        FIELD_X: ffcv.NDArrayField(dtype=np.dtype(src.x_dtype), shape=(src.x_size,)),
        FIELD_Y: ffcv.NDArrayField(dtype=np.dtype("float32"), shape=(n_targets,)),
        FIELD_IDX: ffcv.IntField(),
    }
    logger.info(
        "writing %d rows of %s (%s x %d, %s columns %d:%d) to %s with %d processes",
        rows.size, src.describe(), src.x_name, src.x_size, src.y_name, y_cols[0], y_cols[1],
        out_path, workers,
    )
    dataset = _BlockDataset(src, rows, y_cols)
    write_atomically(out_path, lambda tmp: _write(ffcv, tmp, fields, page, workers, dataset, out_path),
                     overwrite=overwrite)
    return BetonInfo(
        path=out_path,
        n_rows=int(rows.size),
        n_features=src.x_size,
        n_targets=n_targets,
        x_dtype=np.dtype(src.x_dtype).name,
        fields=tuple(fields),
        n_incomplete=n_incomplete,
    )


def _write(ffcv: Any, tmp: Path, fields: dict[str, Any], page: int, workers: int, dataset: _BlockDataset,
           out_path: Path) -> None:
    """Run FFCV's writer into ``tmp``; raise (and remove ``tmp``) when a writer process could not read a block."""
    errors = tmp.with_name(tmp.name + ".errors")
    errors.unlink(missing_ok=True)
    dataset.errors = errors
    try:
        writer = ffcv.DatasetWriter(str(tmp), fields, page_size=page, num_workers=workers)
    except ValueError as exc:
        raise BetonError(f"cannot write {str(out_path)!r}: {exc} (page_size={page}).") from None
    try:
        # Chunks of one store block keep each writer process on one cached block.
        writer.from_indexed_dataset(dataset, chunksize=dataset.source.block_rows)
        failed = errors.read_text().splitlines() if errors.exists() else []
    finally:
        errors.unlink(missing_ok=True)
    if failed:
        tmp.unlink(missing_ok=True)
        more = f" (and {len(failed) - 1} more block(s))" if len(failed) > 1 else ""
        raise CorruptBlockError(f"{str(out_path)!r} was not written: {failed[0]}{more}")
