"""FFCV ``.beton`` files: stream a store into one, and read one back as row blocks.

The research code fits its regressions from an FFCV ``.beton`` with three
fields per row, and this module writes and reads exactly that layout:

======== ============================== =================================
field    FFCV field                     content
======== ============================== =================================
mask     ``NDArrayField(x dtype, (P,))`` the mask row (bool, True = kept)
targets  ``NDArrayField(float32, (K,))`` the outputs of that row
idx      ``IntField``                   the row's index in the store
======== ============================== =================================

so a file written here loads with the seed's loader pipeline
(``NDArrayDecoder``/``IntDecoder``, ``ToTensor``), and a file written by the
seed's ``write_dataset.py`` reads here.

:func:`export_beton` streams a zarr store (or a seed directory of ``.npy``
memory maps) into FFCV's own :class:`~ffcv.writer.DatasetWriter`: each writer
process keeps one row block of the source in memory at a time, never the
whole store. :class:`BetonRows` reads a ``.beton`` back through FFCV's
:class:`~ffcv.loader.Loader` (on the CPU, or with ``ToDevice`` onto a CUDA
GPU) and is a *row source* for :mod:`coar_dask.fit.fit`: it has
``n_rows``, ``n_features``, ``n_targets`` and ``blocks()`` yielding ``(X, Y)``
float32 numpy blocks.

FFCV is optional (``pip install 'coar_dask[ffcv]'``, after Debian's
``libopencv-dev libturbojpeg0-dev pkg-config``) and imported only when a
function here needs it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import numpy as np

from coar_dask.core.output_paths import check_output_path, write_atomically
from coar_dask.errors import (BetonError, BetonNotFoundError, CoarError, CorruptBlockError, MissingDependencyError,
                              StoreError, missing_dependency)

__all__ = [
    "BetonError",
    "BetonNotFoundError",
    "BetonInfo",
    "BetonRows",
    "export_beton",
    "inspect_beton",
    "make_loader",
    "import_ffcv",
    "FIELD_X",
    "FIELD_Y",
    "FIELD_IDX",
    "FFCV_INSTALL",
]

logger = logging.getLogger(__name__)

#: The seed's field names.
FIELD_X, FIELD_Y, FIELD_IDX = "mask", "targets", "idx"

#: How to install FFCV, quoted in the error raised when it is missing.
FFCV_INSTALL = (
    "FFCV compiles from source against OpenCV and libjpeg-turbo: on Debian/Ubuntu run "
    "`apt-get install -y libopencv-dev libturbojpeg0-dev pkg-config`, then "
    "`pip install 'coar_dask[ffcv]'` (= ffcv==1.0.2 pillow numba opencv-python setuptools)."
)

#: Smallest and default page size of FFCV's writer (2 MiB and 8 MiB).
_MIN_PAGE = 1 << 21
_DEFAULT_PAGE = 1 << 23
#: Target size of one block read from an ``.npy`` source, and of one loader batch.
_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------
# Lazy import of FFCV
# --------------------------------------------------------------------------
_FFCV: SimpleNamespace | None = None


def import_ffcv(purpose: str = "Reading and writing .beton files") -> SimpleNamespace:
    """Import the parts of FFCV used here, once; raise a helpful error if it is missing.

    Importing FFCV sets torch's (and numba's) thread count to 1 for the whole
    process; the previous torch thread count is restored here.

    Returns
    -------
    types.SimpleNamespace
        ``DatasetWriter``, ``NDArrayField``, ``IntField``, ``NDArrayDecoder``,
        ``IntDecoder``, ``Loader``, ``OrderOption``, ``ToTensor``,
        ``ToDevice``, ``Squeeze``, ``Reader``, ``ALLOC_TABLE_TYPE``, ``HeaderType``.

    Raises
    ------
    MissingDependencyError
        When FFCV (or one of its undeclared dependencies) cannot be imported.
    """
    global _FFCV
    if _FFCV is not None:
        return _FFCV
    import torch

    threads = torch.get_num_threads()
    try:
        from ffcv.fields import IntField, NDArrayField
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor
        from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
        from ffcv.writer import DatasetWriter
    except ImportError as exc:
        base = missing_dependency("ffcv", "ffcv", purpose)
        raise MissingDependencyError(
            f"{base} {FFCV_INSTALL} (The import failed with: {exc})"
        ) from exc
    finally:
        torch.set_num_threads(threads)
    _FFCV = SimpleNamespace(
        DatasetWriter=DatasetWriter,
        NDArrayField=NDArrayField,
        IntField=IntField,
        NDArrayDecoder=NDArrayDecoder,
        IntDecoder=IntDecoder,
        Loader=Loader,
        OrderOption=OrderOption,
        ToTensor=ToTensor,
        ToDevice=ToDevice,
        Squeeze=Squeeze,
        Reader=Reader,
        ALLOC_TABLE_TYPE=ALLOC_TABLE_TYPE,
        HeaderType=HeaderType,
    )
    return _FFCV


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
        self.block_rows = int(max(1, min(self.n_total, _BLOCK_BYTES // row_bytes)))

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


@dataclass(frozen=True)
class BetonInfo:
    """What a ``.beton`` holds: rows, mask width, target width and its fields."""

    path: Path
    n_rows: int
    n_features: int
    n_targets: int
    x_dtype: str
    fields: tuple[str, ...]
    #: Rows written that were never completed (``ignore_completed``: zeros, as in the seed).
    n_incomplete: int = 0

    @property
    def nbytes(self) -> int:
        """Size of the file in bytes."""
        return self.path.stat().st_size


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


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------
def _reader(path: Path) -> Any:
    ffcv = import_ffcv("Reading a .beton")
    if not path.is_file():
        raise BetonNotFoundError(
            f"no .beton file at {str(path)!r}; write one with `python -m coar_dask.write_dataset "
            f"--cfg.data_dir STORE --cfg.out_path {path} --cfg.y_name NAME` or export_beton()."
        )
    try:
        reader = ffcv.Reader(str(path))
    except Exception as exc:  # noqa: BLE001 - FFCV raises AssertionError/ValueError/IndexError on bad files
        raise BetonError(
            f"{str(path)!r} is not a .beton file FFCV 1.0 can read ({type(exc).__name__}: {exc}); "
            f"write it again with export_beton() or the seed's write_dataset.py."
        ) from None
    problem = _truncation(ffcv, path, reader)
    if problem:
        raise BetonError(
            f"{str(path)!r} is truncated or was not finished ({problem}); FFCV would read it as if whole. "
            f"Write it again with export_beton() or `python -m coar_dask.write_dataset`."
        )
    return reader


def _truncation(ffcv: Any, path: Path, reader: Any) -> str | None:
    """Why the file is shorter than its header and allocation table say, or ``None`` when it is whole.

    A ``.beton`` is: header, field descriptors, per-sample metadata, data
    pages, then the allocation table (24 bytes per allocation) to the end of
    the file, at ``alloc_table_ptr``; every array field's sample points at one
    allocation that lies before the table.
    """
    size = path.stat().st_size
    n = int(reader.num_samples)
    table_at = int(reader.header["alloc_table_ptr"])
    data_start = ffcv.HeaderType.itemsize + reader.field_descriptors.nbytes + n * reader.metadata_type.itemsize
    if len(reader.metadata) != n or not data_start <= table_at <= size:
        return f"{size} bytes, but its header needs {max(data_start, table_at)} before the allocation table"
    entry = ffcv.ALLOC_TABLE_TYPE.itemsize
    if (size - table_at) % entry:
        return f"its allocation table of {size - table_at} bytes is not a whole number of {entry}-byte entries"
    table = reader.alloc_table
    if table.size and int((table["ptr"] + table["size"]).max()) > table_at:
        return "an allocation reaches past the start of the allocation table"
    columns = reader.metadata.dtype.names  # one unnamed column per field, in field order
    for column, (name, handler) in zip(columns, reader.handlers.items()):
        if isinstance(handler, ffcv.NDArrayField) and n:
            missing = int((~np.isin(reader.metadata[column], table["ptr"])).sum())
            if missing:
                return f"{missing} of {n} rows of field {name!r} have no entry in its allocation table"
    return None


def inspect_beton(
    path: str | os.PathLike, *, x_field: str = FIELD_X, y_field: str = FIELD_Y
) -> BetonInfo:
    """Check that a ``.beton`` has the seed's fields and describe it.

    Raises
    ------
    BetonNotFoundError
        When there is no file at ``path``.
    BetonError
        When it is not a ``.beton``, or lacks the ``mask``/``targets`` arrays.
    """
    ffcv = import_ffcv("Reading a .beton")
    path = Path(path)
    reader = _reader(path)
    handlers = reader.handlers
    found = {name: type(h).__name__ for name, h in handlers.items()}
    for name in (x_field, y_field):
        h = handlers.get(name)
        if h is None or not isinstance(h, ffcv.NDArrayField):
            raise BetonError(
                f"{str(path)!r} has no array field {name!r}; it has fields {found}. A component "
                f"dataset .beton needs NDArrayFields {x_field!r} (masks) and {y_field!r} "
                f"(outputs) and an IntField 'idx', as written by export_beton() or the seed's "
                f"write_dataset.py."
            )
    if FIELD_IDX in handlers and not isinstance(handlers[FIELD_IDX], ffcv.IntField):
        raise BetonError(
            f"field 'idx' of {str(path)!r} is a {found[FIELD_IDX]}, not an IntField; it has "
            f"fields {found}."
        )
    return BetonInfo(
        path=path,
        n_rows=int(reader.num_samples),
        n_features=int(np.prod(handlers[x_field].shape)),
        n_targets=int(np.prod(handlers[y_field].shape)),
        x_dtype=np.dtype(handlers[x_field].dtype).name,
        fields=tuple(handlers),
    )


def _resolve_device(device: Any) -> Any:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BetonError(f"device {str(dev)!r} was asked for but torch sees no CUDA GPU; use 'cpu'.")
    return dev


def make_loader(
    path: str | os.PathLike,
    *,
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
    device: Any = "cpu",
    num_workers: int = 1,
    order: str = "sequential",
    drop_last: bool = False,
    seed: int | None = None,
    x_field: str = FIELD_X,
    y_field: str = FIELD_Y,
) -> Any:
    """An FFCV :class:`~ffcv.loader.Loader` over a component dataset ``.beton``.

    The pipelines are the seed's: ``NDArrayDecoder, ToTensor`` for ``mask``
    and ``targets`` and ``IntDecoder, ToTensor, Squeeze`` for ``idx``, each
    followed by ``ToDevice`` when ``device`` is a CUDA device. Batches are
    ``(mask, targets, idx)`` tensors in reused buffers: copy what you keep.
    The caller's torch thread count is restored after construction (FFCV sets
    it to ``num_workers``), but iterating sets it again.

    Parameters
    ----------
    order
        ``"sequential"`` (row order, as given by ``indices``) or ``"random"``
        (the seed's SAGA order).
    """
    import torch

    ffcv = import_ffcv("Reading a .beton")
    dev = _resolve_device(device)
    info = inspect_beton(path, x_field=x_field, y_field=y_field)
    to_dev = [ffcv.ToDevice(dev)] if dev.type == "cuda" else []
    pipelines: dict[str, Any] = {
        x_field: [ffcv.NDArrayDecoder(), ffcv.ToTensor(), *to_dev],
        y_field: [ffcv.NDArrayDecoder(), ffcv.ToTensor(), *([ffcv.ToDevice(dev)] if to_dev else [])],
    }
    if FIELD_IDX in info.fields:
        pipelines[FIELD_IDX] = [
            ffcv.IntDecoder(), ffcv.ToTensor(), ffcv.Squeeze(),
            *([ffcv.ToDevice(dev)] if to_dev else []),
        ]
    for other in info.fields:
        pipelines.setdefault(other, None)
    orders = {"sequential": ffcv.OrderOption.SEQUENTIAL, "random": ffcv.OrderOption.RANDOM}
    if order not in orders:
        raise BetonError(f"order must be one of {sorted(orders)}; found {order!r}.")
    import numba

    # numba refuses more threads than it started with (the core count).
    workers = max(1, min(int(num_workers), int(numba.config.NUMBA_NUM_THREADS)))
    threads = torch.get_num_threads()
    try:
        return ffcv.Loader(
            str(path),
            batch_size=int(batch_size),
            num_workers=workers,
            order=orders[order],
            indices=None if indices is None else np.asarray(indices, dtype=np.int64),
            drop_last=drop_last,
            seed=seed,
            os_cache=True,
            pipelines=pipelines,
        )
    finally:
        torch.set_num_threads(threads)


class BetonRows:
    """A row source over a ``.beton``: the regression reads it like a store.

    Parameters
    ----------
    path
        A component dataset ``.beton`` (fields ``mask``, ``targets``, ``idx``).
    rows
        Positions in the file to read (0-based, in this order); default all.
        The seed's ``num_train`` rows are ``range(num_train)``.
    target_slice
        ``(start, stop)`` of the target columns to keep (``stop=-1``: to the
        end), like the seed's ``data.target_start_ind``/``target_end_ind``.
    batch_size
        Rows per block; by default about 64 MiB of decoded rows.
    num_workers
        FFCV decoding threads.
    device
        Where :meth:`torch_blocks` puts its tensors: ``None`` = CUDA when
        available (FFCV's ``ToDevice``), else the CPU. :meth:`blocks` always
        yields numpy arrays.

    Attributes
    ----------
    n_rows, n_features, n_targets : int
        The row source interface of :class:`coar_dask.solvers.base.RowSource`.
    idx_available : bool
        Whether the file has the ``idx`` field (store row of each position).

    Notes
    -----
    Each source compiles one FFCV loader per device on first use (~1 s) and
    reuses it; a copy made by pickling compiles its own. When a loader is
    freed after another compiled the same kernels, numba (0.68) may print
    "Exception ignored ... KeyError" from a finalizer: harmless.

    Examples
    --------
    >>> src = BetonRows("component_datasets.beton", rows=range(45_000))  # doctest: +SKIP
    >>> for X, Y in src.blocks(): ...                                    # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rows: Sequence[int] | np.ndarray | None = None,
        *,
        target_slice: tuple[int, int] | None = None,
        batch_size: int | None = None,
        num_workers: int = 1,
        device: Any = None,
        x_field: str = FIELD_X,
        y_field: str = FIELD_Y,
    ):
        self.path = Path(path)
        self.info = inspect_beton(self.path, x_field=x_field, y_field=y_field)
        self.x_field, self.y_field = x_field, y_field
        n = self.info.n_rows
        if rows is None:
            positions = np.arange(n, dtype=np.int64)
        else:
            positions = np.asarray(rows, dtype=np.int64).reshape(-1)
            if positions.size and (positions.min() < 0 or positions.max() >= n):
                raise BetonError(
                    f"rows must be positions 0..{n - 1} of {str(self.path)!r} ({n} rows); found "
                    f"{int(positions.min())}..{int(positions.max())}. Lower num_train/num_val or "
                    f"write more rows into the .beton."
                )
        if positions.size == 0:
            raise BetonError(f"no rows selected from {str(self.path)!r}; it has {n} rows.")
        self.rows = positions
        k = self.info.n_targets
        start, stop = (0, k) if target_slice is None else (int(target_slice[0]), int(target_slice[1]))
        if stop == -1:
            stop = k
        if not 0 <= start < stop <= k:
            raise BetonError(
                f"target slice [{start}, {stop}) is outside the {k} targets of {str(self.path)!r}."
            )
        self.target_slice = (start, stop)
        self.n_rows = int(positions.size)
        self.n_features = self.info.n_features
        self.n_targets = stop - start
        self.idx_available = FIELD_IDX in self.info.fields
        row_bytes = self.info.n_features * np.dtype(self.info.x_dtype).itemsize + 4 * k
        default = max(1, _BLOCK_BYTES // max(row_bytes, 1))
        self.batch_size = int(min(batch_size or default, self.n_rows))
        if self.batch_size <= 0:
            raise BetonError(f"batch_size must be a positive integer; found {batch_size!r}.")
        self.num_workers = int(num_workers)
        self.device = device
        self._loaders: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"<coar_dask.BetonRows {str(self.path)!r}: {self.n_rows} rows, "
            f"{self.n_features} features, {self.n_targets} targets>"
        )

    def __getstate__(self) -> dict[str, Any]:
        # FFCV loaders hold compiled code and threads: rebuild them after unpickling.
        state = dict(self.__dict__)
        state["_loaders"] = {}
        return state

    def _loader(self, device: Any) -> Any:
        key = str(device)
        if key not in self._loaders:
            self._loaders[key] = make_loader(
                self.path,
                batch_size=self.batch_size,
                indices=self.rows,
                device=device,
                num_workers=self.num_workers,
                x_field=self.x_field,
                y_field=self.y_field,
            )
        return self._loaders[key]

    def _iterate(self, device: Any) -> Iterator[tuple[Any, Any, Any]]:
        import torch

        threads = torch.get_num_threads()
        loader = self._loader(device)
        s0, s1 = self.target_slice
        start = 0
        try:
            for batch in loader:
                x, y = batch[0], batch[1]
                n = x.shape[0]
                if self.idx_available:
                    idx = batch[2]
                else:
                    idx = torch.as_tensor(self.rows[start : start + n], device=x.device)
                start += n
                yield idx, x, y[:, s0:s1]
        finally:
            torch.set_num_threads(threads)

    def indexed_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(idx, X, Y)`` numpy blocks: store row indices (or file
        positions when the file has no ``idx``), masks as stored (e.g. bool)
        and float32 targets. The arrays are copies, safe to keep."""
        for idx, x, y in self._iterate("cpu"):
            yield idx.numpy().copy(), x.numpy().copy(), y.numpy().copy()

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(X, Y)`` float32 numpy blocks, ``X`` (b, P) 0/1 and ``Y`` (b, K)."""
        for _, x, y in self._iterate("cpu"):
            yield x.numpy().astype(np.float32), np.array(y.numpy(), dtype=np.float32)

    def torch_blocks(self, device: Any = None) -> Iterator[tuple[Any, Any, Any]]:
        """Yield ``(idx, X, Y)`` torch tensors on ``device`` (default: this
        source's device; CUDA via FFCV's ``ToDevice`` when available).
        ``X`` keeps the stored dtype; the tensors are copies, safe to keep."""
        dev = _resolve_device(self.device if device is None else device)
        for idx, x, y in self._iterate(dev):
            yield idx.clone(), x.clone(), y.clone()
