"""Block digests: what a build wrote into a block, bound to the store, the experiment and the block.

A store with digests (format 2 and later) holds ``_digests`` (uint8,
``(n_blocks, n_arrays, 32)``, one chunk per block): for each block the
sha256 of every schema array's block as written (:func:`block_digest`). The
digest covers the values, their dtype and shape, the block index, the
array's name and the store's *binding*:

* a store claimed by a build of this version (format 3) is bound to the id
  its claim gave it and to the claimed experiment's fingerprint
  (``"<store_id>/<experiment fingerprint>"``), so copies of one unbuilt store
  (``cp -r``) built with different experiments never accept each other's
  chunks;
* a store written without a claim (an import, a test), or claimed by an
  earlier coar_dask, is bound to the random ``store_id`` its init recorded.

So a chunk swapped with another block's, copied from another store or changed
in place no longer matches its digest, and a block flagged completed without
a build has none.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np

__all__ = ["block_digest", "binding", "chunk_kind", "DIGEST_ALGORITHM", "DIGEST_SIZE", "CHUNK_KINDS"]

DIGEST_ALGORITHM = "sha256"
DIGEST_SIZE = 32
_DIGEST_TAG = b"coar_dask block digest v1"
#: How a chunk path that is not a regular file reads in messages.
CHUNK_KINDS = {
    "missing": "missing (it would read as zeros)",
    "folder": "a folder, not a chunk file",
    "link": "a symbolic link (zarr never writes one; it may point at another block's or store's data)",
    "other": "not a regular file",
}


def binding(store_id: str, experiment_fingerprint: str | None = None) -> str:
    """What block digests are bound to: the store's id, and the claimed experiment when there is one."""
    return str(store_id) if experiment_fingerprint is None else f"{store_id}/{experiment_fingerprint}"


def block_digest(store_id: str, index: int, name: str, values: np.ndarray) -> bytes:
    """sha256 of block ``index`` of array ``name`` as written, bound to the store and the block.

    ``store_id``: the store's :func:`binding` (its id, and the claimed experiment's fingerprint
    where the claim binds it). The same values give another digest in another store, for another
    experiment or at another block index, so a chunk moved between blocks or stores is detected.
    """
    values = np.ascontiguousarray(values)
    values = values.astype(values.dtype.newbyteorder("<"), copy=False)
    h = hashlib.sha256(b"\0".join([
        _DIGEST_TAG, str(store_id).encode(), str(int(index)).encode(), name.encode(),
        values.dtype.str.encode(), repr(tuple(values.shape)).encode(), b"",
    ]))
    h.update(values.reshape(-1).view(np.uint8))
    return h.digest()


def chunk_kind(path: Path) -> str:
    """``"file"``, ``"missing"``, ``"folder"``, ``"link"`` or ``"other"`` (without following links)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:  # e.g. a parent folder replaced by a file
        return "other"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "other"
