"""Zarr stores of component datasets: create, open, row blocks, completion.

A store is a zarr v3 group. Every schema array has shape ``(num_models,
*shape)`` and is chunked by ``rows_per_chunk`` rows (full width), and
``_completed`` is a bool array of shape ``(num_models,)`` with the same row
chunking. So row block ``b`` (rows ``b * rows_per_chunk`` up to the next
multiple) is exactly one chunk of every array: one build task owns it, and
tasks never need a lock.

The group's ``coar_dask`` attribute keeps the spec, its sha256, the chunking,
the mask seed and alpha (when given), the experiment fingerprint once a build
has started, and the package and format versions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from coar_dask._version import FORMAT_VERSION, __version__
from coar_dask.errors import StoreError, StoreMismatchError, StoreNotFoundError
from coar_dask.core.spec import Spec, load_spec

__all__ = [
    "Block",
    "Store",
    "init_store",
    "open_store",
    "default_rows_per_chunk",
    "COMPLETED",
]

logger = logging.getLogger(__name__)

COMPLETED = "_completed"
_ATTR = "coar_dask"
#: Target for the uncompressed size of one chunk of the widest array.
_CHUNK_BYTES_TARGET = 64 * 2**20
_MAX_ROWS_PER_CHUNK = 100


def default_rows_per_chunk(spec: Spec) -> int:
    """Rows per block: at most 100 (a block is one task of seconds to minutes)
    and small enough that a chunk of the widest array stays under 64 MiB."""
    widest = max(a.row_nbytes for a in spec.schema)
    by_bytes = max(1, _CHUNK_BYTES_TARGET // max(widest, 1))
    return int(max(1, min(_MAX_ROWS_PER_CHUNK, by_bytes, spec.num_models)))


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` of a store: one chunk of every array."""

    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.start, self.stop)


def _open_group(path: Path, mode: str):
    import zarr

    return zarr.open_group(store=str(path), mode=mode, zarr_format=3)


