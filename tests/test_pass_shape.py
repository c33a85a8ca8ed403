"""Auto chooses the pass shape by measuring (issue 25 item 1).

On a process's first block of at least ``MEASURE_MIN_MASKS`` masks, auto
times the candidate shapes on the block's own rows, keeps the fastest, and
the build records the choice per worker in the store (``coar-dask status``).
The clock is injected (``compute_outputs(..., timer=...)``) so that a test
decides which shape is fastest.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from coar_dask.ablation import engine  # noqa: E402
from coar_dask.ablation.engine import MEASURE_MIN_MASKS, candidate_shapes, compute_outputs, pass_shape_choice  # noqa: E402
from test_ablation import TOL, ConvNet, _masks, _reference, _state  # noqa: E402

N_MASKS = 64


@pytest.fixture(autouse=True)
def measure_pass_shapes():
    """These tests are about ``coar-dask.pass-shape: measure``; the default is the fixed rule."""
    import dask.config

    with dask.config.set({"coar-dask.pass-shape": "measure"}):
        yield


def test_the_default_rule_measures_nothing_so_two_builds_give_the_same_bits(monkeypatch):
    """Measured shapes round differently (in place vs batched): the default keeps outputs reproducible."""
    import dask.config

    def state():
        torch.manual_seed(1)  # the same weights both times
        return _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)

    one = state()
    masks = _masks(len(one.components), n=N_MASKS)
    with dask.config.set({"coar-dask.pass-shape": "rule"}):
        clock = FakeClock(monkeypatch, {(1, 7): 0.01})  # in place "fastest": the rule must not look
        first = compute_outputs(one, masks, timer=clock)
        assert pass_shape_choice(one) is None and len(set(clock.shapes)) == 1
        assert np.array_equal(first, compute_outputs(state(), masks))


def test_a_pass_shape_setting_other_than_rule_or_measure_is_one_line():
    import dask.config

    from coar_dask.errors import ExperimentError

    with dask.config.set({"coar-dask.pass-shape": "fastest"}), pytest.raises(ExperimentError, match="rule' or 'measure"):
        state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
        compute_outputs(state, _masks(len(state.components), n=N_MASKS))


class FakeClock:
    """A clock that advances, per pass shape computed, by ``cost[(masks, examples)]`` seconds per mask."""

    def __init__(self, monkeypatch, cost):
        self.now = 0.0
        self.shapes: list[tuple[int, int]] = []
        real = engine._compute

        def compute(state, masks, out, runner, m, e):
            self.shapes.append((m, e))
            self.now += cost.get((m, e), 1.0) * masks.shape[0]
            return real(state, masks, out, runner, m, e)

        monkeypatch.setattr(engine, "_compute", compute)

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("fastest", [1, 2, 4])
def test_auto_picks_the_shape_the_timer_says_is_fastest(monkeypatch, fastest):
    state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
    n = min(7, state.n_examples)
    cost = {(1, n): 1.0, (2, n): 0.8, (4, n): 0.6, (8, n): 0.9}
    cost[(fastest, n)] = 0.1
    clock = FakeClock(monkeypatch, cost)
    masks = _masks(len(state.components), n=N_MASKS)
    got = compute_outputs(state, masks, timer=clock)
    choice = pass_shape_choice(state)
    assert (choice["masks_per_pass"], choice["examples_per_pass"]) == (fastest, n)
    assert choice["rates"][f"{fastest}x{n}"] == pytest.approx(10.0)
    measured = len(clock.shapes)
    assert clock.shapes[measured - 1 :] and clock.shapes[-1] == (fastest, n)  # the rest of the block: the choice
    # Later blocks use the choice without measuring again.
    clock.shapes.clear()
    compute_outputs(state, masks, timer=clock)
    assert clock.shapes == [(fastest, n)]
    ref = _reference(state, masks)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


def test_growing_stops_when_more_masks_per_pass_are_slower(monkeypatch):
    state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
    clock = FakeClock(monkeypatch, {(1, 7): 0.5, (2, 7): 0.7, (4, 7): 0.01, (8, 7): 0.01})
    compute_outputs(state, _masks(len(state.components), n=N_MASKS), timer=clock)
    choice = pass_shape_choice(state)
    assert set(choice["rates"]) == {"1x7", "2x7"}  # 2 was slower than 1: 4 and 8 are not tried
    assert choice["masks_per_pass"] == 1


def test_the_measured_rows_are_the_in_place_outputs():
    """The rows each shape computed while measuring are the block's outputs: the in-place rows bitwise,
    the batched ones within the usual tolerance, and all of them against deep-copied zeroing."""
    state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
    masks = _masks(len(state.components), n=N_MASKS)
    got = compute_outputs(state, masks)
    choice = pass_shape_choice(state)
    assert choice is not None and 0 < choice["measured_rows"] <= N_MASKS // 2
    inplace = compute_outputs(_state(ConvNet(True), ("conv2d", "linear"), batch_size=7), masks, masks_per_pass=1)
    assert np.array_equal(got[: engine.MEASURE_ROUNDS], inplace[: engine.MEASURE_ROUNDS])  # 1 mask in place first
    ref = _reference(state, masks)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())
    assert np.abs(got - inplace).max() <= TOL * max(1.0, np.abs(ref).max())


def test_an_explicit_masks_per_pass_wins_and_small_blocks_are_not_measured(monkeypatch):
    state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7, masks_per_pass=3)
    clock = FakeClock(monkeypatch, {})
    compute_outputs(state, _masks(len(state.components), n=N_MASKS), timer=clock)
    assert pass_shape_choice(state) is None and set(clock.shapes) == {(3, 7)}
    auto = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
    compute_outputs(auto, _masks(len(auto.components), n=MEASURE_MIN_MASKS - 1), timer=clock)
    assert pass_shape_choice(auto) is None


def test_an_out_of_memory_shrunk_shape_wins_over_the_choice(monkeypatch):
    state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
    clock = FakeClock(monkeypatch, {(2, 7): 0.5, (4, 7): 0.1})
    masks = _masks(len(state.components), n=N_MASKS)
    compute_outputs(state, masks, timer=clock)
    assert pass_shape_choice(state)["masks_per_pass"] == 4
    engine._runner(state).pass_limit = (2, 7)  # what a pass out of CUDA memory leaves
    clock.shapes.clear()
    compute_outputs(state, masks, timer=clock)
    assert clock.shapes == [(2, 7)]


def test_candidate_shapes():
    assert candidate_shapes(360, 100) == [(1, 360), (2, 360), (4, 360), (8, 360), (2, 180)]
    assert candidate_shapes(360, 16) == [(1, 360), (2, 360), (2, 180)]
    assert candidate_shapes(100, 1000, max_rows=400) == [(1, 100), (2, 100), (4, 100)]  # rows bound; no split


ROWS, BLOCK = 128, 32


def test_the_build_records_the_choice_and_status_shows_it(tiny_experiment, tmp_path, coar_dask_cli):
    from coar_dask.runtime.build import init_experiment_store, pass_shape_records, run_build

    store = init_experiment_store(tmp_path / "s", tiny_experiment, ROWS, rows_per_chunk=BLOCK)
    run_build(store, None)
    records = pass_shape_records(store.path)
    assert len(records) == 1
    r = records[0]
    assert r["device"] == "cpu" and r["masks_per_pass"] >= 1 and f"{r['masks_per_pass']}x{r['examples_per_pass']}" \
        in r["rates"] and r["measured_rows"] > 0
    out = subprocess.run([*coar_dask_cli, "status", str(store.path)], capture_output=True, text=True, check=True)
    assert f"{r['masks_per_pass']} masks x {r['examples_per_pass']} examples per pass" in out.stdout, out.stdout
    js = subprocess.run([*coar_dask_cli, "status", str(store.path), "--json"], capture_output=True, text=True,
                        check=True)
    assert json.loads(js.stdout)["pass_shapes"] == records


@pytest.mark.slow
def test_a_local_cluster_build_records_one_choice_per_worker(tiny_experiment, tmp_path):
    from distributed import Client, LocalCluster

    from coar_dask.core.verify import verify_store
    from coar_dask.runtime.build import init_experiment_store, pass_shape_records, run_build

    store = init_experiment_store(tmp_path / "s", tiny_experiment, 8 * BLOCK, rows_per_chunk=BLOCK)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        workers: set[str] = set()
        report = run_build(store, None, client=client, progress=lambda result, done, total: workers.add(result.worker))
    records = pass_shape_records(store.path)
    assert report.rows_done == 8 * BLOCK
    assert sorted(r["worker"] for r in records) == sorted(workers)  # one record per worker that built a block
    assert verify_store(store.path).ok
