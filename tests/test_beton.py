"""FFCV .beton export and reading: the seed's fields, streaming, round trips, errors."""

from __future__ import annotations

import gc
import importlib.util
import pickle
import sys

import numpy as np
import pytest

from coar_dask.formats import beton
from coar_dask.formats.beton import layout, write
from coar_dask.errors import CoarError, MissingDependencyError, StoreError
from coar_dask.core.store import init_store
from coar_dask.fit.rows import StoreRows
from coar_dask.solvers.lstsq import lstsq

# numba (0.68) prints "Exception ignored ... KeyError" from a dispatcher
# finalizer when an FFCV Loader is freed after another one compiled the same
# kernels; it is harmless. Collect after each test so that it surfaces (and is
# ignored) here rather than at the end of the session.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_loaders():
    yield
    gc.collect()


P, K, N, RPC = 48, 7, 230, 40
SKIPPED_BLOCK = 2  # left unbuilt: rows 80..119 stay incomplete


# --------------------------------------------------------------------------
# Without FFCV
# --------------------------------------------------------------------------
def test_missing_ffcv_names_the_install_steps(monkeypatch):
    monkeypatch.setattr(layout, "_FFCV", None)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    monkeypatch.setitem(sys.modules, "ffcv.fields", None)
    with pytest.raises(MissingDependencyError) as err:
        beton.import_ffcv()
    text = str(err.value)
    assert "pip install 'coar_dask[ffcv]'" in text
    assert "libopencv-dev libturbojpeg0-dev pkg-config" in text
    assert isinstance(err.value, ImportError) and isinstance(err.value, CoarError)


@pytest.mark.parametrize(
    "given, expected",
    [(None, (0, K)), (-1, (0, K)), (3, (3, 4)), ((2, 5), (2, 5)), ((2, -1), (2, K)), (slice(1, 3), (1, 3))],
)
def test_y_slice_forms(given, expected):
    assert write._parse_y_slice(given, K) == expected


@pytest.mark.parametrize("bad", [K, (5, 2), (0, K + 1), "3", slice(0, 4, 2)])
def test_y_slice_out_of_range_is_a_store_error(bad):
    with pytest.raises(StoreError):
        write._parse_y_slice(bad, K)


def test_page_size_fits_rows_and_shrinks_for_small_exports():
    assert write._page_size(100, 10, 2) == 1 << 21
    assert write._page_size(100, 10**6, 2) == 1 << 23
    assert write._page_size(20 << 20, 10, 2) == 32 << 20  # a 20 MiB row needs 32 MiB pages


# --------------------------------------------------------------------------
# Fixtures: one small store with an incomplete block, exported once
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("beton") / "store"
    s = init_store(
        path,
        {"num_models": N, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                     "val_margins": {"dtype": "float16", "shape": [K]}}},
        rows_per_chunk=RPC,
    )
    rng = np.random.default_rng(0)
    for b in s.blocks():
        if b.index == SKIPPED_BLOCK:
            continue
        masks = rng.random((len(b), P)) < 0.9
        s.write_block(b.index, {"masks": masks, "val_margins": rng.standard_normal((len(b), K)) * 3})
    return s


@pytest.fixture(scope="module")
def ffcv():
    # Skip only where FFCV is not installed: an installed FFCV that fails to import is an error.
    if importlib.util.find_spec("ffcv") is None:
        pytest.skip("needs the ffcv extra (pip install 'coar_dask[ffcv]')")
    return beton.import_ffcv()


