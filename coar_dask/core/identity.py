"""What made a store: content digests of the model's state, the examples and the labels.

An experiment names its model and examples by factory (``mymod:load_model``),
so its fingerprint cannot see a weights file replaced between two build
sessions, another ``mymod.py`` found from another folder, or an examples
factory that shuffles differently in each process. A store therefore records
digests of what the factories *returned*: the first session or worker that
checks a claimed store writes them to :data:`CONTENT_FILE` (created atomically,
first writer wins, like the claim), and every session and every worker checks
its own against that record before its first block
(:func:`check_content`). A difference is refused with one
:class:`~coar_dask.errors.StoreMismatchError` naming what changed.

The digest (:func:`content_digests`) is sha256 over fixed pieces of at most
:data:`PIECE_BYTES` (whole rows of a tensor), hashed in parallel threads and
combined in order with each tensor's name, dtype and shape: the pieces depend
only on the tensor's shape and dtype, never on the batch size, the device or
the number of threads, so every process computes the same digest, and the
examples are read a piece at a time (memory-mapped examples are never loaded
whole). Cost, measured by ``benchmarks/digest_cost.py --content``: see
README's "What a store and the outputs guard against".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping

from coar_dask.core import durability
from coar_dask.errors import StoreError, StoreMismatchError

__all__ = ["CONTENT_FILE", "CONTENT_KEYS", "PIECE_BYTES", "content_digests", "read_content", "check_content"]

logger = logging.getLogger(__name__)

#: The file, at the store's root, recording what the factories returned (first writer wins).
CONTENT_FILE = "coar_dask.content.json"
#: What is recorded, and how each reads in messages.
CONTENT_KEYS = {"model_state": "model state", "examples": "examples", "labels": "labels"}
#: The digest's name in the record; a record of another algorithm is not compared.
ALGORITHM = "sha256-pieces-v1"
#: Bytes per hashed piece (whole rows; a row wider than this is one piece).
PIECE_BYTES = 16 * 2**20
_HASH_THREADS = 8

_CACHE: dict[int, tuple[Any, dict[str, str | None]]] = {}
_CHECKED: dict[tuple[str, str, int], dict[str, Any]] = {}
_LOCK = threading.Lock()


def _host_bytes(t: Any) -> Any:
    """A tensor's values as a flat uint8 numpy array on the host (a copy only when it is elsewhere)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.reshape(-1).contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy()


def _pieces(t: Any) -> Iterator[Any]:
    """Slices of whole rows of ``t`` of about :data:`PIECE_BYTES` each (one piece for a 0-d tensor)."""
    if t.ndim == 0:
        yield t
        return
    row = max(1, t[:1].numel() * t.element_size())
    rows = max(1, PIECE_BYTES // row)
    for start in range(0, int(t.shape[0]), rows):
        yield t[start : start + rows]


def _header(name: str, t: Any) -> bytes:
    return f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}".encode()


def _piece_digest(piece: Any) -> bytes:
    return hashlib.sha256(_host_bytes(piece)).digest()


def tensors_digest(tensors: Mapping[str, Any], pool: ThreadPoolExecutor | None = None) -> str:
    """sha256 of named tensors: their names, dtypes, shapes and values, hashed in pieces.

    ``tensors`` is read one piece per thread at a time (a memory-mapped tensor is
    never loaded whole); equal values give the same digest on any device.
    """
    outer = hashlib.sha256(ALGORITHM.encode())
    own = pool is None
    pool = pool or ThreadPoolExecutor(min(_HASH_THREADS, os.cpu_count() or 1), thread_name_prefix="coar-digest")
    try:
        for name in sorted(tensors):
            t = tensors[name]
            outer.update(_header(name, t))
            # map keeps the order, and holds at most a few pieces in memory per thread
            for d in pool.map(_piece_digest, _pieces(t)):
                outer.update(d)
    finally:
        if own:
            pool.shutdown()
    return outer.hexdigest()


