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
