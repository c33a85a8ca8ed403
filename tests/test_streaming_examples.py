"""Examples stream to the device batch by batch; the whole set never sits on it (issue 23 item 9).

A CPU has no GPU memory to measure, so the tests use the ``meta`` device (a
tensor moved there keeps its shape and holds no data): after loading, the
examples are still host tensors, and each batch moved to the device holds the
rows of that batch only. Memory-mapped examples stay memory-mapped (not read
into memory). The GPU check that completes it: peak GPU memory of one worker
building ImageNet ResNet-50 (10,000 examples) stays near the model plus one
batch's activations, not 30 GB.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from coar_dask.core.experiment import Experiment, ExperimentState, load_examples  # noqa: E402
from coar_dask.core.outputs import margin  # noqa: E402

N = 50
_MEMMAP: dict[str, str] = {}


def memmap_examples():
    x = np.load(_MEMMAP["x"], mmap_mode="r")
    return x, np.arange(N) % 5


def host_examples():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 9, (N, 7), generator=g), "attention_mask": torch.ones(N, 7)}, None


def test_examples_stay_on_the_host_and_batches_move_one_at_a_time():
    exp = Experiment(model="m:f", examples="test_streaming_examples:host_examples", batch_size=8)
    meta = torch.device("meta")
    inputs, labels = load_examples(exp, meta)
    assert all(t.device.type == "cpu" for t in inputs.values())  # before: moved to the device whole
    state = ExperimentState(exp, None, inputs, labels, None, margin, meta)
    for start in range(0, N, 8):
        batch = state.batch(start, min(start + 8, N))
        for t in batch.inputs.values():
            assert t.device.type == "meta" and t.shape[0] == min(8, N - start)
    repeated = state.batch(0, 8, repeat=3)
    assert repeated.inputs["input_ids"].shape[0] == 24 and repeated.inputs["input_ids"].device.type == "meta"


def test_memory_mapped_examples_are_not_read_into_memory(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(N, 1, 6, 6)).astype(np.float32))
    _MEMMAP["x"] = str(path)
    exp = Experiment(model="m:f", examples="test_streaming_examples:memmap_examples", batch_size=8)
    inputs, labels = load_examples(exp, torch.device("meta"))
    mapped = np.load(path, mmap_mode="r")
    assert inputs.device.type == "cpu"
    # The tensor is a view of the file's pages (no copy), read as batches need them.
    view = inputs.numpy()
    assert not view.flags.owndata
    np.testing.assert_array_equal(view, mapped)


# ----------------------------------------------- read-ahead, copy/compute overlap, channels_last on the host
# The GPU check that completes these: on a lent GPU, `pytest -m gpu tests/test_streaming_examples.py` (the real
# pinned, channels_last copy below), and an nsys trace of a ResNet-50 build showing each batch's HtoD copy on
# the side stream under the previous pass's kernels (copy time hidden behind compute).

from coar_dask.core import examples as examples_module  # noqa: E402
from coar_dask.core.examples import DatasetExamples, DeviceFeeder, TensorExamples  # noqa: E402


def _requests(n: int, bs: int) -> list[tuple[int, int]]:
    """What the engine asks: the first-batch checks, then every batch for each of three masks."""
    passes = [(s, min(s + bs, n)) for s in range(0, n, bs)]
    return [(0, min(n, 8)), (0, 1)] + passes * 3 + [(2, 5)]


def _indexed(n: int = 23) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 2, 3, 3).contiguous()


@pytest.mark.parametrize("kind", ["tensor", "dataset"])
def test_read_ahead_gives_the_same_batches_in_the_same_order(kind):
    x, y = _indexed(), torch.arange(23) % 4
    source = (TensorExamples(x, y) if kind == "tensor"
              else DatasetExamples(torch.utils.data.TensorDataset(x, y), "test"))
    on, off = DeviceFeeder("cpu", prefetch=True), DeviceFeeder("cpu", prefetch=False)
    for start, stop in _requests(23, 5):
        (a, la), (b, lb) = on.get(source, start, stop), off.get(source, start, stop)
        assert torch.equal(a, x[start:stop]) and torch.equal(a, b) and torch.equal(la, y[start:stop])
        assert torch.equal(la, lb)


class _FakeCuda:
    """Streams that log what is issued on them; pinning and copies that mark the tensors they touch."""

    def __init__(self, monkeypatch, log):
        self.log, self.side = log, None
        test = self

        class Stream:
            def __init__(self, device=None):
                test.side = self

            def wait_stream(self, other):
                log.append(("wait", other is test.side))

        self.current = Stream.__new__(Stream)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(examples_module, "_pin", self.pin)
        monkeypatch.setattr(examples_module, "_copy", self.copy)
        monkeypatch.setattr(examples_module, "_record", lambda t, s: log.append(("record", int(t[0, 0, 0, 0]))))
        self.on_side = False

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.on_side = s is self.side
            try:
                yield
            finally:
                self.on_side = False
        return ctx()

    def pin(self, t):
        self.log.append(("pin", int(t[0, 0, 0, 0]), t.is_contiguous(memory_format=torch.channels_last)))
        out = t.clone(memory_format=torch.preserve_format)
        out.fake_pinned = True
        return out

    def copy(self, t, device):
        assert getattr(t, "fake_pinned", False), "a pageable tensor was handed to the copy"
        self.log.append(("copy", int(t[0, 0, 0, 0]), self.on_side,
                         t.is_contiguous(memory_format=torch.channels_last)))
        return t.clone(memory_format=torch.preserve_format)


def test_the_next_batch_is_copied_on_a_side_stream_before_this_pass_is_read(monkeypatch):
    log: list[tuple] = []
    _FakeCuda(monkeypatch, log)
    x, bs = _indexed(20), 5
    source = TensorExamples(x, None)
    feeder = DeviceFeeder(torch.device("cuda"), channels_last=True)
    for start in range(0, 20, bs):
        batch, _ = feeder.get(source, start, start + bs)
        assert torch.equal(batch, x[start : start + bs])
        log.append(("forward", start))
        log.append(("read", start))  # the pass's outputs read back (a sync)
    at = {e[:2]: i for i, e in reversed(list(enumerate(log)))}
    for start in range(0, 15, bs):
        assert at[("copy", start + bs)] < at[("forward", start)] < at[("read", start)], log
    side = [e for e in log if e[0] == "copy" and e[1] != 0]
    assert side and all(e[2] for e in side), log  # read-ahead copies ran on the side stream
    assert all(e[3] for e in log if e[0] == "copy"), log  # channels_last on the host, before the copy...
    assert all(e[2] for e in log if e[0] == "pin"), log  # ...and before pinning: the copy's source is pinned
    assert ("wait", True) in log and ("record", 5) in log  # the pass waits for the side stream's copy


@pytest.mark.gpu
def test_a_cuda_batch_is_copied_from_pinned_channels_last_host_memory(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU build cannot pin memory)")
    seen = []
    real = examples_module._copy

    def spy(t, device):
        seen.append((t.is_pinned(), t.is_contiguous(memory_format=torch.channels_last)))
        return real(t, device)

    monkeypatch.setattr(examples_module, "_copy", spy)
    x = torch.randn(40, 3, 8, 8)
    feeder, source = DeviceFeeder("cuda", channels_last=True), TensorExamples(x, None)
    for start in range(0, 40, 8):
        batch, _ = feeder.get(source, start, start + 8)
        assert batch.is_cuda and batch.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch.cpu(), x[start : start + 8])
    assert seen and all(pinned and cl for pinned, cl in seen), seen
    assert not x.is_pinned() and x.is_contiguous()  # the example set itself untouched