def _streamed_digests(source: Any) -> tuple[str, str | None]:
    """Digests of a Dataset's examples and labels (``None``), read a batch at a time, never whole.

    Equal to :func:`tensors_digest` of the collated tensors: the same headers (the set's shape) and
    the same pieces of :data:`PIECE_BYTES` rows, each hashed as its rows stream in (sha256 is
    incremental), so no piece is ever joined in memory.
    """
    import torch

    headers: dict[str, bytes] = {}
    pieces: dict[str, list[bytes]] = {}
    open_piece: dict[str, list[Any]] = {}  # name -> [hasher, rows in it, rows per piece]
    for inputs, labels in source.batches(_STREAM_ROWS):
        named = {f"inputs.{k}": v for k, v in inputs.items()} if isinstance(inputs, Mapping) else {"inputs": inputs}
        if labels is not None:
            named["labels"] = labels
        for name, t in named.items():
            if name not in headers:
                headers[name] = _header(name, torch.empty((source.n, *t.shape[1:]), dtype=t.dtype, device="meta"))
                rows = max(1, PIECE_BYTES // max(1, t[:1].numel() * t.element_size()))
                pieces[name], open_piece[name] = [], [hashlib.sha256(), 0, rows]
            state, start = open_piece[name], 0
            while start < t.shape[0]:
                take = min(state[2] - state[1], int(t.shape[0]) - start)
                state[0].update(_host_bytes(t[start : start + take]))
                state[1], start = state[1] + take, start + take
                if state[1] == state[2]:
                    pieces[name].append(state[0].digest())
                    state[0], state[1] = hashlib.sha256(), 0
    for name, state in open_piece.items():
        if state[1]:
            pieces[name].append(state[0].digest())

    def combine(names: list[str]) -> str:
        outer = hashlib.sha256(ALGORITHM.encode())
        for name in sorted(names):
            outer.update(headers[name])
            for d in pieces[name]:
                outer.update(d)
        return outer.hexdigest()

    inputs = [n for n in headers if n != "labels"]
    return combine(inputs), combine(["labels"]) if "labels" in headers else None


#: Rows per batch of the pass that hashes a Dataset's examples (``None``: the Dataset reader's choice).
_STREAM_ROWS: int | None = None


def _examples_tensors(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The examples' input tensors by name (``"inputs"`` or the mapping's keys) and the labels."""
    import torch

    inputs = state.inputs
    if isinstance(inputs, Mapping):
        named = {f"inputs.{k}": v for k, v in inputs.items()}
    else:
        named = {"inputs": inputs}
    if not all(isinstance(v, torch.Tensor) for v in named.values()):
        batch = state.batch(0, state.n_examples)  # examples held otherwise: one pass through the state's batches
        named = ({f"inputs.{k}": v for k, v in batch.inputs.items()} if isinstance(batch.inputs, Mapping)
                 else {"inputs": batch.inputs})
        return named, ({} if batch.labels is None else {"labels": batch.labels})
    return named, ({} if state.labels is None else {"labels": state.labels})


def content_digests(state: Any) -> dict[str, str | None]:
    """Digests of what an experiment's factories returned: ``model_state``, ``examples``, ``labels``.

    ``state`` is an :class:`~coar_dask.core.experiment.ExperimentState`. The model's
    state is its ``state_dict()`` (parameters and buffers); ``labels`` is ``None``
    when there are none. Computed once per state and process.
    """
    with _LOCK:
        cached = _CACHE.get(id(state))
        if cached is not None and cached[0]() is state:
            return dict(cached[1])
    t0 = time.perf_counter()
    streamed = hasattr(state.inputs, "batches")  # a Dataset (core.examples.DatasetExamples): never collated whole
    inputs, labels = ({}, {}) if streamed else _examples_tensors(state)
    with ThreadPoolExecutor(min(_HASH_THREADS, os.cpu_count() or 1), thread_name_prefix="coar-digest") as pool:
        digests = {"model_state": tensors_digest(dict(state.model.state_dict()), pool)}
        if streamed:
            digests["examples"], digests["labels"] = _streamed_digests(state.inputs)
        else:
            digests["examples"] = tensors_digest(inputs, pool)
            digests["labels"] = tensors_digest(labels, pool) if labels else None
    logger.info("content digests of experiment %s in %.2f s", state.experiment.fingerprint[:12],
                time.perf_counter() - t0)
    with _LOCK:
        _CACHE[id(state)] = (weakref.ref(state), dict(digests))
    return digests


def read_content(store: Any) -> dict[str, Any] | None:
    """The content record of ``store`` (:data:`CONTENT_FILE`), or ``None`` when none was written yet."""
    path = store.record_file(CONTENT_FILE)  # beside the claim (the store's root before format 4)
    try:
        return durability.read_exclusive(path, lambda r: isinstance(r.get("model_state"), str))
    except ValueError:
        raise StoreError(
            f"the content record {str(path)!r} of store {str(store.path)!r} is damaged (no model state digest); "
            f"restore it from a backup, or build into a new store."
        ) from None


_ADVICE = {
    "model_state": "restore the weights the model factory loads (or the module that defines it)",
    "examples": "restore the data the examples factory reads, and return the examples in the same order in "
                "every process (no shuffling seeded by process, time or host)",
    "labels": "restore the labels the examples factory returns",
}


def _mismatch(store: Any, exp: Any, changed: list[str], record: Mapping[str, Any]) -> StoreMismatchError:
    what = " and ".join(CONTENT_KEYS[k] for k in changed)
    factory = exp.model if changed == ["model_state"] else exp.examples
    by = record.get("recorded_by") or "the first build"
    return StoreMismatchError(
        f"store {str(store.path)!r}: the {what} that {factory!r} returned on {socket.gethostname()} (pid "
        f"{os.getpid()}) differ from those recorded when the store was claimed ({by}); a store must not mix "
        f"two models or example sets, so no block is written. To continue this store, "
        f"{'; '.join(_ADVICE[k] for k in changed)}; otherwise build into a new store."
    )


def check_content(store: Any, state: Any, experiment: Any) -> dict[str, Any]:
    """Refuse ``state`` unless what its factories returned matches the record of ``store``.

    ``experiment`` is the one building ``store``: a loaded state is shared by the stores of one model
    and example set (train and evaluation), so ``state.experiment`` may be another store's.

    The first caller for a claimed store writes the record (atomically; of two
    concurrent first callers one wins and the other is checked against it).
    Checked once per store, state and process. Returns the record.

    Raises
    ------
    StoreMismatchError
        Naming what changed (model state, examples, labels) and how to proceed.
    """
    key = (str(store.path), str(store.store_id), id(state))
    with _LOCK:
        cached = _CACHE.get(id(state))
        if key in _CHECKED and cached is not None and cached[0]() is state:
            return dict(_CHECKED[key])
    digests = content_digests(state)
    record = read_content(store)
    if record is None:
        durability.create_exclusive(store.record_file(CONTENT_FILE), json.dumps({
            "algorithm": ALGORITHM, **digests,
            "experiment_fingerprint": experiment.fingerprint,
            "recorded_by": f"{socket.gethostname()} pid {os.getpid()}",
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, sort_keys=True))
        record = read_content(store)
    if record is None:  # pragma: no cover - the file was created above or by another writer
        raise StoreError(f"the content record of store {str(store.path)!r} could not be written.")
    if record.get("algorithm") != ALGORITHM:
        logger.warning("store %s records content digests of another kind (%s); not compared", store.path,
                       record.get("algorithm"))
    else:
        changed = [k for k in CONTENT_KEYS if record.get(k) != digests[k]]
        if changed:
            raise _mismatch(store, experiment, changed, record)
    with _LOCK:
        _CHECKED[key] = dict(record)
    return record
