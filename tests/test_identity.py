"""A store knows what made it (issue 22 items 1, 2, 5; issue 27 item 7).

* block digests are bound to the store (the id it is given when claimed) and
  to the claimed experiment: data and digest chunks copied between two stores
  of the same layout, even holding the same values, are refused;
* copies of an unbuilt store (``cp -r``) get ids of their own when claimed;
* digests of what the factories returned (model state, examples, labels) are
  recorded when the store is claimed and checked by every session and worker
  before its first block: a weights file changed between sessions, or
  examples in another order on each worker, are refused naming what changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from coar_dask.core.spec import Spec
from coar_dask.core.store import init_store, open_store
from coar_dask.core.verify import verify_store
from coar_dask.errors import CorruptBlockError

P, K, RPC = 40, 7, 5


def _copy_block_chunks(src: Path, dst: Path, names: list[str], index: int) -> None:
    """Copy block ``index``'s chunk files of ``names`` and of ``_digests`` from one store into another."""
    src_store, dst_store = open_store(src), open_store(dst)
    for name in [*names, "_digests"]:
        shutil.copyfile(src_store.chunk_path(name, index), dst_store.chunk_path(name, index))


def test_chunks_copied_between_stores_of_the_same_layout_and_values_are_refused(tmp_path):
    """Issue 27 item 7: the copied chunks hold the very values the other store holds, so only the
    store's id in the digest tells them apart."""
    spec = Spec.for_experiment(10, P, K)
    rng = np.random.default_rng(0)
    blocks = [{"masks": rng.random((RPC, P)) > 0.1, "margins": rng.normal(size=(RPC, K)).astype(np.float16)}
              for _ in range(2)]
    for name in ("a", "b"):
        store = init_store(tmp_path / name, spec, rows_per_chunk=RPC)
        for i, data in enumerate(blocks):
            store.write_block(i, data)
    assert open_store(tmp_path / "a").read_verified(1)["margins"].tobytes() == blocks[1]["margins"].tobytes()
    _copy_block_chunks(tmp_path / "a", tmp_path / "b", ["masks", "margins"], 1)
    b = open_store(tmp_path / "b")
    with pytest.raises(CorruptBlockError, match="block 1 "):
        b.read_verified(1)
    report = verify_store(b)
    assert not report.ok
    assert {(p.kind, p.block) for p in report.problems} >= {("digest_mismatch", 1)}
    b.read_verified(0)  # the block not copied still reads
