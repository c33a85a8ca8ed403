from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coar_dask.errors import SpecError, StoreError, StoreMismatchError, StoreNotFoundError
from coar_dask.core.spec import Spec
from coar_dask.core.store import COMPLETED, default_rows_per_chunk, init_store, open_store

VIT_SPEC = {
    "num_models": 200_000,
    "schema": {"masks": {"dtype": "bool_", "shape": [82944]}, "val_margins": {"dtype": "float16", "shape": [5000]}},
}


def small_spec(n=10, p=6, k=3):
    return {"num_models": n, "schema": {"masks": {"dtype": "bool_", "shape": [p]}, "y": {"dtype": "float16", "shape": [k]}}}


def snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def test_seed_vit_spec_initializes_lazily(tmp_path):
    store = init_store(tmp_path / "vit", VIT_SPEC)
    size = sum(len(v) for v in snapshot(tmp_path / "vit").values())
    assert size < 1_000_000, size
    assert store.array("masks").shape == (200_000, 82944)
    assert store.array("masks").chunks == (store.rows_per_chunk, 82944)
    assert store.array(COMPLETED).chunks == (store.rows_per_chunk,)
    assert store.completed_rows().sum() == 0
    meta = open_store(tmp_path / "vit").meta
    assert meta["spec"] == VIT_SPEC and meta["spec_sha256"] == Spec.from_dict(VIT_SPEC).sha256


def test_block_write_read_round_trip(tmp_path, rng):
    store = init_store(tmp_path / "s", small_spec(), rows_per_chunk=4, mask_seed=3, alpha=0.1)
    assert [(b.start, b.stop) for b in store.blocks()] == [(0, 4), (4, 8), (8, 10)]
    masks = rng.random((2, 6)) > 0.5
    y = rng.normal(size=(2, 3)).astype(np.float16)
    store.write_block(2, {"masks": masks, "y": y})
    again = open_store(tmp_path / "s", read_only=True)
    np.testing.assert_array_equal(again.read_block(2)["masks"], masks)
    np.testing.assert_array_equal(again.read_block(2)["y"], y)
    assert again.completed_rows().tolist() == [False] * 8 + [True] * 2
    assert [b.index for b in again.pending_blocks()] == [0, 1]
    assert again.mask_seed == 3 and again.alpha == 0.1
    rows, data = next(again.iter_completed(["y"]))
    assert rows.tolist() == [8, 9]
    np.testing.assert_array_equal(data["y"], y)


def test_write_block_checks_shapes(tmp_path):
    store = init_store(tmp_path / "s", small_spec(), rows_per_chunk=4)
    with pytest.raises(StoreError, match="shape"):
        store.write_block(0, {"masks": np.ones((3, 6), bool), "y": np.ones((4, 3))})
    with pytest.raises(StoreError, match="missing"):
        store.write_block(0, {"masks": np.ones((4, 6), bool)})
    assert store.completed_rows().sum() == 0


def test_init_again_with_same_spec_is_a_no_op(tmp_path):
    store = init_store(tmp_path / "s", small_spec(), rows_per_chunk=4)
    store.write_block(0, {"masks": np.ones((4, 6), bool), "y": np.ones((4, 3))})
    before = snapshot(tmp_path / "s")
    init_store(tmp_path / "s", small_spec())
    assert snapshot(tmp_path / "s") == before


@pytest.mark.parametrize(
    "kwargs, spec, fragment",
    [
        ({}, small_spec(n=11), "another spec"),
        ({"rows_per_chunk": 5}, small_spec(), "rows_per_chunk"),
        ({"mask_seed": 9}, small_spec(), "mask_seed"),
    ],
)
def test_init_with_other_settings_fails_and_changes_nothing(tmp_path, kwargs, spec, fragment):
    init_store(tmp_path / "s", small_spec(), rows_per_chunk=4, mask_seed=1)
    before = snapshot(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match=fragment):
        init_store(tmp_path / "s", spec, **kwargs)
    assert snapshot(tmp_path / "s") == before