class Store:
    """An opened coar_dask store. Build one with :func:`init_store` or :func:`open_store`."""

    def __init__(self, path: Path, group: Any, meta: Mapping[str, Any]):
        self.path = Path(path)
        self._group = group
        self._meta = dict(meta)
        self.spec = Spec.from_dict(meta["spec"])
        self.rows_per_chunk = int(meta["rows_per_chunk"])

    # -- metadata ---------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the store's ``coar_dask`` attributes."""
        return dict(self._meta)

    @property
    def num_rows(self) -> int:
        return self.spec.num_models

    @property
    def mask_seed(self) -> int | None:
        return self._meta.get("mask_seed")

    @property
    def alpha(self) -> float | None:
        return self._meta.get("alpha")

    @property
    def experiment_fingerprint(self) -> str | None:
        return self._meta.get("experiment_fingerprint")

    def update_meta(self, **values: Any) -> None:
        """Set keys of the ``coar_dask`` attribute (reopening it first, so
        concurrent writers of different keys don't undo each other)."""
        group = _open_group(self.path, "r+")
        meta = dict(group.attrs[_ATTR])
        meta.update(values)
        group.attrs[_ATTR] = meta
        self._meta = meta
        self._group = group

    def __repr__(self) -> str:
        done = int(self.completed_rows().sum())
        return (
            f"<coar_dask.Store {str(self.path)!r}: {self.num_rows} rows, "
            f"{done} completed, arrays {list(self.spec.names)}, "
            f"{self.n_blocks} blocks of {self.rows_per_chunk} rows>"
        )

    # -- arrays -----------------------------------------------------------
    def array(self, name: str):
        """The zarr array ``name`` (a schema name or ``_completed``)."""
        if name != COMPLETED and name not in self.spec:
            raise StoreError(
                f"store {str(self.path)!r} has no array {name!r}; its arrays are "
                f"{list(self.spec.names)}."
            )
        return self._group[name]

    # -- blocks -----------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return -(-self.num_rows // self.rows_per_chunk)

    def block(self, index: int) -> Block:
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range 0..{self.n_blocks - 1}")
        start = index * self.rows_per_chunk
        return Block(index, start, min(start + self.rows_per_chunk, self.num_rows))

    def blocks(self) -> list[Block]:
        return [self.block(i) for i in range(self.n_blocks)]

    def block_of_row(self, row: int) -> int:
        return int(row) // self.rows_per_chunk

    def completed_rows(self) -> np.ndarray:
        """Bool array of shape (num_models,): True where a row is completed."""
        try:
            return np.asarray(self._group[COMPLETED][:], dtype=bool)
        except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise various errors on damaged chunks
            raise StoreError(
                f"the completion flags of store {str(self.path)!r} cannot be read ({type(exc).__name__}: "
                f"{exc}): a chunk file is damaged. Run `coar-dask verify {self.path}` to find the block, "
                f"then `coar-dask repair {self.path}` to mark it pending."
            ) from None

    def completed_blocks(self) -> np.ndarray:
        """Bool array of shape (n_blocks,): True where every row of a block is done."""
        done = self.completed_rows()
        pad = self.n_blocks * self.rows_per_chunk - self.num_rows
        padded = np.concatenate([done, np.ones(pad, dtype=bool)])
        return padded.reshape(self.n_blocks, self.rows_per_chunk).all(axis=1)

    def pending_blocks(self) -> list[Block]:
        """Blocks that are not completed, in row order."""
        done = self.completed_blocks()
        return [self.block(int(i)) for i in np.flatnonzero(~done)]

    def chunk_path(self, name: str, index: int, *, array: Any = None) -> Path:
        """The file holding block ``index`` of array ``name`` (its zarr v3 chunk key).

        ``array``: the opened zarr array ``name``, if the caller has it (saves
        reading its metadata again).
        """
        arr = self.array(name) if array is None else array
        coords = (int(index),) + (0,) * (len(arr.shape) - 1)
        return self.path / name / arr.metadata.encode_chunk_key(coords)

    def write_block(self, index: int, data: Mapping[str, np.ndarray]) -> None:
        """Write every schema array of block ``index``, then mark it completed.

        The completion flags are written last, and only once the block's data
        chunks are on disk (fsync'ed), so a block interrupted half way -- by a
        crash or a power loss -- is still pending and will be recomputed whole.
        """
        block = self.block(index)
        missing = set(self.spec.names) - set(data)
        if missing:
            raise StoreError(f"write_block needs every schema array; missing {sorted(missing)}.")
        arrays = {}  # each array's metadata is read once per block
        for name in self.spec.names:
            a = self.spec[name]
            values = np.asarray(data[name])
            expected = (len(block), *a.shape)
            if values.shape != expected:
                raise StoreError(
                    f"block {index} of {name!r} must have shape {expected}; got {values.shape}."
                )
            arrays[name] = self._group[name]
            arrays[name][block.start : block.stop] = values.astype(a.np_dtype, copy=False)
        _fsync([self.chunk_path(name, index, array=arr) for name, arr in arrays.items()])
        completed = self._group[COMPLETED]
        completed[block.start : block.stop] = True
        _fsync([self.chunk_path(COMPLETED, index, array=completed)])

    def read_block(self, index: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        block = self.block(index)
        names = self.spec.names if names is None else names
        return {n: self.array(n)[block.start : block.stop] for n in names}

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows (any order) of one array, read chunk by chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.array(name).get_orthogonal_selection((rows,))

    def iter_completed(
        self, names: Sequence[str], rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(row_indices, {name: values})`` block by block.

        ``rows`` (sorted or not) restricts to given rows; by default all
        completed rows. Memory is one block at a time.
        """
        if rows is None:
            rows = np.flatnonzero(self.completed_rows())
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if rows.size == 0:
            return
        block_ids = rows // self.rows_per_chunk
        bounds = np.flatnonzero(np.diff(block_ids)) + 1
        for chunk_rows in np.split(rows, bounds):
            block = self.block(int(chunk_rows[0]) // self.rows_per_chunk)
            local = chunk_rows - block.start
            out = {n: self.array(n)[block.start : block.stop][local] for n in names}
            yield chunk_rows, out

    def status(self) -> dict[str, Any]:
        """A summary: rows, completed rows and blocks, chunking, seeds."""
        done_blocks = self.completed_blocks()
        return {
            "path": str(self.path),
            "num_rows": self.num_rows,
            "completed_rows": int(self.completed_rows().sum()),
            "n_blocks": self.n_blocks,
            "completed_blocks": int(done_blocks.sum()),
            "rows_per_chunk": self.rows_per_chunk,
            "arrays": {a.name: {"dtype": a.dtype, "shape": list(a.shape)} for a in self.spec.schema},
            "mask_seed": self.mask_seed,
            "alpha": self.alpha,
            "experiment_fingerprint": self.experiment_fingerprint,
            "spec_sha256": self.spec.sha256,
        }


def _fsync(paths: Sequence[Path]) -> None:
    """Flush files and the directories holding them to disk.

    zarr's local store writes each chunk to a temporary file and renames it
    into place, which is atomic but not durable; the directory is synced too,
    so that the rename itself survives a power loss.
    """
    dirs = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a chunk equal to the fill value is not stored
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(path.parent)
    for directory in dirs:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_store_dir(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _read_meta(path: Path, group: Any) -> dict[str, Any]:
    meta = group.attrs.asdict().get(_ATTR)
    if not isinstance(meta, Mapping) or "spec" not in meta:
        raise StoreError(
            f"{str(path)!r} is a zarr group but not a coar_dask store (no '{_ATTR}' "
            f"attributes; an init may have been interrupted). Remove it and run "
            f"`coar-dask init` again."
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"store {str(path)!r} has format version {meta['format_version']}, newer than "
            f"this coar_dask ({__version__}) reads; upgrade coar_dask."
        )
    return dict(meta)


def open_store(path: str | os.PathLike, *, read_only: bool = False) -> Store:
    """Open an existing store.

    Raises
    ------
    StoreNotFoundError
        When ``path`` holds no store.
    """
    path = Path(path)
    if path.is_file():
        raise StoreError(f"{str(path)!r} is a file, not a store directory; pass a store directory.")
    if not _is_store_dir(path):
        raise StoreNotFoundError(
            f"no coar_dask store at {str(path)!r}; create one with `coar-dask init "
            f"--spec SPEC.json --store {path}` or coar_dask.init_store()."
        )
    group = _open_group(path, "r" if read_only else "r+")
    return Store(path, group, _read_meta(path, group))


def _check_same(path: Path, meta: Mapping[str, Any], key: str, wanted: Any, flag: str) -> None:
    if wanted is not None and meta.get(key) is not None and meta.get(key) != wanted:
        raise StoreMismatchError(
            f"store {str(path)!r} was initialized with {key}={meta.get(key)!r}, not "
            f"{wanted!r}. Use another store path, or drop {flag} to reuse this store."
        )


def init_store(
    path: str | os.PathLike,
    spec: Spec | Mapping[str, Any] | str | os.PathLike,
    *,
    rows_per_chunk: int | None = None,
    mask_seed: int | None = None,
    alpha: float | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Store:
    """Create a store for ``spec`` at ``path`` (lazily: no chunk is written).

    Initializing an existing store with the same spec opens it and changes
    nothing; with another spec (or chunking, seed, alpha) it raises
    :class:`StoreMismatchError` and changes nothing.

    Parameters
    ----------
    path
        Directory of the store (created).
    spec
        A :class:`Spec`, the seed's spec dictionary or a JSON file path.
    rows_per_chunk
        Rows per block and chunk; default :func:`default_rows_per_chunk`.
    mask_seed, alpha
        The mask sampling parameters, recorded so that every row's mask can be
        regenerated and verified later.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> s = init_store(os.path.join(d, "store"),
    ...                {"num_models": 200_000,
    ...                 "schema": {"masks": {"dtype": "bool_", "shape": [82944]},
    ...                            "val_margins": {"dtype": "float16", "shape": [5000]}}})
    >>> s.n_blocks, s.rows_per_chunk
    (2000, 100)
    """
    import zarr

    path = Path(path)
    spec = load_spec(spec)
    if rows_per_chunk is not None:
        if isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int) or rows_per_chunk <= 0:
            raise StoreError(f"rows_per_chunk must be a positive integer; found {rows_per_chunk!r}.")
    if alpha is not None and not (0.0 < float(alpha) < 1.0):
        raise StoreError(f"alpha must lie strictly between 0 and 1; found {alpha!r}.")
    if path.is_file():
        raise StoreError(f"{str(path)!r} is a file; pass a directory path for the store.")
    if _is_store_dir(path):
        store = open_store(path)
        if store.spec.sha256 != spec.sha256:
            raise StoreMismatchError(
                f"store {str(path)!r} already exists with another spec "
                f"(sha256 {store.spec.sha256[:12]}…, {store.spec.to_dict()}); "
                f"the new spec is {spec.to_dict()}. Use a new store path, or delete the "
                f"old store if its data is no longer needed."
            )
        _check_same(path, store.meta, "rows_per_chunk", rows_per_chunk, "--rows-per-chunk")
        _check_same(path, store.meta, "mask_seed", mask_seed, "--mask-seed")
        _check_same(path, store.meta, "alpha", alpha, "--alpha")
        logger.info("store %s already exists with this spec; nothing to do", path)
        return store
    if path.exists() and any(path.iterdir()):
        raise StoreError(
            f"{str(path)!r} exists and is not empty, but holds no coar_dask store; "
            f"choose an empty or new directory."
        )
    rpc = rows_per_chunk or default_rows_per_chunk(spec)
    rpc = min(rpc, spec.num_models)
    group = zarr.open_group(store=str(path), mode="w-", zarr_format=3)
    n = spec.num_models
    # zarr's default zstd, plus its frame checksum: a chunk whose bytes changed on
    # disk then fails to decode instead of decoding into plausible numbers.
    compressors = [zarr.codecs.ZstdCodec(level=0, checksum=True)]
    for a in spec.schema:
        group.create_array(
            a.name,
            shape=(n, *a.shape),
            chunks=(rpc, *a.shape),
            dtype=a.np_dtype,
            fill_value=0,
            compressors=compressors,
            dimension_names=["row", *(f"{a.name}_{i}" for i in range(len(a.shape)))],
        )
    group.create_array(COMPLETED, shape=(n,), chunks=(rpc,), dtype=bool, fill_value=False,
                       compressors=compressors)
    meta = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "spec": spec.to_dict(),
        "spec_sha256": spec.sha256,
        "rows_per_chunk": rpc,
        "mask_seed": None if mask_seed is None else int(mask_seed),
        "alpha": None if alpha is None else float(alpha),
        "experiment_fingerprint": None,
        **dict(extra_meta or {}),
    }
    # Written last: a store without it is recognisably an interrupted init.
    group.attrs[_ATTR] = meta
    logger.info("initialized store %s: %d rows in %d-row blocks", path, n, rpc)
    return Store(path, group, meta)
