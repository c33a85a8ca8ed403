"""Issue 16: the store as Dask arrays, and row-parallel least-squares fits, on a real LocalCluster."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from coar_dask.core.masks import sample_masks
from coar_dask.core.store import COMPLETED, init_store, open_store
from coar_dask.errors import CorruptBlockError

N, RPC, P, K = 430, 50, 40, 7
SEED, ALPHA = 5, 0.1


def _outputs(masks: np.ndarray, offset: float = 30.0) -> np.ndarray:
    w = np.random.default_rng(2).normal(size=(masks.shape[1], K))
    noise = np.random.default_rng(3).normal(scale=0.1, size=(masks.shape[0], K))
    return (offset + masks @ w + noise).astype(np.float16)


def make_store(path, blocks=None):
    store = init_store(path, {"num_models": N, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                                           "margins": {"dtype": "float16", "shape": [K]}}},
                       rows_per_chunk=RPC, mask_seed=SEED, alpha=ALPHA)
    masks = sample_masks(SEED, range(N), P, ALPHA)
    y = _outputs(masks)
    for b in store.blocks() if blocks is None else [store.block(i) for i in blocks]:
        store.write_block(b.index, {"masks": masks[b.start:b.stop], "margins": y[b.start:b.stop]})
    return store, masks, y


@pytest.fixture(scope="module")
def client():
    from coar_dask.runtime.cluster import cluster_client

    with cluster_client("local", n_workers=2) as c:
        yield c


def test_to_dask_is_lazy_one_chunk_per_block_and_computes_on_the_cluster(tmp_path, client):
    blocks = [0, 2, 3, 8]  # the last block has 30 rows
    store, masks, y = make_store(tmp_path / "s", blocks)
    done = store.to_dask(COMPLETED)
    ys = store.to_dask("margins")
    assert ys.chunks == ((RPC,) * 8 + (N - 8 * RPC,), (K,)) and done.chunks == (ys.chunks[0],)
    assert store.to_dask("masks").dtype == bool and ys.dtype == np.float16
    mean = ((ys.astype("float64") * done[:, None]).sum(axis=0) / done.sum()).compute()
    rows = np.concatenate([store.block(b).rows for b in blocks])
    np.testing.assert_allclose(mean, y[rows].astype(np.float64).mean(0), rtol=1e-12)
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_groups)) > 0  # ran there
    np.testing.assert_array_equal(store.to_dask("masks")[rows].compute(), masks[rows])
    np.testing.assert_array_equal(store.to_dask("masks", verify=True).compute()[rows], masks[rows])
    np.testing.assert_array_equal(store.to_dask("masks", verify=True).compute()[store.block(1).rows], False)


def test_to_dask_verify_checks_digests_and_plain_reads_do_not(tmp_path):
    store, masks, _ = make_store(tmp_path / "s")
    a, b = store.chunk_path("masks", 0), store.chunk_path("masks", 3)
    tmp = tmp_path / "tmp"
    shutil.move(a, tmp), shutil.move(b, a), shutil.move(tmp, b)  # two blocks' chunks swapped
    store = open_store(store.path, read_only=True)
    swapped = store.to_dask("masks").compute()  # documented: no digest check
    np.testing.assert_array_equal(swapped[:RPC], masks[3 * RPC:4 * RPC])
    with pytest.raises(CorruptBlockError, match="block [03] .*digest differs"):
        store.to_dask("masks", verify=True).compute(scheduler="sync")
    assert store.to_dask("margins", verify=True).sum().compute(scheduler="sync") != 0  # other arrays fine