def test_store_path_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="coar-dask init"):
        open_store(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        init_store(f, small_spec())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        init_store(tmp_path / "full", small_spec())
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"


@given(n=st.integers(1, 5000), rpc=st.integers(1, 700))
@settings(max_examples=40, deadline=None)
def test_blocks_tile_the_rows_exactly(tmp_path_factory, n, rpc):
    store = init_store(tmp_path_factory.mktemp("s") / "s", small_spec(n=n), rows_per_chunk=rpc)
    blocks = store.blocks()
    rpc = store.rows_per_chunk
    assert blocks[0].start == 0 and blocks[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert all(len(b) == rpc for b in blocks[:-1]) and 0 < len(blocks[-1]) <= rpc
    rows = np.arange(n)
    assert all(store.block_of_row(r) == r // rpc for r in rows[:: max(1, n // 50)])


@given(st.integers(1, 10**6), st.integers(1, 200_000), st.integers(1, 10**5))
def test_default_chunking_is_bounded(n, p, k):
    spec = Spec.from_dict(small_spec(n=n, p=p, k=k))
    rpc = default_rows_per_chunk(spec)
    assert 1 <= rpc <= min(100, n)
    assert rpc == 1 or rpc * max(p, 2 * k) <= 64 * 2**20


# ------------------------------------------------ the experiment claim (issue 14)


def _claim_in_process(path: str, fingerprint: str, start_at: float) -> str:
    import time as _time

    from coar_dask.core.store import open_store as _open
    from coar_dask.errors import StoreMismatchError as _Mismatch

    while _time.time() < start_at:
        pass
    try:
        _open(path).claim({"experiment_fingerprint": fingerprint})
        return "won"
    except _Mismatch:
        return "refused"


def test_concurrent_claims_of_different_experiments_have_one_winner(tmp_path):
    import multiprocessing
    import time

    from coar_dask.errors import StoreMismatchError

    store = init_store(tmp_path / "s", {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [3]}}})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        start = time.time() + 3.0  # every process is up and spinning before the first claim
        results = pool.starmap(_claim_in_process, [(str(store.path), f"fp{i}", start) for i in range(4)])
    assert sorted(results) == ["refused"] * 3 + ["won"]
    winner = f"fp{results.index('won')}"
    assert store.read_claim()["experiment_fingerprint"] == winner
    assert store.claim({"experiment_fingerprint": winner})["experiment_fingerprint"] == winner  # idempotent
    with pytest.raises(StoreMismatchError, match="belongs to another experiment"):
        store.claim({"experiment_fingerprint": "other"})
    assert not list(store.path.rglob("*.partial"))  # the temporary claim files are gone


def test_claim_falls_back_to_exclusive_create_without_hard_links(tmp_path, monkeypatch):
    import errno
    import os

    store = init_store(tmp_path / "s", {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [3]}}})

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    assert store.claim({"experiment_fingerprint": "a"})["experiment_fingerprint"] == "a"
    with pytest.raises(StoreMismatchError):
        store.claim({"experiment_fingerprint": "b"})


def test_relative_paths_become_absolute_and_digests_are_on_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = init_store("rel", {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [3]}}})
    assert store.path == tmp_path / "rel" and open_store("rel").path == tmp_path / "rel"
    assert store.has_digests and store.status()["block_digests"]
    with pytest.raises(SpecError, match="reserved"):  # the spec refuses it (core.spec.RESERVED_NAMES)
        init_store("bad", {"num_models": 1, "schema": {"_digests": {"dtype": "bool_", "shape": [1]}}})
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------- codecs (issue 16.1)


def _codec_names(array) -> list[str]:
    return [type(c).__name__ for c in array.metadata.codecs]


def _masks_and_outputs(n, p, k, alpha=0.05):
    from coar_dask.core.masks import sample_masks

    masks = sample_masks(0, range(n), p, alpha)
    w = np.random.default_rng(1).normal(size=(p, k))
    return masks, (masks @ w / np.sqrt(p)).astype(np.float16)


def _fill(store, masks, y):
    for b in store.blocks():
        store.write_block(b.index, {"masks": masks[b.start:b.stop], "y": y[b.start:b.stop]})


