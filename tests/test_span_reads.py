"""Store.iter_completed reads runs of consecutive blocks with one zarr call per array: the same rows
and values as block-by-block reads, whatever rows are asked for, and the same refusal, at the same
block and after the same earlier blocks, when one block of a run is bad."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coar_dask.core import store as store_mod
from coar_dask.core.spec import Spec
from coar_dask.core.store import init_store, open_store
from coar_dask.errors import CorruptBlockError

ROWS, RPC = 60, 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("span") / "s"
    spec = Spec.from_dict({"num_models": ROWS, "schema": {"masks": {"dtype": "bool_", "shape": [7]},
                                                         "y": {"dtype": "float16", "shape": [3]}}})
    store = init_store(path, spec, rows_per_chunk=RPC)
    rng = np.random.default_rng(0)
    masks = rng.random((ROWS, 7)) > 0.2
    y = rng.normal(size=(ROWS, 3)).astype(np.float16)
    for b in store.blocks():
        if b.index != 7:  # block 7 stays pending
            store.write_block(b.index, {"masks": masks[b.start:b.stop], "y": y[b.start:b.stop]})
    return path, masks, y


def collect(store, rows=None):
    got_rows, got = [], {"masks": [], "y": []}
    for r, data in store.iter_completed(["masks", "y"], rows=rows):
        got_rows.append(r)
        for n in got:
            got[n].append(data[n])
    return np.concatenate(got_rows), {n: np.concatenate(v) for n, v in got.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=40), span=st.integers(1, 6))
def test_spans_return_what_blocks_do(built, picks, span, monkeypatch):
    path, masks, y = built
    monkeypatch.setattr(store_mod, "SPAN_BLOCKS", span)
    store = open_store(path, read_only=True)
    rows = np.array([r for r in picks if r // RPC != 7])
    if rows.size == 0:
        return
    got_rows, got = collect(store, rows)
    want = np.sort(rows)  # repeated rows are read as often as asked for, as block by block
    np.testing.assert_array_equal(got_rows, want)
    np.testing.assert_array_equal(got["masks"], masks[want])
    np.testing.assert_array_equal(got["y"], y[want])


def test_spans_are_read_with_one_call_per_array(built, monkeypatch):
    path, masks, _ = built
    store = open_store(path, read_only=True)
    calls = []
    real = store_mod.Store._read_span

    def spy(self, first, last, names, arrays):
        calls.append((first, last))
        return real(self, first, last, names, arrays)

    monkeypatch.setattr(store_mod.Store, "_read_span", spy)
    rows, got = collect(store)
    assert calls == [(0, 6), (8, 11)]  # block 7 is pending: two runs of consecutive blocks
    np.testing.assert_array_equal(got["masks"], masks[rows])


def damage(path, how, block=3):
    store = open_store(path)
    chunk = store.chunk_path("y", block)
    if how == "swap":
        other = store.chunk_path("y", 4)
        data = chunk.read_bytes()
        chunk.write_bytes(other.read_bytes())
        other.write_bytes(data)
        return [3, 4]
    if how == "bytes":
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    elif how == "fifo":
        chunk.unlink()
        os.mkfifo(chunk)
    elif how == "link":
        target = chunk.with_name("elsewhere")
        shutil.move(chunk, target)
        chunk.symlink_to(target)
    elif how == "deleted":
        chunk.unlink()
    return [block]


@pytest.mark.parametrize("how", ["swap", "bytes", "fifo", "link", "deleted"])
def test_a_bad_block_in_a_span_is_refused_after_the_blocks_before_it(built, tmp_path, how):
    src, _, _ = built
    path = tmp_path / "s"
    shutil.copytree(src, path)
    bad = damage(path, how)
    store = open_store(path, read_only=True)
    seen = []
    with pytest.raises(CorruptBlockError, match=rf"block {bad[0]} \(rows {bad[0] * RPC}-") as err:
        for rows, _ in store.iter_completed(["masks", "y"]):
            seen.append(int(rows[0]) // RPC)
    assert seen == list(range(bad[0]))  # every block before the bad one, none after
    assert "coar-dask repair" in str(err.value)
