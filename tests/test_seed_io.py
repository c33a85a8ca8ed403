"""The seed's .npy store layout: import into zarr, export back, round trip."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from coar_dask.errors import SpecError, StoreError
from coar_dask.cli.npy import add_export_npy_parser, add_import_npy_parser
from coar_dask.formats.npy import export_npy, import_npy, npy_spec
from coar_dask.core.store import COMPLETED, init_store, open_store

N, P, K = 130, 24, 5


def _seed_dir(path, n=N, completed=True, extra=None):
    """A directory as the seed's initialize_store.py + make_dataset.py leave it."""
    path.mkdir()
    rng = np.random.default_rng(3)
    masks = np.lib.format.open_memmap(path / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, P))
    margins = np.lib.format.open_memmap(path / "test_margins.npy", mode="w+", dtype=np.float16, shape=(n, K))
    done = rng.random(n) < 0.7
    masks[done] = rng.random((int(done.sum()), P)) < 0.9
    margins[done] = rng.standard_normal((int(done.sum()), K))
    masks.flush(), margins.flush()
    if completed:
        flags = np.lib.format.open_memmap(path / "_completed.npy", mode="w+", dtype=np.bool_, shape=(n,))
        flags[:] = done
        flags.flush()
    for name, arr in (extra or {}).items():
        np.save(path / f"{name}.npy", arr)
    return path, np.asarray(masks).copy(), np.asarray(margins).copy(), done


def test_npy_spec_reads_headers(tmp_path):
    d, *_ = _seed_dir(tmp_path / "seed")
    spec = npy_spec(d)
    assert spec.to_dict() == {
        "num_models": N,
        "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                   "test_margins": {"dtype": "float16", "shape": [K]}},
    }
    assert npy_spec(d, ["masks"]).names == ("masks",)


def test_import_copies_values_and_completion_block_by_block(tmp_path):
    d, masks, margins, done = _seed_dir(tmp_path / "seed")
    store = import_npy(d, tmp_path / "store", rows_per_chunk=32)
    assert store.rows_per_chunk == 32 and store.n_blocks == 5
    np.testing.assert_array_equal(store.array("masks")[:], masks)
    np.testing.assert_array_equal(store.array("test_margins")[:], margins)
    np.testing.assert_array_equal(store.completed_rows(), done)
    assert store.meta["imported_from"].endswith("seed")


def test_round_trip_store_npy_store(tmp_path):
    d, masks, margins, done = _seed_dir(tmp_path / "seed")
    first = import_npy(d, tmp_path / "a", rows_per_chunk=50)
    out = export_npy(first, tmp_path / "exported")
    assert sorted(p.name for p in out.glob("*.npy")) == ["_completed.npy", "masks.npy", "test_margins.npy"]
    for name, want in (("masks", masks), ("test_margins", margins), (COMPLETED, done)):
        got = np.load(out / f"{name}.npy", mmap_mode="r")
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    second = import_npy(out, tmp_path / "b", rows_per_chunk=50)
    assert second.spec == first.spec
    for name in ("masks", "test_margins", COMPLETED):
        np.testing.assert_array_equal(second.array(name)[:], first.array(name)[:])


def test_export_of_a_built_store_is_what_the_seed_reads(tmp_path):
    store = init_store(tmp_path / "s", {"num_models": 10, "schema": {
        "masks": {"dtype": "bool_", "shape": [4]}, "val_margins": {"dtype": "float16", "shape": [3]}}},
        rows_per_chunk=4)
    store.write_block(1, {"masks": np.ones((4, 4), bool), "val_margins": np.full((4, 3), 2.5)})
    out = export_npy(store.path, tmp_path / "npy")
    # The seed opens these with np.lib.format.open_memmap(path, mode='r').
    comp = np.lib.format.open_memmap(out / "_completed.npy", mode="r")
    assert comp.shape == (10,) and comp.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert np.lib.format.open_memmap(out / "val_margins.npy", mode="r")[5].tolist() == [2.5] * 3


def test_errors_name_the_fix(tmp_path):
    d, *_ = _seed_dir(tmp_path / "seed")
    store = import_npy(d, tmp_path / "store")
    with pytest.raises(StoreError, match="overwrite"):
        import_npy(d, tmp_path / "store")
    assert import_npy(d, tmp_path / "store", overwrite=True).num_rows == N
    with pytest.raises(StoreError, match="overwrite"):
        export_npy(store, d)
    with pytest.raises(StoreError, match="has no"):
        npy_spec(d, ["val_margins"])

    nocomp, *_ = _seed_dir(tmp_path / "nocomp", completed=False)
    with pytest.raises(StoreError, match="mark_all_completed"):
        import_npy(nocomp, tmp_path / "s2")
    assert import_npy(nocomp, tmp_path / "s2", mark_all_completed=True).completed_rows().all()

    ragged, *_ = _seed_dir(tmp_path / "ragged", extra={"other": np.zeros((N + 1, 2), np.float32)})
    with pytest.raises(StoreError, match="row counts"):
        npy_spec(ragged)
    bad, *_ = _seed_dir(tmp_path / "bad", extra={"_x": np.zeros((N, 2), np.complex64)})
    with pytest.raises(StoreError, match="complex64"):
        npy_spec(bad)
    zero_width, *_ = _seed_dir(tmp_path / "zero", extra={"x": np.zeros((N, 0), np.float32)})
    with pytest.raises(SpecError):
        npy_spec(zero_width)


def test_cli_glue(tmp_path, capsys):
    d, masks, *_ = _seed_dir(tmp_path / "seed")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_import_npy_parser(sub)
    add_export_npy_parser(sub)
    args = parser.parse_args(["import-npy", str(d), "--cfg.data_dir", str(tmp_path / "st"), "--rows-per-chunk", "40"])
    assert args.func(args) == 0
    assert open_store(tmp_path / "st").rows_per_chunk == 40
    args = parser.parse_args(["export-npy", "--store", str(tmp_path / "st"), "--logging.logdir", str(tmp_path / "o")])
    assert args.func(args) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "masks.npy"), masks)
    assert "masks.npy" in capsys.readouterr().out