@pytest.fixture(scope="module")
def exported(store, ffcv, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "component_datasets.beton"
    return beton.export_beton(store, out, y_name="val_margins", num_workers=2)


def _zarr_rows(store, rows):
    x = store.array("masks")[:][rows]
    y = store.array("val_margins")[:][rows].astype(np.float32)
    return x, y


def _read_all(rows_source):
    parts = list(rows_source.indexed_blocks())
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------
@pytest.mark.ffcv
def test_export_writes_completed_rows_with_the_seeds_fields(store, exported):
    done = np.flatnonzero(store.completed_rows())
    assert done.size == N - RPC
    assert exported.n_rows == done.size
    assert exported.fields == ("mask", "targets", "idx")
    assert (exported.n_features, exported.n_targets, exported.x_dtype) == (P, K, "bool")
    info = beton.inspect_beton(exported.path)
    assert (info.n_rows, info.n_features, info.n_targets) == (done.size, P, K)


@pytest.mark.ffcv
def test_reading_back_gives_the_stores_rows_and_values(store, exported):
    idx, x, y = _read_all(beton.BetonRows(exported.path, batch_size=64))
    done = np.flatnonzero(store.completed_rows())
    np.testing.assert_array_equal(idx, done)
    zx, zy = _zarr_rows(store, done)
    assert x.dtype == np.bool_
    np.testing.assert_array_equal(x, zx)
    np.testing.assert_array_equal(y, zy)


@pytest.mark.ffcv
def test_ignore_completed_and_y_slice(store, ffcv, tmp_path):
    info = beton.export_beton(store, tmp_path / "all.beton", ignore_completed=True, y_slice=4, num_workers=1)
    assert (info.n_rows, info.n_targets) == (N, 1)
    idx, x, y = _read_all(beton.BetonRows(info.path))
    np.testing.assert_array_equal(idx, np.arange(N))
    zx, zy = _zarr_rows(store, np.arange(N))
    np.testing.assert_array_equal(x, zx)
    np.testing.assert_array_equal(y, zy[:, 4:5])
    assert not x[SKIPPED_BLOCK * RPC :(SKIPPED_BLOCK + 1) * RPC].any()  # unbuilt rows are zeros


@pytest.mark.ffcv
def test_export_streams_one_block_per_process(store, monkeypatch):
    """The writer's dataset reads each store block once, holding one at a time."""
    src = write._open_source(store, "masks", "val_margins", "_completed")
    calls = []
    real = src.read_block
    monkeypatch.setattr(src, "read_block", lambda b: calls.append(b) or real(b))
    rows = np.flatnonzero(store.completed_rows())
    ds = write._BlockDataset(src, rows, (0, K))
    for i in range(len(ds)):
        x, y, row = ds[i]
        assert row == rows[i] and x.shape == (P,) and y.dtype == np.float32
    assert calls == [b for b in range(store.n_blocks) if b != SKIPPED_BLOCK]
    assert ds._x.shape[0] <= RPC  # only the last block is held
    monkeypatch.undo()
    assert pickle.loads(pickle.dumps(ds))._x is None  # nothing cached travels to a new process


@pytest.mark.ffcv
def test_export_from_a_seed_npy_directory(store, exported, ffcv, tmp_path):
    from coar_dask.formats.npy import export_npy

    seed_dir = export_npy(store, tmp_path / "seed")
    info = beton.export_beton(seed_dir, tmp_path / "from_npy.beton", y_name="val_margins", num_workers=1)
    assert info.n_rows == exported.n_rows
    a, b = _read_all(beton.BetonRows(info.path)), _read_all(beton.BetonRows(exported.path))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.ffcv
def test_export_errors_name_the_fix(store, ffcv, tmp_path):
    with pytest.raises(StoreError, match="y_name"):
        beton.export_beton(store, tmp_path / "x.beton", x_name="masks", y_name="margins")
    empty = init_store(tmp_path / "empty", store.spec.to_dict(), rows_per_chunk=RPC)
    with pytest.raises(StoreError, match="ignore_completed"):
        beton.export_beton(empty, tmp_path / "x.beton")
    assert not (tmp_path / "x.beton").exists()


@pytest.mark.ffcv
def test_export_replaces_an_existing_file_only_when_asked(store, exported, tmp_path):
    import shutil

    from coar_dask.errors import ConfigError

    out = tmp_path / "existing.beton"
    shutil.copyfile(exported.path, out)
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        beton.export_beton(store, out, y_name="val_margins", y_slice=0, num_workers=1)
    assert out.read_bytes() == before
    info = beton.export_beton(store, out, y_name="val_margins", y_slice=0, num_workers=1, overwrite=True)
    assert info.n_targets == 1 and beton.inspect_beton(out).n_targets == 1


# --------------------------------------------------------------------------
# Reading, and compatibility with the seed's loader and writer
# --------------------------------------------------------------------------
@pytest.mark.ffcv
def test_seed_loader_pipeline_reads_our_file(store, exported, ffcv):
    """The seed's run_regression pipelines (minus its CUDA ToDevice), RANDOM order."""
    import torch

    n = exported.n_rows
    loader = ffcv.Loader(
        str(exported.path), batch_size=19, num_workers=1, order=ffcv.OrderOption.RANDOM,
        indices=np.arange(n), drop_last=True, os_cache=True,
        pipelines={
            "mask": [ffcv.NDArrayDecoder(), ffcv.ToTensor()],
            "targets": [ffcv.NDArrayDecoder(), ffcv.ToTensor()],
            "idx": [ffcv.IntDecoder(), ffcv.ToTensor(), ffcv.Squeeze()],
        },
    )
    seen = []
    for mask, targets, idx in loader:
        assert mask.dtype == torch.bool and targets.dtype == torch.float32 and idx.ndim == 1
        zx, zy = _zarr_rows(store, idx.numpy())
        np.testing.assert_array_equal(mask.numpy(), zx)
        np.testing.assert_array_equal(targets.numpy(), zy)
        seen.append(idx.numpy().copy())
    assert len(np.concatenate(seen)) == (n // 19) * 19


@pytest.mark.ffcv
def test_reads_a_beton_written_like_the_seed(ffcv, tmp_path):
    """A file written as the seed's write_dataset.py does (its dataset class
    yields (mask, float32 targets, index)) reads here."""
    rng = np.random.default_rng(1)
    masks = rng.random((50, 12)) < 0.8
    ys = rng.standard_normal((50, 3)).astype(np.float16)

    class SeedDataset:
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return masks[i], ys[i].astype("float32"), i

    path = tmp_path / "seed.beton"
    writer = ffcv.DatasetWriter(str(path), {
        "mask": ffcv.NDArrayField(dtype=masks.dtype, shape=(12,)),
        "targets": ffcv.NDArrayField(dtype=np.dtype("float32"), shape=(3,)),
        "idx": ffcv.IntField(),
    }, num_workers=1)
    writer.from_indexed_dataset(SeedDataset())
    src = beton.BetonRows(path, rows=np.arange(40), target_slice=(1, -1), batch_size=16)
    assert (src.n_rows, src.n_features, src.n_targets) == (40, 12, 2)
    X = np.concatenate([x for x, _ in src.blocks()])
    Y = np.concatenate([y for _, y in src.blocks()])
    assert X.dtype == np.float32 and Y.dtype == np.float32
    np.testing.assert_array_equal(X, masks[:40].astype(np.float32))
    np.testing.assert_array_equal(Y, ys[:40, 1:].astype(np.float32))


@pytest.mark.ffcv
def test_beton_without_the_expected_fields_says_what_it_has(ffcv, tmp_path):
    path = tmp_path / "other.beton"
    writer = ffcv.DatasetWriter(str(path), {"x": ffcv.NDArrayField(dtype=np.dtype("float32"), shape=(2,)),
                                            "label": ffcv.IntField()}, num_workers=1)

    class DS:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.zeros(2, np.float32), i

    writer.from_indexed_dataset(DS())
    with pytest.raises(beton.BetonError) as err:
        beton.inspect_beton(path)
    assert "'mask'" in str(err.value) and "'x'" in str(err.value) and "'label'" in str(err.value)
    assert isinstance(err.value, CoarError)


@pytest.mark.ffcv
def test_missing_or_garbage_file(ffcv, tmp_path):
    with pytest.raises(beton.BetonNotFoundError, match="write_dataset"):
        beton.BetonRows(tmp_path / "nope.beton")
    assert issubclass(beton.BetonNotFoundError, FileNotFoundError)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton" * 10)
    with pytest.raises(beton.BetonError, match="not a .beton"):
        beton.inspect_beton(junk)


@pytest.mark.ffcv
def test_beton_rows_subset_slice_and_errors(store, exported):
    done = np.flatnonzero(store.completed_rows())
    src = beton.BetonRows(exported.path, rows=[5, 0, 7], target_slice=(2, 5))
    idx, x, y = _read_all(src)
    np.testing.assert_array_equal(idx, done[[5, 0, 7]])  # positions, in the order given
    np.testing.assert_array_equal(y, _zarr_rows(store, idx)[1][:, 2:5])
    with pytest.raises(beton.BetonError, match="num_train"):
        beton.BetonRows(exported.path, rows=[exported.n_rows])
    with pytest.raises(beton.BetonError, match="target slice"):
        beton.BetonRows(exported.path, target_slice=(3, K + 1))


@pytest.mark.ffcv
def test_reading_keeps_torch_threads_and_pickles(exported):
    import torch

    before = torch.get_num_threads()
    src = beton.BetonRows(exported.path, num_workers=2, batch_size=50)
    first = [x.copy() for x, _ in src.blocks()]
    assert torch.get_num_threads() == before
    again = pickle.loads(pickle.dumps(src))
    for a, b in zip(first, (x for x, _ in again.blocks())):
        np.testing.assert_array_equal(a, b)


@pytest.mark.ffcv
def test_fit_from_beton_equals_fit_from_store(store, exported):
    done = np.flatnonzero(store.completed_rows())
    from_store = lstsq(StoreRows(store, done, "masks", "val_margins"))
    from_beton = lstsq(beton.BetonRows(exported.path, batch_size=37))
    np.testing.assert_allclose(from_beton.weight, from_store.weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_beton.bias, from_store.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.ffcv
@pytest.mark.gpu
def test_torch_blocks_on_cuda_use_todevice(store, exported):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src = beton.BetonRows(exported.path, batch_size=64)
    parts = list(src.torch_blocks("cuda"))
    assert all(x.is_cuda and y.is_cuda and i.is_cuda for i, x, y in parts)
    idx = torch.cat([i for i, _, _ in parts]).cpu().numpy()
    x = torch.cat([x for _, x, _ in parts]).cpu().numpy()
    np.testing.assert_array_equal(x, _zarr_rows(store, idx)[0])


@pytest.mark.ffcv
def test_export_benchmark_runs_and_reports_its_ratio(ffcv, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "beton_export.py"
    spec = importlib.util.spec_from_file_location("beton_export_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--rows", "300", "--components", "64", "--outputs", "8", "--rounds", "1", "--workers", "1",
                       "--tmpdir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("raw_rows_per_s", "export_rows_per_s", "raw_mb_per_s", "export_mb_per_s", "export_over_raw"):
        assert result[key] > 0
    assert result["same_file_size"] and result["sizes"]["rows"] == 300


# --------------------------------------------------------------------------
# Integrity (issue 14): truncated files, damaged or swapped store chunks
# --------------------------------------------------------------------------
@pytest.mark.ffcv
@pytest.mark.parametrize("cut", [1, 64, 5000])
def test_a_truncated_beton_is_refused_when_opened(exported, cut, tmp_path):
    import shutil

    short = tmp_path / "short.beton"
    shutil.copyfile(exported.path, short)
    with open(short, "r+b") as f:
        f.truncate(exported.path.stat().st_size - cut)
    with pytest.raises(beton.BetonError, match="truncated") as err:
        beton.BetonRows(short)
    assert "\n" not in str(err.value)
    with pytest.raises(beton.BetonError, match="truncated"):
        beton.inspect_beton(short)
    beton.inspect_beton(exported.path)  # the whole file still opens


def _damaged_copy(store, tmp_path, damage):
    import shutil

    from coar_dask.core.store import open_store

    path = tmp_path / "damaged"
    shutil.copytree(store.path, path)
    damage(path)
    return open_store(path, read_only=True)


def _garbage(path):
    chunk = path / "val_margins" / "c" / "1" / "0"
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(60))  # a zstd magic number, then nothing valid


def _swap_0_3(path):
    import os

    a, b = path / "masks" / "c" / "0" / "0", path / "masks" / "c" / "3" / "0"
    os.replace(a, path / "tmp")
    os.replace(b, a)
    os.replace(path / "tmp", b)


@pytest.mark.ffcv
@pytest.mark.parametrize("damage, block", [(_garbage, 1), (_swap_0_3, 0)], ids=["damaged-bytes", "swapped"])
def test_export_of_a_bad_block_is_one_error_not_a_hang(store, ffcv, tmp_path, damage, block):
    from coar_dask.errors import CorruptBlockError

    bad = _damaged_copy(store, tmp_path, damage)
    out = tmp_path / "out.beton"
    with pytest.raises(CorruptBlockError, match=rf"block {block} .*coar-dask repair") as err:
        beton.export_beton(bad, out, y_name="val_margins", num_workers=2)
    assert "\n" not in str(err.value) and "was not written" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("out.beton*"))