def test_new_stores_bit_shuffle_masks_with_a_checksum_and_record_it(tmp_path):
    from coar_dask.core.store import CODECS

    store = init_store(tmp_path / "s", small_spec(n=400, p=2304, k=3), rows_per_chunk=100)
    assert _codec_names(store.array("masks")) == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
    assert _codec_names(store.array("y"))[-1] == "ZstdCodec"
    assert store.meta["codecs"] == CODECS and "bitshuffle" in CODECS["bool"]
    masks, y = _masks_and_outputs(400, 2304, 3)
    _fill(store, masks, y)
    on_disk = sum((store.path / "masks" / "c" / str(b) / "0").stat().st_size for b in range(4))
    assert masks.nbytes / on_disk >= 20, masks.nbytes / on_disk  # the bool .npy's bytes, less its header
    np.testing.assert_array_equal(open_store(store.path).array("masks")[:], masks)


def test_a_store_with_the_previous_codec_opens_verifies_and_fits_the_same(tmp_path, monkeypatch):
    """Stores written before the bit-shuffled masks (zstd on every array, no ``codecs`` record)."""
    import zarr

    from coar_dask.core import store as store_mod
    from coar_dask.core.verify import verify_store
    from coar_dask.fit.fit import fit

    masks, y = _masks_and_outputs(400, 64, 3, alpha=0.1)
    new = init_store(tmp_path / "new", small_spec(n=400, p=64, k=3), rows_per_chunk=50, mask_seed=0, alpha=0.1)
    _fill(new, masks, y)
    monkeypatch.setattr(store_mod, "_compressors", lambda dtype: [zarr.codecs.ZstdCodec(level=0, checksum=True)])
    old = init_store(tmp_path / "old", small_spec(n=400, p=64, k=3), rows_per_chunk=50, mask_seed=0, alpha=0.1)
    monkeypatch.undo()
    _fill(old, masks, y)
    meta = old.meta
    del meta["codecs"]
    zarr.open_group(str(old.path), mode="r+").attrs["coar_dask"] = meta
    old = open_store(old.path)
    assert _codec_names(old.array("masks")) == ["BytesCodec", "ZstdCodec"] and "codecs" not in old.meta
    assert old.status()["codecs"]["bool"] == "zstd0+checksum" and "bitshuffle" in new.status()["codecs"]["bool"]
    assert verify_store(old.path).ok and verify_store(new.path).ok
    a, b = fit(old), fit(new)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)


def test_repr_html_shows_rows_arrays_and_the_experiment(tmp_path):
    """Issue 24 item 2: a Store shows itself in a notebook: path, rows completed and pending, each
    array's dims, shape, chunks and dtype, and the experiment it records, in one line."""
    store = init_store(tmp_path / "s", small_spec(n=10, p=6, k=3), rows_per_chunk=5,
                       extra_meta={"experiment": {"model": {"factory": "pkg.models:net"},
                                                  "examples": {"factory": "pkg.data:val"}, "output": "margin",
                                                  "alpha": 0.05, "mask_seed": 0}})
    rng = np.random.default_rng(0)
    store.write_block(1, {"masks": rng.random((5, 6)) > 0.5, "y": rng.normal(size=(5, 3))})
    html = store._repr_html_()
    assert html.startswith("<div><strong>coar_dask.Store</strong><table>") and html.endswith("</table></div>")
    assert str(store.path) in html and "5 completed, 5 pending (2 blocks of 5)" in html
    assert "pkg.models:net on pkg.data:val, output margin, alpha 0.05, mask seed 0" in html
    assert "<td style='text-align:left'>masks</td><td style='text-align:left'>row, component</td>" \
           "<td style='text-align:left'>(10, 6)</td><td style='text-align:left'>(5, 6)</td>" \
           "<td style='text-align:left'>bool</td>" in html
    assert "<td style='text-align:left'>row, example</td><td style='text-align:left'>(10, 3)</td>" \
           "<td style='text-align:left'>(5, 3)</td><td style='text-align:left'>float16</td>" in html
    assert "5 completed" in repr(store)
    plain = init_store(tmp_path / "p", {"num_models": 2, "schema": {"a<b": {"dtype": "float32", "shape": [1]}}})
    assert "a&lt;b" in plain._repr_html_() and "<td style='text-align:left'>-</td>" in plain._repr_html_()
