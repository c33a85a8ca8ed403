"""Streaming rows into solvers: batches, read-ahead, concatenation, epochs.

Solvers hold one batch of rows plus their own state, never the whole dataset,
so memory does not grow with the number of rows. Every solver (and
:mod:`coar_dask.fit.evaluate`) streams its rows through :func:`iter_batches`;
the sums over them are in :mod:`coar_dask.solvers.moments`, the statistics of a
fit's predictions in :mod:`coar_dask.solvers.metrics`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

import numpy as np

from coar_dask.errors import RegressionError
from coar_dask.solvers.base import RowSource

__all__ = [
    "BATCH_BYTES",
    "PREFETCH_DEPTH",
    "batch_rows_for",
    "rebatch",
    "prefetch",
    "iter_batches",
    "ConcatRows",
    "EpochRows",
]


#: Default size of one batch of rows handed to the BLAS (X and Y, float32).
BATCH_BYTES = 16 * 2**20


def batch_rows_for(n_features: int, n_targets: int, batch_bytes: int = BATCH_BYTES) -> int:
    """Rows per batch so that a float32 batch of X and Y takes about ``batch_bytes``.

    >>> batch_rows_for(2304, 1000)
    1269
    """
    row = 4 * (int(n_features) + int(n_targets))
    return int(max(64, batch_bytes // max(row, 1)))


def rebatch(blocks: Iterable[tuple[np.ndarray, np.ndarray]], rows: int, pool: int = 0
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup consecutive blocks into batches of exactly ``rows`` rows (the last may be smaller).

    A row source's blocks are a store's chunks (often 100 rows); the BLAS is
    much faster on thousands. With ``pool > 0`` the batches are written into
    ``pool`` preallocated buffers used in turn, so streaming allocates nothing
    once they exist (fresh ~30 MB arrays per batch fragment the heap, and the
    process's memory creeps up with the number of rows); a batch is then only
    valid until ``pool - 1`` further batches have been drawn.
    """
    buffers: list[tuple[np.ndarray, np.ndarray]] = []
    drawn = 0
    cur: tuple[np.ndarray, np.ndarray] | None = None
    fill = 0
    for x, y in blocks:
        x, y = np.asarray(x), np.asarray(y)
        if x.shape[0] != y.shape[0]:
            raise RegressionError(f"a row block has {x.shape[0]} rows of X but {y.shape[0]} of Y.")
        start = 0
        while start < x.shape[0]:
            if cur is None:
                if pool and len(buffers) == pool:
                    cur = buffers[drawn % pool]
                else:
                    cur = (np.empty((rows, *x.shape[1:]), x.dtype), np.empty((rows, *y.shape[1:]), y.dtype))
                    if pool:
                        buffers.append(cur)
                fill = 0
            take = min(rows - fill, x.shape[0] - start)
            cur[0][fill : fill + take] = x[start : start + take]
            cur[1][fill : fill + take] = y[start : start + take]
            fill += take
            start += take
            if fill == rows:
                yield cur
                drawn += 1
                cur = None
    if cur is not None and fill:
        yield cur[0][:fill], cur[1][:fill]


_DONE = object()


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a thread, ``depth`` items ahead, so that reading and
    decompressing the next batch overlaps the BLAS work on this one.

    Memory: at most ``depth + 1`` items alive. Exceptions in the reader are
    re-raised here; closing this generator stops the reader.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=work, name="coar-dask-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


_read_ahead = prefetch  # iter_batches' keyword ``prefetch`` shadows the function
#: Batches read ahead by :func:`iter_batches`.
PREFETCH_DEPTH = 1

