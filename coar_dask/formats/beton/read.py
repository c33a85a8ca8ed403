"""Reading a ``.beton``: :func:`inspect_beton` checks a file (the seed's fields,
not truncated), :func:`make_loader` builds FFCV's :class:`~ffcv.loader.Loader`
with the seed's pipelines, and :class:`BetonRows` is a row source for the
regression (on the CPU, or with ``ToDevice`` onto a CUDA GPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from coar_dask.errors import BetonError, BetonNotFoundError
from coar_dask.formats.beton.layout import BLOCK_BYTES, FIELD_IDX, FIELD_X, FIELD_Y, BetonInfo, import_ffcv

__all__ = ["inspect_beton", "make_loader", "BetonRows"]


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
        default = max(1, BLOCK_BYTES // max(row_bytes, 1))
        self.batch_size = int(min(batch_size or default, self.n_rows))
        if self.batch_size <= 0:
            raise BetonError(f"batch_size must be a positive integer; found {batch_size!r}.")
        self.num_workers = int(num_workers)
        self.device = device
        self._loaders: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"<coar_dask.formats.BetonRows {str(self.path)!r}: {self.n_rows} rows, "
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
