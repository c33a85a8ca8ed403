"""What write_block makes durable, and in which order: the chunk folders' entries are synced with
the chunks, and a completed block rewritten is pending until its new data and digest are on disk."""

from __future__ import annotations

import os

import numpy as np
import pytest

from coar_dask.core import durability
from coar_dask.core.spec import Spec
from coar_dask.core.store import init_store, open_store
from coar_dask.core.verify import verify_store


def small_store(path):
    spec = Spec.from_dict({"num_models": 8, "schema": {"masks": {"dtype": "bool_", "shape": [3]},
                                                      "y": {"dtype": "float32", "shape": [5]}}})
    return init_store(path, spec, rows_per_chunk=4)


def block(seed):
    rng = np.random.default_rng(seed)
    return {"masks": rng.random((4, 3)) > 0.2, "y": rng.normal(size=(4, 5)).astype(np.float32)}


def test_every_folder_of_a_new_chunk_is_synced(tmp_path, monkeypatch):
    store = small_store(tmp_path / "s")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.write_block(1, block(0))
    root = str(store.path)
    for name in ("masks", "y"):
        chunk = store.chunk_path(name, 1)
        assert str(chunk) in synced
        # the chunk's folder (masks/c/1) and the folder holding its entry (masks/c), created for this block
        assert str(chunk.parent) in synced and str(chunk.parent.parent) in synced
        assert root not in synced  # nothing above the array folders changes
    flags = store.chunk_path("_completed", 1)
    assert synced.index(str(flags)) > max(synced.index(str(store.chunk_path(n, 1))) for n in ("masks", "y"))


def test_a_rewrite_cut_short_leaves_the_block_pending(tmp_path, monkeypatch):
    """Rewriting a completed block: if the new data is written but the process dies before the
    flags, the block is pending (to be rebuilt), not completed with data its digest does not match."""
    store = small_store(tmp_path / "s")
    store.write_block(0, block(0))
    assert store.completed_blocks()[0]

    def dies_after_the_data(writes):
        for arr, selection, values in writes[:1]:  # the masks reach the disk, then the process dies
            arr[selection] = values
        raise KeyboardInterrupt

    monkeypatch.setattr(durability, "write_concurrently", dies_after_the_data)
    with pytest.raises(KeyboardInterrupt):
        store.write_block(0, block(1))
    reopened = open_store(store.path)
    assert not reopened.completed_blocks()[0]
    report = verify_store(store.path)
    assert report.intact, report.format()
    monkeypatch.undo()
    reopened.write_block(0, block(1))  # the rebuild completes it again, with a digest of the new data
    report = verify_store(store.path)
    assert report.intact and open_store(store.path).completed_blocks()[0], report.format()
    np.testing.assert_array_equal(open_store(store.path).read_verified(0)["y"], block(1)["y"])


def test_a_first_write_reads_no_flag_to_clear(tmp_path, monkeypatch):
    """A pending block is written data, digests, flags: the flags are not cleared (and synced) first.
    (Cleared flags are the fill value: zarr deletes their chunk, and its folder is synced instead.)"""
    store = small_store(tmp_path / "s")
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    store.write_block(0, block(0))
    assert synced.count(str(store.chunk_path("_completed", 0))) == 1
    synced.clear()
    store.write_block(0, block(1))  # a rewrite: cleared (the chunk deleted, its folder synced), then set
    flags = store.chunk_path("_completed", 0)
    assert synced.count(str(flags)) == 1 and synced.count(str(flags.parent)) == 2
    assert synced.index(str(flags.parent)) < synced.index(str(store.chunk_path("y", 0)))


def test_a_block_whose_flags_chunk_is_damaged_can_be_rewritten(tmp_path):
    """Reading the flags before a rewrite must not make a damaged flags chunk block the rebuild."""
    store = small_store(tmp_path / "s")
    store.write_block(0, block(0))
    flags = store.chunk_path("_completed", 0)
    flags.write_bytes(b"not a zstd frame")
    reopened = open_store(store.path)
    reopened.write_block(0, block(1))
    assert open_store(store.path).completed_blocks()[0]
    report = verify_store(store.path)
    assert report.intact, report.format()


def test_read_exclusive_reads_a_valid_record_and_refuses_a_damaged_one(tmp_path):
    from coar_dask.core.durability import create_exclusive, read_exclusive

    path = tmp_path / "record.json"
    assert read_exclusive(path, lambda r: True) is None
    create_exclusive(path, '{"id": "a"}')
    assert read_exclusive(path, lambda r: isinstance(r.get("id"), str)) == {"id": "a"}
    path.write_text('{"other": 1}')
    with pytest.raises(ValueError):
        read_exclusive(path, lambda r: isinstance(r.get("id"), str), tries=2)
    path.write_text("not json")
    with pytest.raises(ValueError):
        read_exclusive(path, lambda r: True, tries=2)
