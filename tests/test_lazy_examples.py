"""A map-style Dataset is read a batch at a time, never collated whole (issue 23, "Streamed examples").

A store is built from a Dataset over a 200 MB memory-mapped file: the process's
anonymous memory (what a whole collated copy would take; the file's own pages
are page cache, ``RssFile``) stays near one batch, the outputs equal those of
the same values given as tensors bitwise, and the content digest of the
streamed examples equals the digest of the materialised tensors.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coar_dask.core import identity  # noqa: E402
from coar_dask.core.examples import DatasetExamples  # noqa: E402
from coar_dask.core.experiment import Experiment, load_state  # noqa: E402
from coar_dask.runtime.build import init_experiment_store, run_build  # noqa: E402

SHAPE = (3, 64, 64)  # 48 KiB per example
N = 4096  # 192 MiB in all
_FILES: dict[str, str] = {}


class MemmapDataset(torch.utils.data.Dataset):
    """Items ``(image, label)`` read from a ``np.memmap`` file, one row per item."""

    def __init__(self, path: str, n: int, shape: tuple[int, ...] = SHAPE):
        self.x = np.memmap(path, dtype=np.float32, mode="r", shape=(n, *shape))

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.x[i])), i % 10


def lazy_examples(n: int = N):
    return MemmapDataset(_FILES["x"], n)


def tensor_examples(n: int = N):
    x = np.memmap(_FILES["x"], dtype=np.float32, mode="r", shape=(N, *SHAPE))[:n]
    return torch.from_numpy(np.array(x)), torch.arange(n) % 10


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10)).eval()


def _write(path) -> None:
    x = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(N, *SHAPE))
    rng = np.random.default_rng(0)
    for s in range(0, N, 512):
        x[s : s + 512] = rng.standard_normal((min(512, N - s), *SHAPE), dtype=np.float32)
    x.flush()
    del x
    # a raw file of the same values (np.memmap without the .npy header)
    _FILES["x"] = str(path) + ".raw"
    np.load(str(path), mmap_mode="r").tofile(_FILES["x"])


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


class _Peak:
    """The largest anonymous RSS seen while the block runs (sampled every millisecond)."""

    def __enter__(self):
        self.base = self.peak = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def _experiment(examples: str, **kw) -> Experiment:
    return Experiment(model="test_lazy_examples:model", examples=f"test_lazy_examples:{examples}",
                      kinds=("conv2d",), y_dtype="float32", batch_size=128, masks_per_pass=1, **kw)


def test_a_memory_mapped_dataset_builds_a_store_in_about_one_batch_of_memory(tmp_path):
    _write(tmp_path / "x.npy")
    warm = _experiment("lazy_examples", examples_kwargs={"n": 256})  # imports and first calls, not measured
    run_build(init_experiment_store(tmp_path / "warm", warm, rows=2, rows_per_chunk=2), warm)
    gc.collect()
    lazy = _experiment("lazy_examples")
    with _Peak() as peak:
        store = init_experiment_store(tmp_path / "lazy", lazy, rows=4, rows_per_chunk=2)
        run_build(store, lazy)  # checks the content digests too (a streamed pass)
        state = load_state(lazy)
        assert state.n_examples == N and state.labels.shape == (N,)
    grown = peak.peak - peak.base
    whole = N * int(np.prod(SHAPE)) * 4
    # before: the Dataset was collated whole (192 MiB held by the state, more while concatenating)
    print(f"anonymous memory grew by {grown / 2**20:.1f} MiB (batch {128 * 48 / 1024:.0f} MiB)")
    assert grown < whole / 4, f"anonymous memory grew by {grown / 2**20:.0f} MiB for a {whole / 2**20:.0f} MiB set"
    assert isinstance(state.inputs, DatasetExamples)

    eager = _experiment("tensor_examples")
    ref = init_experiment_store(tmp_path / "eager", eager, rows=4, rows_per_chunk=2)
    run_build(ref, eager)
    rows = np.arange(4)
    np.testing.assert_array_equal(store.read_rows("margins", rows), ref.read_rows("margins", rows))
    np.testing.assert_array_equal(store.read_rows("masks", rows), ref.read_rows("masks", rows))


def test_the_streamed_digest_equals_the_materialised_tensors_digest(tmp_path, monkeypatch):
    _write(tmp_path / "x.npy")
    # pieces of 5 rows against read batches of 256 and 7: pieces cut across batches, a short last piece
    monkeypatch.setattr(identity, "PIECE_BYTES", 5 * int(np.prod(SHAPE)) * 4)
    monkeypatch.setattr(identity, "_STREAM_ROWS", 7)
    n = 103
    lazy = load_state(_experiment("lazy_examples", examples_kwargs={"n": n}))
    eager = load_state(_experiment("tensor_examples", examples_kwargs={"n": n}))
    assert isinstance(lazy.inputs, DatasetExamples) and isinstance(eager.inputs, torch.Tensor)
    a, b = identity.content_digests(lazy), identity.content_digests(eager)
    assert a == b and a["labels"] is not None
    assert len(lazy.inputs._kept) <= DatasetExamples.KEEP  # never more than a couple of batches held


def test_another_value_gives_another_streamed_digest(tmp_path, monkeypatch):
    _write(tmp_path / "x.npy")
    n = 20
    before = identity.content_digests(load_state(_experiment("lazy_examples", examples_kwargs={"n": n})))
    x = np.memmap(_FILES["x"], dtype=np.float32, mode="r+", shape=(N, *SHAPE))
    x[n - 1, 0, 0, 0] += 1.0  # the last example's first value
    x.flush()
    del x
    identity._CACHE.clear()
    from coar_dask.core import experiment as experiment_module

    experiment_module._STATE_CACHE.clear()
    after = identity.content_digests(load_state(_experiment("lazy_examples", examples_kwargs={"n": n})))
    assert after["examples"] != before["examples"] and after["labels"] == before["labels"]
