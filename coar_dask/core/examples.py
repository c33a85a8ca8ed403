"""Where a batch of examples comes from, and how it reaches the device.

An examples factory returns tensors (or a mapping of tensors), which stay in
host memory as they are (a memory-mapped array stays mapped), or a map-style
``torch.utils.data.Dataset``, which is never collated whole: a
:class:`DatasetExamples` collates only the rows a pass asks for (an
ImageNet-sized or memory-mapped example set costs about one batch of host
memory, not the set). :class:`DeviceFeeder` moves one batch at a time to the
device: on CUDA the batch is converted to ``channels_last`` on the host if
asked, then pinned, then copied with ``non_blocking=True`` on a side stream,
and the *next* batch's copy is issued before the current batch is handed out,
so it runs while the current pass computes. On the CPU the same code runs
without streams, pinning or copies.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Iterator, Mapping

from coar_dask.errors import ExperimentError, FactoryError

__all__ = ["TensorExamples", "DatasetExamples", "DeviceFeeder", "as_inputs", "as_labels", "rows_of", "map_tensors",
           "one_line"]

logger = logging.getLogger(__name__)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one line, ``Type: message``, white space folded and cut at ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rows_of(inputs: Any) -> int:
    """Examples in ``inputs``: a tensor, a mapping of tensors, or a :class:`DatasetExamples`."""
    if isinstance(inputs, DatasetExamples):
        return inputs.n
    return int(next(iter(inputs.values())).shape[0] if isinstance(inputs, Mapping) else inputs.shape[0])


def map_tensors(inputs: Any, fn: Any) -> Any:
    """``fn`` applied to a tensor, or to every tensor of a mapping."""
    return {k: fn(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else fn(inputs)


def as_inputs(inputs: Any, where: str) -> Any:
    """Inputs as a host tensor or a dict of host tensors with one row per example (a numpy array is not copied)."""
    import torch

    if not isinstance(inputs, Mapping):
        t = torch.as_tensor(inputs)
        if t.ndim == 0:
            raise ExperimentError(f"{where} returned a scalar as inputs; return one row per example.")
        return t
    if not inputs:
        raise ExperimentError(f"{where} returned an empty mapping of inputs; return e.g. a tokenizer's output.")
    tensors = {str(k): torch.as_tensor(v) for k, v in inputs.items()}
    first, rows = next(iter(tensors)), None
    for key, t in tensors.items():
        n = int(t.shape[0]) if t.ndim else -1
        rows = n if rows is None else rows
        if n != rows:
            raise ExperimentError(
                f"{where}: inputs {key!r} has {n} rows but {first!r} has {rows}; every tensor of the inputs "
                f"mapping needs one row per example (pad sequences to one length)."
            )
    return tensors


def as_labels(labels: Any, n: int, where: str) -> Any:
    """Labels as a host tensor of ``n`` rows (integers as int64), or ``None``."""
    import torch

    if labels is None:
        return None
    t = torch.as_tensor(labels)
    if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        t = t.long()
    if t.numel() == n:
        t = t.reshape(-1)
    if t.ndim == 0 or t.shape[0] != n:
        raise ExperimentError(f"{where} returned {n} inputs but {t.shape[0] if t.ndim else 0} labels.")
    return t


def split_examples(raw: Any, where: str) -> tuple[Any, Any]:
    """``(inputs, labels)`` from what a factory (or a Dataset's collated batch) gives."""
    import numpy as np
    import torch

    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        return raw[0], raw[1]
    if isinstance(raw, (Mapping, torch.Tensor, np.ndarray)):
        return raw, None
    raise ExperimentError(
        f"{where} must return (inputs, labels), inputs alone (a tensor or a mapping of tensors) or a "
        f"map-style torch Dataset; got {type(raw).__name__}."
    )


class TensorExamples:
    """Examples held as host tensors (a mapping of them), read by slicing (a memory-mapped array stays mapped)."""

    def __init__(self, inputs: Any, labels: Any):
        self.inputs, self.labels = inputs, labels
        self.n = rows_of(inputs)
        self.token = (id(inputs), id(labels))

    def host(self, start: int, stop: int) -> tuple[Any, Any]:
        """Examples ``start:stop`` (views): ``(inputs, labels)``."""
        inputs = map_tensors(self.inputs, lambda t: t[start:stop])
        return inputs, None if self.labels is None else self.labels[start:stop]


class DatasetExamples:
    """A map-style Dataset read a batch at a time: only the rows a pass asks for are collated.

    Items are ``(inputs, labels)`` or inputs alone, collated with torch's
    ``default_collate`` (the values a ``DataLoader`` gives). The number of
    examples is ``len(dataset)``. The last :data:`KEEP` batches collated are
    kept (the feeder's read-ahead and a pass that asks twice reuse them).
    Labels, when the items have them, are read by one streamed pass the first
    time :attr:`labels` is asked for (only the labels are kept).
    """

    #: Host batches kept (least recently used dropped first).
    KEEP = 2

    def __init__(self, dataset: Any, where: str):
        from torch.utils.data import IterableDataset

        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ExperimentError(f"{where} returned an iterable Dataset; return a map-style one "
                                  f"(__getitem__, __len__).")
        self.dataset, self.where, self.n = dataset, where, len(dataset)
        if self.n == 0:
            raise FactoryError(f"{where} returned an empty Dataset (0 examples); return at least one example.")
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[int, int], tuple[Any, Any]] = OrderedDict()
        self._labels: Any = None
        self.token = id(self)
        inputs, labels = self.host(0, 1)
        self.has_labels = labels is not None
        #: Bytes of one example's inputs (sizes the streamed passes' batches).
        self.row_bytes = sum(t.numel() * t.element_size()
                             for t in (inputs.values() if isinstance(inputs, Mapping) else [inputs]))

    def __repr__(self) -> str:
        return f"DatasetExamples({type(self.dataset).__name__}, {self.n} examples)"

    def host(self, start: int, stop: int) -> tuple[Any, Any]:
        """Examples ``start:stop`` collated on the host: ``(inputs, labels)`` (labels ``None`` if none)."""
        key = (int(start), int(stop))
        with self._lock:
            hit = self._kept.get(key)
            if hit is not None:
                self._kept.move_to_end(key)
                return hit
        batch = self._collate(*key)
        with self._lock:
            self._kept[key] = batch
            while len(self._kept) > self.KEEP:
                self._kept.popitem(last=False)
        return batch

    def _collate(self, start: int, stop: int) -> tuple[Any, Any]:
        from torch.utils.data import default_collate

        if not 0 <= start < stop <= self.n:
            raise ExperimentError(f"{self.where}: rows {start}:{stop} asked of a Dataset of {self.n} examples.")
        try:
            raw = default_collate([self.dataset[i] for i in range(start, stop)])
        except Exception as exc:  # noqa: BLE001 - the user's items: say what to change
            raise ExperimentError(
                f"{self.where}: the Dataset's items cannot be collated into batches ({one_line(exc)}); give "
                f"every item the same structure and shapes (pad sequences to one length)."
            ) from None
        inputs, labels = split_examples(raw, self.where)
        inputs = as_inputs(inputs, self.where)
        return inputs, as_labels(labels, stop - start, self.where)

    def batches(self, rows: int | None = None) -> Iterator[tuple[Any, Any]]:
        """Host batches of ``rows`` examples (``None``: about :data:`STREAM_BYTES`), in order, not kept:
        a pass over the set holds one batch."""
        rows = rows or max(1, min(_MAX_STREAM_ROWS, STREAM_BYTES // max(1, self.row_bytes)))
        for start in range(0, self.n, rows):
            yield self._collate(start, min(start + rows, self.n))

    @property
    def labels(self) -> Any:
        """All labels (one streamed pass the first time; only the labels are kept), or ``None``."""
        import torch

        if not self.has_labels:
            return None
        if self._labels is None:
            # filled in place: a small tensor kept per batch would pin the freed batches' heap (RSS grew
            # by most of the set during the pass on glibc)
            out, start = None, 0
            for _, labels in self.batches():
                if out is None:
                    out = torch.empty((self.n, *labels.shape[1:]), dtype=labels.dtype)
                out[start : start + labels.shape[0]] = labels
                start += labels.shape[0]
            self._labels = out
        return self._labels


#: Bytes of inputs per batch of a streamed pass over a Dataset (its labels, its content digest).
STREAM_BYTES = 4 * 2**20
_MAX_STREAM_ROWS = 1024


# ------------------------------------------------------------------- to the device


def _pin(t: Any) -> Any:
    return t.pin_memory()


def _copy(t: Any, device: Any) -> Any:
    return t.to(device, non_blocking=True)


def _record(t: Any, stream: Any) -> None:
    t.record_stream(stream)


class DeviceFeeder:
    """Moves host batches to ``device``, the next batch's copy overlapping the current pass on CUDA.

    :meth:`get` returns batch ``start:stop`` on the device and, when
    ``prefetch`` is on, issues the copy of the batch expected next (the
    following rows, or the first batch again after the last: the next mask)
    before returning. On CUDA that copy runs on a side stream with
    ``non_blocking=True`` from a pinned host batch; the batch handed out later
    waits for it with ``wait_stream`` and is recorded on the consuming stream.
    A request that is not the one expected is copied directly (and the
    read-ahead dropped). With ``channels_last`` a 4-D input is converted on
    the host, before pinning, one batch at a time.
    """

    def __init__(self, device: Any, *, channels_last: bool = False, prefetch: bool = True):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.channels_last = channels_last
        self.prefetch = prefetch
        self._lock = threading.Lock()
        self._pending: tuple[Any, Any] | None = None  # (key, moved batch)
        self._stream: Any = None
        self._step = 0

    def get(self, source: Any, start: int, stop: int) -> tuple[Any, Any]:
        """Examples ``start:stop`` of ``source`` on the device: ``(inputs, labels)``."""
        key = (source.token, int(start), int(stop))
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == key:
                moved = self._take_over(pending[1])
            else:
                moved = self._move(source.host(start, stop), side=False)
            if self.prefetch:
                nxt = self._next(source, int(start), int(stop))
                if nxt is not None:
                    self._pending = ((source.token, *nxt), self._move(source.host(*nxt), side=True))
            return moved

    def _next(self, source: Any, start: int, stop: int) -> tuple[int, int] | None:
        n = source.n
        if stop < n or start == 0:
            self._step = stop - start  # a full batch (the last one is shorter)
        step = max(1, self._step)
        nxt = (stop, min(stop + step, n)) if stop < n else (0, min(step, n))
        return None if nxt == (start, stop) else nxt

    def _host_form(self, t: Any) -> Any:
        import torch

        if self.channels_last and t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _move(self, batch: tuple[Any, Any], side: bool) -> tuple[Any, Any]:
        inputs, labels = batch
        if not self.cuda:
            inputs = map_tensors(inputs, lambda t: self._host_form(t).to(self.device))
            return inputs, None if labels is None else labels.to(self.device)
        import torch

        def move(t: Any) -> Any:
            return _copy(_pin(self._host_form(t)), self.device)  # converted, then pinned: stays pinned

        if not side:
            return map_tensors(inputs, move), None if labels is None else move(labels)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            return map_tensors(inputs, move), None if labels is None else move(labels)

    def _take_over(self, moved: tuple[Any, Any]) -> tuple[Any, Any]:
        """A read-ahead batch, made safe to use on the current stream."""
        if not self.cuda:
            return moved
        import torch

        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        inputs, labels = moved
        for t in ([*inputs.values()] if isinstance(inputs, Mapping) else [inputs]) + ([] if labels is None else [labels]):
            _record(t, current)
        return moved
