"""A CUDA out-of-memory error halves the pass and the build goes on (issue 23 item 7).

A CPU cannot run out of GPU memory, so the model simulates it at the seam:
its forward raises ``torch.cuda.OutOfMemoryError`` (the exception PyTorch's
CUDA allocator raises) when a pass holds more than ``LIMIT`` rows, and
otherwise computes what the tiny model computes. Everything else is real: the
engine, zarr stores, the in-process build and a LocalCluster. The GPU check
that completes it: a ResNet-50 build on one GPU started at a batch size that
does not fit, which must finish with the smaller batch and the same outputs.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coar_dask.ablation import engine  # noqa: E402
from coar_dask.core.experiment import Experiment, is_out_of_memory, load_state  # noqa: E402
from coar_dask.core.store import open_store  # noqa: E402
from coar_dask.errors import BuildError  # noqa: E402
from coar_dask.runtime.build import init_experiment_store, run_build  # noqa: E402

#: Rows a pass may hold before the simulated GPU runs out of memory.
LIMIT = 3


class _OutOfMemoryAbove(nn.Module):
    """The tiny model; a pass of more than ``limit`` rows raises CUDA's out-of-memory error."""

    def __init__(self, limit: int):
        super().__init__()
        from conftest import tiny_model

        self.net = tiny_model()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated: {x.shape[0]} rows > {self.limit})")
        return self.net(x)


def oom_model():
    return _OutOfMemoryAbove(LIMIT).eval()


def oom_always():
    return _OutOfMemoryAbove(0).eval()


def plain_model():
    return _OutOfMemoryAbove(10**9).eval()


def _experiment(model: str, **kw) -> Experiment:
    return Experiment(model=f"test_oom:{model}", examples="conftest:tiny_examples", alpha=0.2, **{"batch_size": 12, **kw})


def _built(tmp_path, name: str, exp: Experiment, client=None) -> np.ndarray:
    store = init_experiment_store(tmp_path / name, exp, rows=12, rows_per_chunk=4)
    report = run_build(store, exp, client=client)
    assert report.blocks_done == 3 and not report.failed
    return open_store(tmp_path / name).array(exp.y_name)[:]


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("masks_per_pass", [None, 1, 4])
def test_an_out_of_memory_pass_is_halved_and_the_block_finishes(masks_per_pass, caplog):
    exp = _experiment("oom_model", masks_per_pass=masks_per_pass)
    state = load_state(exp)
    masks = np.random.default_rng(0).random((5, state.n_components)) > 0.2
    want = engine.compute_outputs(load_state(_experiment("plain_model", masks_per_pass=1)), masks)
    with caplog.at_level(logging.WARNING, logger="coar_dask.ablation.engine"):
        got = engine.compute_outputs(state, masks)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.name == engine.__name__ and "out of memory" in r.getMessage()]
    assert warnings and "retrying" in warnings[0] and "halved" in warnings[0], warnings
    m, e = engine._runner(state).pass_limit
    assert m * e <= LIMIT
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coar_dask.ablation.engine"):  # the next block starts small
        np.testing.assert_allclose(engine.compute_outputs(state, masks), want, rtol=0, atol=1e-5)
    assert not [r for r in caplog.records if "out of memory" in r.getMessage()]


def test_an_in_process_build_goes_on_at_the_smaller_pass(tmp_path):
    """Before: the first out-of-memory error ended a build run with --cluster none."""
    want = _built(tmp_path, "plain", _experiment("plain_model"))
    got = _built(tmp_path, "oom", _experiment("oom_model"))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_a_local_cluster_build_goes_on_at_the_smaller_pass(tmp_path):
    """Before: each block failed three times at the same batch size, and the build failed."""
    from coar_dask.runtime.clusters import cluster_client

    want = _built(tmp_path, "plain", _experiment("plain_model"))
    with cluster_client("local", n_workers=1) as client:
        got = _built(tmp_path, "oom", _experiment("oom_model"), client=client)
        (limits,) = client.run(_pass_limits).values()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)  # float16 store: passes of other shapes may round apart
    assert limits and all(m * e <= LIMIT for m, e in limits), limits


def _pass_limits() -> list[tuple[int, int]]:
    """On a worker: the pass shapes its runners learnt from out-of-memory errors."""
    return [r.pass_limit for r in engine._RUNNERS.values() if r.pass_limit is not None]


def test_out_of_memory_at_one_example_is_one_line_and_the_block_stays_pending(tmp_path):
    exp = _experiment("oom_always")
    with pytest.raises(Exception) as info:  # the first-batch check cannot run a single example either
        load_state(exp)
    message = str(info.value)
    assert "out of memory" in message and "one example" in message and "\n" not in message
    state = load_state(_experiment("plain_model", batch_size=7))  # a state of this test's own
    state.model.limit = 0  # loads, then runs out of memory in every pass
    masks = np.ones((2, state.n_components), bool)
    with pytest.raises(BuildError, match=r"out of memory even at one mask and one example per pass") as info:
        engine.compute_outputs(state, masks)
    assert "\n" not in str(info.value)