def iter_batches(source: RowSource, rows: int | None = None, *, prefetch: bool = True, reuse: bool = False
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(X, Y)`` batches of ``source`` of ``rows`` rows each, read ahead in a thread.

    Checks that the blocks have the source's widths and finite targets. With
    ``reuse=True`` the batches live in a few recycled buffers: use each batch
    before drawing the next (memory then stays flat however many rows).
    """
    P, K = int(source.n_features), int(source.n_targets)
    rows = rows or batch_rows_for(P, K)
    # Buffers alive at once: the consumer's, the queue's, and the one being filled.
    pool = PREFETCH_DEPTH + 3 if reuse else 0

    def checked() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in rebatch(source.blocks(), rows, pool):
            x = x.reshape(x.shape[0], -1)
            y = y.reshape(y.shape[0], -1)
            if x.shape[1] != P or y.shape[1] != K:
                raise RegressionError(
                    f"the row source said {P} features x {K} targets but yielded blocks of "
                    f"{x.shape[1]} x {y.shape[1]}; it is inconsistent."
                )
            if not np.isfinite(y).all():
                raise RegressionError(
                    "the regression targets contain NaN or inf; run `coar-dask verify` on the store "
                    "and rebuild the affected blocks."
                )
            yield x, y

    it = checked()
    return _read_ahead(it, PREFETCH_DEPTH) if prefetch else it


class ConcatRows:
    """The rows of several row sources, one after the other (e.g. train + validation).

    Examples
    --------
    >>> both = ConcatRows(train, val)    # doctest: +SKIP
    """

    def __init__(self, *sources: RowSource):
        sources = tuple(s for s in sources if s is not None and s.n_rows > 0)
        if not sources:
            raise RegressionError("ConcatRows needs at least one row source with rows.")
        p, k = sources[0].n_features, sources[0].n_targets
        if any(s.n_features != p or s.n_targets != k for s in sources):
            raise RegressionError("ConcatRows: the row sources have different numbers of features or targets.")
        self.sources = sources
        self.n_rows = int(sum(s.n_rows for s in sources))
        self.n_features = int(p)
        self.n_targets = int(k)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in self.sources:
            yield from s.blocks()


class EpochRows:
    """The rows of a source as torch batches ``(positions, X, Y)`` of exactly
    ``batch_size`` rows (the last batch of an epoch may be smaller).

    Small sources are cached in RAM (masks as bool) and visited in a fresh
    random order every epoch, like FFCV's ``OrderOption.RANDOM``; larger ones
    are streamed in source order and shuffled within a window of
    ``4 * batch_size`` rows or more.
    """

    def __init__(self, source: RowSource, batch_size: int, *, seed: int, cache_bytes: int):
        import torch

        self.source = source
        self.n = int(source.n_rows)
        self.P, self.K = int(source.n_features), int(source.n_targets)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.window = max(4 * self.batch_size, batch_rows_for(self.P, self.K))
        self.cached = self.n * (self.P + 4 * self.K) <= cache_bytes
        self.X = self.Y = None
        if self.cached:
            xs, ys, binary = [], [], True
            for x, y in iter_batches(source):
                binary = binary and bool(np.isin(x, (0, 1)).all())
                xs.append(torch.from_numpy(np.ascontiguousarray(x)))
                ys.append(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)))
            X = torch.cat(xs) if xs else torch.zeros(0, self.P)
            self.X = X.bool() if binary else X.float()
            self.Y = torch.cat(ys) if ys else torch.zeros(0, self.K)
            if self.X.shape[0] != self.n:
                raise RegressionError(f"the row source said {self.n} rows but yielded {self.X.shape[0]}.")

    def batches(self, epoch: int | None) -> Iterator[tuple[Any, Any, Any]]:
        """Batches of epoch ``epoch`` (shuffled); ``None``: in order, unshuffled."""
        import torch

        B = self.batch_size
        rng = None if epoch is None else np.random.default_rng([self.seed, int(epoch)])
        if self.cached:
            order = torch.arange(self.n) if rng is None else torch.from_numpy(rng.permutation(self.n))
            for i in range(0, self.n, B):
                idx = order[i : i + B]
                yield idx, self.X[idx], self.Y[idx]
            return
        offset = 0
        carry: tuple[Any, Any, Any] | None = None
        for x, y in iter_batches(self.source, self.window):
            pos = torch.arange(offset, offset + x.shape[0])
            offset += x.shape[0]
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
            if carry is not None:
                pos, xt, yt = torch.cat([carry[0], pos]), torch.cat([carry[1], xt]), torch.cat([carry[2], yt])
            if rng is not None:
                perm = torch.from_numpy(rng.permutation(pos.shape[0]))
                pos, xt, yt = pos[perm], xt[perm], yt[perm]
            full = (pos.shape[0] // B) * B
            for i in range(0, full, B):
                yield pos[i : i + B], xt[i : i + B], yt[i : i + B]
            carry = (pos[full:], xt[full:], yt[full:]) if full < pos.shape[0] else None
        if offset != self.n:
            raise RegressionError(f"the row source said {self.n} rows but yielded {offset}.")
        if carry is not None:
            yield carry
