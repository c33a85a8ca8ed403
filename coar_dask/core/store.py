"""Zarr stores of component datasets: create, open, row blocks, completion.

A store is a zarr v3 group. Every schema array has shape ``(num_models,
*shape)`` and is chunked by ``rows_per_chunk`` rows (full width), and
``_completed`` is a bool array of shape ``(num_models,)`` with the same row
chunking. So row block ``b`` (rows ``b * rows_per_chunk`` up to the next
multiple) is exactly one chunk of every array: one build task owns it, and
tasks never need a lock.

The group's ``coar_dask`` attribute keeps the spec, its sha256, the chunking,
the mask seed and alpha (when given), the experiment fingerprint once a build
has started, the package and format versions, and a random ``store_id``
(the id of a store written without a claim).

Codecs: bool arrays (the masks) are bit-shuffled by blosc, compressed with
zstd and followed by a crc32c checksum; every other array uses zstd with its
frame checksum (:data:`CODECS`, recorded under ``codecs``). Stores written
before used zstd for every array; zarr reads each array's chain from its own
metadata, so they open, verify and fit unchanged (the layout -- arrays, shapes,
chunk keys -- is the same, hence no new format version).

Integrity (formats 2 and 3):

* ``_digests`` (uint8, ``(n_blocks, n_arrays, 32)``, one chunk per block) holds,
  for each block, the sha256 of every schema array's block as written, bound to
  the block index, the store and the claimed experiment (:mod:`coar_dask.core.digests`).
  A build task writes it with the block's data and before its ``_completed`` chunk
  (:mod:`coar_dask.core.durability`), so a chunk swapped with another block's,
  copied from another store or changed in place no longer matches, and a block
  flagged completed without a build has no digest. :meth:`Store.read_verified`
  (used by :meth:`Store.iter_completed`, hence by fit and evaluate, and by the
  .beton export) refuses such blocks. Format-1 stores have no digests and still
  open; their readers check only that chunk files exist and are regular files.
* ``coar_dask.claim.json`` records the experiment that owns the store, and gives the store its id (format 3; a format-2 store's id
  was given at init, so copies of an unbuilt store shared it). It is created
  atomically (written to a temporary file, then hard-linked into place, which
  fails when the name exists -- atomic on local filesystems and NFS alike), so
  of two builds that start together with different experiments exactly one
  wins and the other is refused before it computes anything (:meth:`Store.claim`).
* ``coar_dask.content.json`` records digests of what the experiment's
  factories returned (model state, examples, labels); see
  :mod:`coar_dask.core.identity`.

Both records live in the ``_completed`` array's folder (format 4,
:meth:`Store.record_file`): zarr lists every entry of a group's folder as a
would-be member and warns about any that is not one, but never looks inside an
array's folder beyond its chunk keys. Stores written before keep them at their
root, where they are still read (and written, so a store has one claim).

xarray (format 4): every array names its dimensions (``row``; ``component``
for the masks, ``example`` for the outputs: :func:`dimension_names`), and the
store holds coordinates -- ``component`` and ``example`` (indices) from its
init, ``layer``, ``unit``, ``name`` and ``label`` once a build knows the
experiment (:meth:`Store.write_coordinates`) -- so ``xr.open_zarr(STORE)`` is a
labelled dataset whose arrays are those of :meth:`Store.to_dask`.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from coar_dask._version import FORMAT_VERSION, __version__
from coar_dask.errors import CoarError, CorruptBlockError, StoreError, StoreMismatchError, StoreNotFoundError
from coar_dask.core import durability
from coar_dask.core.digests import CHUNK_KINDS, DIGEST_ALGORITHM, DIGEST_SIZE, binding, block_digest, chunk_kind
from coar_dask.core.output_paths import os_error_message
from coar_dask.core.spec import Spec, load_spec

__all__ = [
    "Block",
    "Store",
    "init_store",
    "open_store",
    "default_rows_per_chunk",
    "block_digest",
    "COMPLETED",
    "DIGESTS",
    "CLAIM_FILE",
    "RECORD_FOLDER",
    "dimension_names",
]

logger = logging.getLogger(__name__)

COMPLETED = "_completed"
#: Per-block digests of what a build wrote (format 2).
DIGESTS = "_digests"
#: :meth:`Store.iter_completed` reads up to this many consecutive blocks (and at most
#: ``SPAN_BYTES`` of decoded rows) with one zarr call per array.
SPAN_BLOCKS = 8
SPAN_BYTES = 64 * 2**20
#: The file naming the experiment a store belongs to (first build wins).
CLAIM_FILE = "coar_dask.claim.json"
#: Where a format-4 store keeps its claim and content record: inside an array's folder, which zarr
#: never lists (a group's folder it does, warning about every entry that is not an array or group).
RECORD_FOLDER = COMPLETED
#: The format that gave stores their claim ids (a format-2 store claimed now is marked with it).
_CLAIM_ID_FORMAT = 3
#: Coordinate arrays along the ``component`` and ``example`` dimensions (xarray's non-index coordinates).
_COMPONENT_COORDS = ("layer", "unit", "name")
_EXAMPLE_COORDS = ("label",)
_ATTR = "coar_dask"
#: Target for the uncompressed size of one chunk of the widest array.
_CHUNK_BYTES_TARGET = 64 * 2**20
_MAX_ROWS_PER_CHUNK = 100
#: zstd level inside blosc for bool arrays: 7 is where the ratio stops growing
#: for P = 2,304 (25.5x; level 9 writes 2.5x slower for 25.4x).
_BOOL_ZSTD_LEVEL = 7
#: What new stores' arrays are compressed with (kept in their record; older
#: stores used zstd for every array and still open, verify and fit).
CODECS = {"bool": f"blosc-zstd{_BOOL_ZSTD_LEVEL}-bitshuffle+crc32c", "other": "zstd0+checksum"}


def default_rows_per_chunk(spec: Spec) -> int:
    """Rows per block: at most 100 (a block is one task of seconds to minutes)
    and small enough that a chunk of the widest array stays under 64 MiB."""
    widest = max(a.row_nbytes for a in spec.schema)
    by_bytes = max(1, _CHUNK_BYTES_TARGET // max(widest, 1))
    return int(max(1, min(_MAX_ROWS_PER_CHUNK, by_bytes, spec.num_models)))


def dimension_names(spec: Spec) -> dict[str, tuple[str, ...]]:
    """The dimension names of every array of a store of ``spec`` (zarr v3 ``dimension_names``).

    ``row`` first; the first boolean array of one more dimension (the masks) then has ``component``,
    the first other one (the outputs) ``example``; every other dimension is ``<array>_<axis>`` (two
    output arrays may hold different example sets: they share no dimension). ``_completed`` has
    ``row``, ``_digests`` ``block``, ``digest_array``, ``digest_byte``.

    Examples
    --------
    >>> spec = Spec.for_experiment(100, 6, 3)
    >>> dimension_names(spec)["masks"], dimension_names(spec)["margins"]
    (('row', 'component'), ('row', 'example'))
    """
    out: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for a in spec.schema:
        shared = ("component" if a.np_dtype == np.dtype(bool) else "example") if len(a.shape) == 1 else None
        # xarray takes a variable named like a dimension for that dimension's coordinate: keep them apart
        if shared is not None and shared not in used and shared not in spec.names:
            used.add(shared)
            out[a.name] = ("row", shared)
        else:
            out[a.name] = ("row", *(f"{a.name}_{i}" for i in range(len(a.shape))))
    out[COMPLETED] = ("row",)
    out[DIGESTS] = ("block", "digest_array", "digest_byte")
    return out


def _coordinates(summary: Any, n_components: int) -> dict[str, np.ndarray] | None:
    """``layer``, ``unit`` and ``name`` of each component from a components summary
    (:meth:`coar_dask.core.components.Components.summary`); ``None`` when it does not describe
    ``n_components`` components."""
    try:
        layers = [(str(layer["module"]), int(layer["units"])) for layer in summary["layers"]]
    except (TypeError, KeyError, ValueError):
        return None
    if sum(n for _, n in layers) != n_components or any(n < 0 for _, n in layers):
        return None
    units = np.concatenate([np.arange(n, dtype=np.int64) for _, n in layers] or [np.zeros(0, np.int64)])
    layer = np.array([m for m, n in layers for _ in range(n)], dtype=str)
    names = np.array([f"{m}[{u}]" for m, u in zip(layer.tolist(), units.tolist())], dtype=str)
    return {"layer": layer, "unit": units, "name": names}


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
        # Absolute: the path travels to remote workers, whose working folder differs.
        self.path = Path(os.path.abspath(path))
        self._group = group
        self._meta = dict(meta)
        self.spec = Spec.from_dict(meta["spec"])
        self.rows_per_chunk = int(meta["rows_per_chunk"])
        #: Check chunk files and digests as rows are read (:meth:`read_verified`);
        #: only benchmarks turn it off.
        self.verify_reads = True
        self._digest_array: Any = None
        self._binding: tuple[str, ...] | None = None  # see _claim_binding

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

    @property
    def store_id(self) -> str | None:
        """The store's id: given when a build claims it (format 3), else the random id its init recorded.

        Copies of one unbuilt store (``cp -r``) get ids of their own when they are claimed."""
        claim = self._claim_binding()
        return claim[0] if claim else self._meta.get("store_id")

    @property
    def digest_binding(self) -> str | None:
        """What block digests are bound to (:func:`coar_dask.core.digests.binding`): the id the claim
        gave and the claimed experiment's fingerprint, or, for a store written without such a claim,
        the id its init recorded."""
        claim = self._claim_binding()
        return binding(*claim) if claim else self._meta.get("store_id")

    def _claim_binding(self) -> tuple[str, str] | None:
        """``(store_id, experiment_fingerprint)`` of a claim that gave the store its id, else ``None``.
        Kept once found: a claim is never changed."""
        if self._binding is None:
            claim = self.read_claim()
            if claim is not None:
                self._binding = (claim["store_id"], claim["experiment_fingerprint"]) \
                    if isinstance(claim.get("store_id"), str) else ()
        return self._binding or None

    @property
    def has_digests(self) -> bool:
        """Whether builds record a digest per block (stores of format 2 and later made by a build's init)."""
        return bool(self._meta.get("store_id")) and self._meta.get("block_digest") == DIGEST_ALGORITHM

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

    def _repr_html_(self) -> str:
        """A small table for notebooks: path, rows completed and pending, the experiment in one line,
        then each array's dimensions, shape, chunks and dtype (as :class:`~coar_dask.fit.attributions.Attributions` shows itself)."""
        done = int(self.completed_rows().sum())
        rows = [("path", str(self.path)), ("rows", f"{done} completed, {self.num_rows - done} pending "
                                                   f"({self.n_blocks} blocks of {self.rows_per_chunk})"),
                ("experiment", _experiment_line(self._meta))]
        cell = "<{0} style='text-align:left'>{1}</{0}>"
        body = "".join(f"<tr>{cell.format('th', html.escape(k))}{cell.format('td', html.escape(v))}</tr>"
                       for k, v in rows)
        head = "".join(cell.format("th", h) for h in ("array", "dims", "shape", "chunks", "dtype"))
        arrays = "".join(
            "<tr>" + "".join(cell.format("td", html.escape(str(v))) for v in (
                name, ", ".join(self.dimension_names(name)) or "-", self._shape(name), self._chunks(name),
                self._dtype(name))) + "</tr>" for name in (*self.spec.names, COMPLETED))
        return (f"<div><strong>coar_dask.Store</strong><table>{body}</table>"
                f"<table><tr>{head}</tr>{arrays}</table></div>")

    def _shape(self, name: str) -> tuple[int, ...]:
        return (self.num_rows, *self.spec[name].shape) if name in self.spec else (self.num_rows,)

    def _chunks(self, name: str) -> tuple[int, ...]:
        return (self.rows_per_chunk, *self._shape(name)[1:])

    def _dtype(self, name: str) -> str:
        return self.spec[name].np_dtype.name if name in self.spec else "bool"

    def dimension_names(self, name: str) -> tuple[str, ...]:
        """The dimension names array ``name`` records (``()`` where a store written before format 4
        recorded none; new stores follow :func:`dimension_names`)."""
        return tuple(self.array(name).metadata.dimension_names or ())

    # -- files of the store's own, outside zarr's hierarchy ----------------
    def record_file(self, name: str) -> Path:
        """The file of record ``name`` (:data:`CLAIM_FILE`, the content record).

        In :data:`RECORD_FOLDER` for a store of format 4 (where zarr does not list it), at the root for
        stores written before; a record an earlier coar_dask wrote at the root of a newer store is
        read there. Where none exists yet, the place to create it.
        """
        own = self.path / RECORD_FOLDER / name if self._meta.get("record_folder") == RECORD_FOLDER \
            else self.path / name
        root = self.path / name
        if own != root and not own.exists() and root.exists():
            return root
        return own

    def write_coordinates(self, components: Mapping[str, Any] | None, labels: Any = None) -> list[str]:
        """Write the coordinates only a build knows, unless written: ``layer``, ``unit`` and ``name``
        along ``component`` (from a components summary, :meth:`Components.summary
        <coar_dask.core.components.Components.summary>`) and ``label`` along ``example`` (the
        examples' labels, when one per example). Returns the names written.

        A store without those dimensions (written before format 4), a summary of another number of
        components and labels of another shape are left as they are. Two builds starting together
        write the same values.
        """
        dims = {self.dimension_names(n)[1]: self.spec[n].shape[0] for n in self.spec.names
                if len(self.dimension_names(n)) == 2}
        wanted: dict[str, np.ndarray] = {}
        if "component" in dims and components is not None:
            wanted.update(_coordinates(components, dims["component"]) or {})
        label = None if labels is None else np.asarray(labels)
        if "example" in dims and label is not None and label.shape == (dims["example"],) and label.dtype.kind in "biuf":
            wanted["label"] = label
        written = []
        for name, values in wanted.items():
            if name in self.spec or (self.path / name / "zarr.json").is_file():
                continue
            dim = "example" if name in _EXAMPLE_COORDS else "component"
            _write_coordinate(self._group, name, dim, values)
            written.append(name)
        return written

    # -- arrays -----------------------------------------------------------
    def array(self, name: str):
        """The zarr array ``name`` (a schema name or ``_completed``)."""
        if name not in (COMPLETED, DIGESTS) and name not in self.spec:
            raise StoreError(
                f"store {str(self.path)!r} has no array {name!r}; its arrays are "
                f"{list(self.spec.names)}."
            )
        return self._group[name]

    def to_dask(self, name: str, *, verify: bool = False) -> Any:
        """Array ``name`` (a schema array or ``_completed``) as a lazy Dask array, one chunk per block.

        Nothing is read until it is computed; with a ``distributed`` client
        active, the chunks are read and reduced on the workers (which must see
        the store's path). ``verify=False`` (default) reads the zarr chunks
        directly: **no block digest and no chunk-file check** -- a chunk
        swapped with another block's, or a block flagged completed without a
        build, reads as if it were right (changed bytes still fail to decode:
        every codec chain has a checksum). ``verify=True`` reads each completed
        block through :meth:`read_verified` (one digest check per block, as a
        fit does; pending blocks read as stored, zeros where never written).
        Rows of pending blocks are zeros: select completed rows with
        ``to_dask("_completed")``.

        Examples
        --------
        The mean output per example over completed rows, computed on the cluster:

        >>> from distributed import Client                                        # doctest: +SKIP
        >>> with Client(n_workers=2) as client:                                   # doctest: +SKIP
        ...     done = store.to_dask("_completed")
        ...     y = store.to_dask("val_margins", verify=True).astype("float64")   # float16 sums overflow
        ...     mean = ((y * done[:, None]).sum(axis=0) / done.sum()).compute()
        """
        import dask.array as da

        arr = self.array(name)
        if not verify or name not in self.spec or not self.verify_reads:
            return da.from_array(arr, chunks=arr.chunks, lock=False, asarray=True, fancy=False,
                                 name=f"coar-{name}-{uuid.uuid4().hex}")  # a fresh name: the rows may have changed since
        chunks = (tuple(len(b) for b in self.blocks()), *((s,) for s in arr.shape[1:]))
        return da.map_blocks(_verified_chunk, str(self.path), name, chunks=chunks, dtype=arr.dtype,
                             meta=np.empty((0,) * len(arr.shape), dtype=arr.dtype),
                             name=f"coar-verified-{name}-{uuid.uuid4().hex}")

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

    def write_block(self, index: int, data: Mapping[str, np.ndarray], completed: np.ndarray | None = None) -> None:
        """Write every schema array of block ``index``, then mark it completed.

        The completion flags are written last, and only once the block's data
        chunks are on disk (fsync'ed), so a block interrupted half way -- by a
        crash or a power loss -- is still pending and will be recomputed whole.
        ``completed``: the block's rows' flags when not all are done (an
        import of a partly built store); default every row.
        """
        block = self.block(index)
        missing = set(self.spec.names) - set(data)
        if missing:
            raise StoreError(f"write_block needs every schema array; missing {sorted(missing)}.")
        written = {}
        for name in self.spec.names:
            a = self.spec[name]
            values = np.asarray(data[name])
            expected = (len(block), *a.shape)
            if values.shape != expected:
                raise StoreError(
                    f"block {index} of {name!r} must have shape {expected}; got {values.shape}."
                )
            written[name] = values.astype(a.np_dtype, copy=False)
        try:
            self._write_block(block, written, completed)
        except OSError as exc:  # a full disk, a read-only folder: the block stays pending, others untouched
            raise StoreError(os_error_message(exc, self.path, f"writing block {index} of")) from None

    def _write_block(self, block: Block, written: Mapping[str, np.ndarray], completed: np.ndarray | None) -> None:
        index = block.index
        arrays = {name: self._group[name] for name in written}  # each array's metadata is read once per block
        rows = slice(block.start, block.stop)
        writes = [(arrays[name], rows, values) for name, values in written.items()]
        chunk_files = [self.chunk_path(name, index, array=arr) for name, arr in arrays.items()]
        if self.has_digests:
            digests = self._digests()
            writes.append((digests, slice(index, index + 1), np.stack([
                np.frombuffer(block_digest(self.digest_binding, index, name, values), np.uint8)
                for name, values in written.items()  # the codecs are lossless: readers decode these bytes
            ])[None]))
            chunk_files.append(self.chunk_path(DIGESTS, index, array=digests))
        done = self._group[COMPLETED]
        flags_file = [self.chunk_path(COMPLETED, index, array=done)]
        try:
            was_completed = bool(np.asarray(done[block.start : block.stop]).any())
        except Exception:  # noqa: BLE001 - a damaged flags chunk: cleared (rewritten whole) like set ones
            was_completed = True
        if was_completed:
            # A block rewritten after it was completed is marked pending first, durably: a write cut
            # short below leaves it pending (rebuilt), never flagged with new data and an old digest.
            done[block.start : block.stop] = False
            durability.fsync_paths(flags_file, self.path)
        # Data and digests in one trip through zarr's event loop (encoded concurrently), all durable
        # before the flags: a block cut short anywhere before the flags' fsync is still pending.
        durability.write_concurrently(writes)
        durability.fsync_paths(chunk_files, self.path)
        done[block.start : block.stop] = True if completed is None else np.asarray(completed, dtype=bool).reshape(
            len(block))
        durability.fsync_paths(flags_file, self.path)

    # -- integrity --------------------------------------------------------
    def _digests(self) -> Any:
        if self._digest_array is None:
            self._digest_array = self._group[DIGESTS]
        return self._digest_array

    def _corrupt(self, index: int, what: str) -> CorruptBlockError:
        block = self.block(index)
        return CorruptBlockError(
            f"block {index} (rows {block.start}-{block.stop - 1}) of store {str(self.path)!r}: {what}. Run "
            f"`coar-dask repair {self.path}` to mark it pending, then `coar-dask build` to recompute it."
        )

    def chunk_kind(self, name: str, index: int, *, array: Any = None) -> str:
        """What lies at block ``index``'s chunk path of ``name``: ``"file"``, ``"missing"``,
        ``"folder"``, ``"link"`` or ``"other"`` (symbolic links are not followed)."""
        return chunk_kind(self.chunk_path(name, index, array=array))

    def stored_digests(self, index: int) -> dict[str, bytes] | None:
        """The digests recorded for block ``index`` (array name -> sha256), or ``None``
        when the block has none (never written by a build, or a store without digests)."""
        if not self.has_digests:
            return None
        try:
            raw = np.asarray(self._digests()[index], dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise various errors on damaged chunks
            raise self._corrupt(index, f"its digest chunk cannot be decoded ({type(exc).__name__})") from None
        return self._digest_row(raw)

    def _digest_row(self, raw: np.ndarray) -> dict[str, bytes] | None:
        if not raw.any():
            return None
        return {name: raw[i].tobytes() for i, name in enumerate(self.spec.names)}

    def read_verified(self, index: int, names: Sequence[str] | None = None, *,
                      arrays: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Every row of block ``index`` of ``names``, refusing data not written for this block.

        Raises :class:`CorruptBlockError` (naming the block and ``coar-dask
        repair``) when a chunk is a folder, a link or (without digests) missing,
        cannot be decoded, or does not match the block's digest, and when a
        store with digests has none for the block (flags set without a build).
        ``arrays``: the opened zarr arrays, if the caller has them.
        """
        block = self.block(index)
        names = list(self.spec.names if names is None else names)
        given = dict(arrays or {})
        arrays = {n: given[n] if given.get(n) is not None else self.array(n) for n in names}
        check = self.verify_reads
        kinds = {n: self.chunk_kind(n, index, array=arrays[n]) if check else "file" for n in names}
        digests = self.stored_digests(index) if check else None
        self._check_kinds(index, kinds, digests)
        out = {}
        for n in names:
            try:
                out[n] = np.asarray(arrays[n][block.start : block.stop])
            except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise various errors on damaged chunks
                raise self._corrupt(index, f"the chunk of {n!r} cannot be decoded ({type(exc).__name__})") from None
            self._check_digest(index, n, out[n], digests, kinds[n])
        return out

    def _check_kinds(self, index: int, kinds: Mapping[str, str], digests: Mapping[str, bytes] | None) -> None:
        """Refuse block ``index`` before reading it: flagged without a digest, or a chunk that is not a file."""
        if self.verify_reads and digests is None and self.has_digests:
            raise self._corrupt(index, "its rows are flagged completed but no digest was written with them "
                                       "(no build wrote this block)")
        for n, kind in kinds.items():
            if kind != "file" and not (kind == "missing" and digests is not None):
                raise self._corrupt(index, f"the chunk of {n!r} is {CHUNK_KINDS[kind]}")

    def _check_digest(self, index: int, name: str, values: np.ndarray, digests: Mapping[str, bytes] | None,
                      kind: str) -> None:
        if digests is not None and block_digest(self.digest_binding, index, name, values) != digests[name]:
            found = "is missing" if kind == "missing" else "does not hold what was written for this block"
            raise self._corrupt(index, f"the chunk of {name!r} {found} (its digest differs: swapped with another "
                                       f"block, copied from another store, or changed)")

    def _read_span(self, first: int, last: int, names: Sequence[str], arrays: Mapping[str, Any]
                   ) -> list[dict[str, np.ndarray]] | None:
        """Blocks ``first..last`` read with one zarr call per array (and one for their digests),
        each block checked as :meth:`read_verified` checks it; ``None`` when anything is wrong with
        any of them: the caller then reads them one by one, which raises at the first bad block."""
        check = self.verify_reads
        blocks = [self.block(i) for i in range(first, last + 1)]
        if check:  # nothing is opened before every chunk is known to be a plain file (a FIFO would block)
            kinds = [{n: self.chunk_kind(n, b.index, array=arrays[n]) for n in names} for b in blocks]
            if any(kind != "file" for k in kinds for kind in k.values()):
                return None
        try:
            span = {n: np.asarray(arrays[n][blocks[0].start : blocks[-1].stop]) for n in names}
            raw = np.asarray(self._digests()[first : last + 1], dtype=np.uint8) if check and self.has_digests \
                else None
        except Exception:  # noqa: BLE001 - read block by block for the error naming the block
            return None
        out = []
        for j, b in enumerate(blocks):
            digests = self._digest_row(raw[j]) if raw is not None else None
            values = {n: span[n][b.start - blocks[0].start : b.stop - blocks[0].start] for n in names}
            try:
                self._check_kinds(b.index, kinds[j] if check else {}, digests)
                for n in names:
                    self._check_digest(b.index, n, values[n], digests, "file")
            except CorruptBlockError:
                return None
            out.append(values)
        return out

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
        completed rows. Memory is one block at a time. Each block is read
        with :meth:`read_verified`: a block whose chunks are missing, damaged
        or not its own raises :class:`CorruptBlockError`.
        """
        if rows is None:
            rows = np.flatnonzero(self.completed_rows())
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if rows.size == 0:
            return
        if rows[0] < 0 or rows[-1] >= self.num_rows:
            raise StoreError(f"rows must lie in 0..{self.num_rows - 1}; found {rows[0]}..{rows[-1]}.")
        block_ids = rows // self.rows_per_chunk
        bounds = np.flatnonzero(np.diff(block_ids)) + 1
        arrays = {n: self.array(n) for n in names}
        per_block = np.split(rows, bounds)
        row_bytes = sum(self.spec[n].row_nbytes for n in names)
        span_blocks = int(max(1, min(SPAN_BLOCKS, SPAN_BYTES // max(row_bytes * self.rows_per_chunk, 1))))
        at = 0
        while at < len(per_block):
            # consecutive blocks (those a run of rows touches) are read together: one zarr call
            # per array for up to SPAN_BLOCKS blocks costs less than one per block
            group = [per_block[at]]
            while (len(group) < span_blocks and at + len(group) < len(per_block)
                   and per_block[at + len(group)][0] // self.rows_per_chunk
                   == group[-1][0] // self.rows_per_chunk + 1):
                group.append(per_block[at + len(group)])
            at += len(group)
            first = int(group[0][0]) // self.rows_per_chunk
            data = self._read_span(first, first + len(group) - 1, names, arrays) if len(group) > 1 else None
            for j, chunk_rows in enumerate(group):
                block = self.block(int(chunk_rows[0]) // self.rows_per_chunk)
                local = chunk_rows - block.start
                values = data[j] if data is not None else self.read_verified(block.index, names, arrays=arrays)
                yield chunk_rows, {n: v[local] for n, v in values.items()}

    # -- the experiment that owns the store --------------------------------
    def read_claim(self) -> dict[str, Any] | None:
        """The claim recorded in :data:`CLAIM_FILE`, or ``None`` when the store is unclaimed."""
        path = self.record_file(CLAIM_FILE)
        try:
            return durability.read_exclusive(path, lambda c: isinstance(c.get("experiment_fingerprint"), str))
        except ValueError:
            raise StoreError(
                f"the claim file {str(path)!r} of store {str(self.path)!r} is damaged (no experiment fingerprint); "
                f"restore it from a backup, or build into a new store."
            ) from None

    def claim(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Claim the store for one experiment; the first claim wins, atomically.

        ``record`` holds at least ``experiment_fingerprint``. Claiming again
        with the same fingerprint is a no-op. Raises :class:`StoreMismatchError`
        when the store is claimed by another experiment (then nothing was
        changed), so two builds of different experiments cannot both write.

        The claim gives the store its id (:attr:`store_id`), to which with the
        experiment's fingerprint every block digest written from then on is
        bound: two copies of one unbuilt store get different ids. A store that
        already holds completed blocks (an import) keeps its init's id, which
        their digests are bound to.
        """
        wanted = str(record["experiment_fingerprint"])
        claim = self.read_claim()
        if claim is None:
            record = dict(record)
            if self.has_digests and not self.completed_rows().any():
                record["store_id"] = uuid.uuid4().hex
            durability.create_exclusive(self.record_file(CLAIM_FILE), json.dumps(record, sort_keys=True, default=str))
            claim = self.read_claim()
            if claim is not None and claim.get("store_id") == record.get("store_id") and claim.get("store_id") \
                    and int(self._meta.get("format_version", 0)) < _CLAIM_ID_FORMAT:
                self.update_meta(format_version=_CLAIM_ID_FORMAT)  # format-2 readers cannot check its digests
        have = claim["experiment_fingerprint"] if claim else None
        if have != wanted:
            raise StoreMismatchError(
                f"store {str(self.path)!r} belongs to another experiment ({str(have)[:12]}…, this one is "
                f"{wanted[:12]}…), claimed by a build that started first; a store must not mix two experiments. "
                f"Use a new store, or the experiment file the store was built with."
            )
        return claim

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
            "block_digests": self.has_digests,
            # stores written before issue 16 record none: zstd on every array
            "codecs": self._meta.get("codecs") or {"bool": "zstd0+checksum", "other": "zstd0+checksum"},
        }


def _verified_chunk(path: str, name: str, block_info: Any = None) -> np.ndarray:
    """Block ``block_info``'s chunk of array ``name``, digest-checked when the block is completed
    (the task of :meth:`Store.to_dask` with ``verify=True``)."""
    store = open_store(path, read_only=True, check_arrays=False)
    index = int(block_info[None]["chunk-location"][0])
    block = store.block(index)
    done = bool(store.array(COMPLETED)[block.start:block.stop].all())
    if done:
        return store.read_verified(index, [name])[name]
    return np.asarray(store.array(name)[block.start:block.stop])


def _experiment_line(meta: Mapping[str, Any]) -> str:
    """The experiment a store records, in one line (``-`` when it records none)."""
    exp = meta.get("experiment")
    if not isinstance(exp, Mapping):
        return "-"
    part = lambda key: exp.get(key).get("factory") if isinstance(exp.get(key), Mapping) else exp.get(key)  # noqa: E731
    return (f"{part('model')} on {part('examples')}, output {exp.get('output')}, alpha {exp.get('alpha')}, "
            f"mask seed {exp.get('mask_seed')}")


def _write_coordinate(group: Any, name: str, dim: str, values: np.ndarray) -> None:
    """Create the 1-d coordinate array ``name`` along ``dim`` holding ``values`` (one chunk)."""
    import zarr

    try:
        arr = group.create_array(name, shape=values.shape, chunks=values.shape or (1,),
                                 dtype=str if values.dtype.kind == "U" else values.dtype,
                                 dimension_names=[dim], fill_value="" if values.dtype.kind == "U" else 0)
    except zarr.errors.ContainsArrayError:  # another build made it: it writes the same values
        arr = group[name]
    if values.size:
        arr[:] = values


def _store_path(path: Any, where: str) -> Path:
    """``path`` as an absolute Path; anything but a string or path-like is refused, naming what was found."""
    if isinstance(path, Store):
        return path.path
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and not path.strip()):
        raise StoreError(
            f"{where} takes the store's folder as a str or os.PathLike (e.g. 'runs/store'); found "
            f"{type(path).__name__} {path!r}."
        )
    return Path(os.path.abspath(path))


def _is_store_dir(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _not_ours(path: Path) -> StoreError:
    """A zarr group without coar_dask's record: an init of ours cut short, or another tool's data."""
    if (path / COMPLETED / "zarr.json").is_file() and len(list(path.iterdir())) <= 7:
        return StoreError(
            f"{str(path)!r} holds a coar_dask store whose init was interrupted (its arrays exist, its record "
            f"does not); it holds no data yet: remove that folder and run `coar-dask init` again."
        )
    return StoreError(
        f"{str(path)!r} is a zarr group but not a coar_dask store (it has no '{_ATTR}' record): another "
        f"tool's data, left as it is. Give coar-dask the path of one of its stores, or a new path for `init`."
    )


def _read_meta(path: Path, group: Any) -> dict[str, Any]:
    meta = group.attrs.asdict().get(_ATTR)
    if not isinstance(meta, Mapping) or "spec" not in meta:
        raise _not_ours(path)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"store {str(path)!r} has format version {meta['format_version']}, newer than "
            f"this coar_dask ({__version__}) reads; upgrade coar_dask."
        )
    return dict(meta)


def _damaged_metadata(path: Path, exc: Exception, file: str = "zarr.json") -> StoreError:
    return StoreError(
        f"the metadata of store {str(path)!r} cannot be read ({file}: {type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:160] if str(exc) else 'unreadable'}); it is damaged or was edited. Restore "
        f"it from a backup; `coar-dask verify {path}` lists what else is wrong."
    )


def _check_layout(store: "Store") -> None:
    """Refuse a store whose arrays disagree with its record (damaged or edited metadata)."""
    n, rpc = store.num_rows, store.rows_per_chunk
    wanted = {a.name: ((n, *a.shape), (rpc, *a.shape), a.np_dtype) for a in store.spec.schema}
    wanted[COMPLETED] = ((n,), (rpc,), np.dtype(bool))
    if store.has_digests:
        wanted[DIGESTS] = ((store.n_blocks, len(store.spec.schema), DIGEST_SIZE),
                           (1, len(store.spec.schema), DIGEST_SIZE), np.dtype(np.uint8))
    for name, layout in wanted.items():
        try:
            arr = store._group[name]
            found = (tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype))
        except Exception as exc:  # noqa: BLE001 - zarr raises various errors on damaged metadata
            raise _damaged_metadata(store.path, exc, f"{name}/zarr.json") from None
        if found != layout:
            raise StoreError(
                f"store {str(store.path)!r} records {n} rows in blocks of {rpc}, but its array {name!r} has "
                f"shape {found[0]} and chunks {found[1]} ({found[2]}): its record was edited or damaged. "
                f"Restore its zarr.json from a backup; `coar-dask verify {store.path}` lists the differences."
            )


def open_store(path: str | os.PathLike, *, read_only: bool = False, check_arrays: bool = True) -> Store:
    """Open an existing store.

    ``check_arrays`` (default): refuse a store whose arrays' metadata cannot
    be read or disagrees with its record (``coar-dask verify`` opens without
    it, to report every difference).

    Raises
    ------
    StoreNotFoundError
        When ``path`` holds no store.
    StoreError
        When its metadata is damaged, or it is another tool's zarr group.
    """
    path = _store_path(path, "open_store")
    if path.is_file():
        raise StoreError(f"{str(path)!r} is a file, not a store directory; pass a store directory.")
    if not _is_store_dir(path):
        raise StoreNotFoundError(
            f"no coar_dask store at {str(path)!r}; create one with `coar-dask init "
            f"--spec SPEC.json --store {path}` or coar_dask.init_store()."
        )
    try:
        group = _open_group(path, "r" if read_only else "r+")
        meta = _read_meta(path, group)
        store = Store(path, group, meta)
    except CoarError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr/json raise various errors on damaged metadata
        raise _damaged_metadata(path, exc) from None
    if check_arrays:
        _check_layout(store)
    return store


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
    digests: bool = True,
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
    digests
        Record a digest of each block as :meth:`Store.write_block` writes it,
        and check it on every read (default; imported stores too, whose
        blocks are written by :meth:`Store.write_block`).

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
    path = _store_path(path, "init_store")
    spec = load_spec(spec)  # refuses the store's own names (core.spec.RESERVED_NAMES)
    if rows_per_chunk is not None:
        if isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int) or rows_per_chunk <= 0:
            raise StoreError(f"rows_per_chunk must be a positive integer; found {rows_per_chunk!r}.")
    if alpha is not None and not (0.0 < float(alpha) < 1.0):
        raise StoreError(f"alpha must lie strictly between 0 and 1; found {alpha!r}.")
    if mask_seed is not None and (isinstance(mask_seed, bool) or not isinstance(mask_seed, (int, np.integer))
                                  or mask_seed < 0):  # the one check of init_store and `init --mask-seed`
        raise StoreError(f"mask_seed must be a non-negative integer (--mask-seed; row i's mask depends on it "
                         f"and i); found {mask_seed!r}.")
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
    group = _create_arrays(path, spec, rpc, bool(digests))
    meta = _new_meta(spec, rpc, mask_seed, alpha, bool(digests), extra_meta)
    try:  # written last: a store without it is recognisably an interrupted init
        group.attrs[_ATTR] = meta
    except OSError as exc:
        _remove_new_store(path)
        raise StoreError(os_error_message(exc, path, "creating")) from None
    logger.info("initialized store %s: %d rows in %d-row blocks", path, spec.num_models, rpc)
    return Store(path, group, meta)


def _new_meta(spec: Spec, rpc: int, mask_seed: int | None, alpha: float | None, digests: bool,
              extra_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "spec": spec.to_dict(),
        "spec_sha256": spec.sha256,
        "rows_per_chunk": rpc,
        "mask_seed": None if mask_seed is None else int(mask_seed),
        "alpha": None if alpha is None else float(alpha),
        "experiment_fingerprint": None,
        "store_id": uuid.uuid4().hex,
        "block_digest": DIGEST_ALGORITHM if digests else None,
        "codecs": dict(CODECS),
        "record_folder": RECORD_FOLDER,
        **dict(extra_meta or {}),
    }


def _remove_new_store(path: Path) -> None:
    """Remove what a failed init created in ``path`` (it was empty or absent: nothing else is lost);
    the folder itself stays, and an empty folder does not block the next init."""
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _create_arrays(path: Path, spec: Spec, rpc: int, digests: bool) -> Any:
    """Create the group and its arrays (no chunk written); return the group."""
    import zarr

    try:
        group = zarr.open_group(store=str(path), mode="w-", zarr_format=3)
    except OSError as exc:
        raise StoreError(os_error_message(exc, path, "creating")) from None
    try:
        _add_arrays(group, spec, rpc, digests)
    except OSError as exc:  # e.g. a full disk: leave no half-made store to block the next init
        _remove_new_store(path)
        raise StoreError(os_error_message(exc, path, "creating")) from None
    return group


def _compressors(dtype: np.dtype) -> list[Any]:
    """The codec chain of a new array of ``dtype`` (recorded in the store's ``codecs``).

    Every chain detects changed bytes: a chunk whose bytes changed on disk
    fails to decode instead of decoding into plausible numbers.

    * bool (masks): blosc's bit-shuffle puts each row's i-th bits side by side,
      so zstd sees long runs of kept components; blosc has no checksum of its
      own, so a crc32c of the compressed chunk follows. 25x smaller than a bool
      ``.npy`` at alpha 0.05 for P = 2,304, 22x for P = 82,944
      (``benchmarks/store_size.py``), where plain zstd gave 12.5x.
    * anything else: zarr's default zstd with its frame checksum.
    """
    import zarr

    if np.dtype(dtype) == np.dtype(bool):
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=_BOOL_ZSTD_LEVEL, shuffle="bitshuffle", typesize=1),
                zarr.codecs.Crc32cCodec()]
    return [zarr.codecs.ZstdCodec(level=0, checksum=True)]


def _add_arrays(group: Any, spec: Spec, rpc: int, digests: bool) -> None:
    n = spec.num_models
    compressors = _compressors(np.dtype(np.uint8))
    dims = dimension_names(spec)
    # xarray reads an array's "coordinates" attribute: names not written yet (a build writes them) are skipped
    coords = {"component": " ".join(_COMPONENT_COORDS), "example": " ".join(_EXAMPLE_COORDS)}
    for a in spec.schema:
        shared = dims[a.name][1] if len(dims[a.name]) == 2 else None
        group.create_array(
            a.name,
            shape=(n, *a.shape),
            chunks=(rpc, *a.shape),
            dtype=a.np_dtype,
            fill_value=0,
            compressors=_compressors(a.np_dtype),
            dimension_names=list(dims[a.name]),
            attributes={"coordinates": coords[shared]} if shared in coords else None,
        )
        if shared in coords and shared not in spec.names:  # the dimension's index, known from the spec
            _write_coordinate(group, shared, shared, np.arange(a.shape[0], dtype=np.int64))
    group.create_array(COMPLETED, shape=(n,), chunks=(rpc,), dtype=bool, fill_value=False,
                       compressors=compressors, dimension_names=list(dims[COMPLETED]))
    if digests:
        n_blocks = -(-n // rpc)
        # One chunk per block, like every other array: written only by that block's task.
        group.create_array(DIGESTS, shape=(n_blocks, len(spec.schema), DIGEST_SIZE),
                           chunks=(1, len(spec.schema), DIGEST_SIZE), dtype=np.uint8, fill_value=0,
                           compressors=compressors, dimension_names=list(dims[DIGESTS]))
