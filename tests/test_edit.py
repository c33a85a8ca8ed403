"""COAR-Edit: scores, selection, edits that restore bitwise, the k sweep (in process and on Dask), the command."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from coar_dask.core.experiment import load_state  # noqa: E402
from coar_dask.errors import ConfigError  # noqa: E402
from coar_dask.fit.attributions import Attributions  # noqa: E402
from coar_dask.fit.edit import (EditCase, choose_components, edit_model, edit_scores, edited,  # noqa: E402
                                parse_ks, parse_reference, parse_targets, sweep_edit, target_only_scores)


@pytest.fixture(scope="module")
def wide_experiment():
    from coar_dask.zoo import wide

    wide.load_model()  # train once (about 10 s), before any worker needs it
    return wide.experiment()


def _state_bytes(model):
    return {k: v.detach().clone().numpy().tobytes() for k, v in model.state_dict().items()}


def test_welch_scores_population_std_and_a_single_target():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 9))
    a = Attributions(w, np.zeros(9), np.zeros(9))
    t, r = [0, 1, 2], [3, 4, 5, 6, 7, 8]
    expected = (w[:, t].mean(1) - w[:, r].mean(1)) / np.sqrt(w[:, t].var(1) / 3 + w[:, r].var(1) / 6)
    np.testing.assert_allclose(edit_scores(a, t, r), expected)
    one = (w[:, 0] - w[:, r].mean(1)) / np.sqrt(w[:, r].var(1) / 6)  # s_T = 0
    np.testing.assert_allclose(edit_scores(a, [0], r), one)
    np.testing.assert_allclose(target_only_scores(a, t), w[:, t].mean(1))
    scores = np.array([0.5, 3.0, -2.0, 1.0])
    assert choose_components(scores, 2, "lower").tolist() == [1, 3]
    assert choose_components(scores, 2, "raise").tolist() == [2, 0]
    with pytest.raises(ConfigError, match="direction"):
        choose_components(scores, 1, "sideways")


def test_parsers():
    labels, correct = np.array([0, 3, 3, 1]), np.array([True, False, True, True])
    assert parse_targets("class:3", labels, correct) == [1, 2]
    assert parse_targets("misclassified", labels, correct) == [1]
    assert parse_targets("0,3", labels, correct) == [0, 3]
    with pytest.raises(ConfigError, match="selects no example"):
        parse_targets("class:7", labels, correct)
    ref = parse_reference("random:2", 4, [1], seed=0)
    assert len(ref) == 2 and 1 not in ref
    assert parse_reference("rest", 4, [1]) == [0, 2, 3]
    assert parse_ks("1:5") == [1, 2, 3, 4, 5] and parse_ks("1:9:4") == [1, 5, 9] and parse_ks("2,7") == [2, 7]
    with pytest.raises(ConfigError, match="--k"):
        parse_ks("0:3")


def test_edits_restore_the_model_bitwise(wide_experiment):
    state = load_state(wide_experiment)
    before = _state_bytes(state.model)
    x = state.inputs[:32]
    with torch.no_grad():
        base = state.model(x).clone()
        indices = np.arange(0, state.n_components, 97)
        copy = edit_model(state.model, state.components, indices)
        assert _state_bytes(state.model) == before
        with edited(state.model, state.components, indices) as model:
            inside = model(x).clone()
        assert _state_bytes(state.model) == before
        assert not torch.equal(inside, base)
        assert torch.equal(inside, copy(x))
        with pytest.raises(RuntimeError, match="boom"):
            with edited(state.model, state.components, indices):
                raise RuntimeError("boom")
        assert _state_bytes(state.model) == before
        assert torch.equal(state.model(x), base)


def test_sweep_in_process_and_the_edit_command(tmp_path, wide_experiment, coar_dask_cli):
    from coar_dask.fit.baselines import gradient_x_parameter

    attributions = gradient_x_parameter(wide_experiment)
    state = load_state(wide_experiment)
    cases = [EditCase([t], parse_reference("random:30", state.n_examples, [t], seed=t)) for t in (3, 17)]
    before = _state_bytes(state.model)
    sweep = sweep_edit(wide_experiment, attributions, cases, [1, 10, 40], random_draws=2)
    assert _state_bytes(state.model) == before
    summary = sweep.summary()
    assert summary["n_components"] == 1568 and [t["index"] for t in summary["targets"]] == [3, 17]
    assert set(summary["median_k_flip"]) == {"coar", "random", "target_only"}
    assert sweep.flipped["random"].shape == (2, 2, 3) and sweep.flipped["coar"].shape == (2, 1, 3)
    # k = 40 of the targets' own largest attributions lowers their output more than k = 1
    assert (sweep.target_output["target_only"][:, 0, 2] < sweep.target_output["target_only"][:, 0, 0]).all()
    path = attributions.save(tmp_path / "gp.pt")
    out = subprocess.run([*coar_dask_cli, "edit", "--attributions", str(path), "--target", "3", "--each",
                          "--reference", "random:30", "--k", "1,10,40", "--draws", "2", "--cluster", "none",
                          "--json", "--plot", str(tmp_path / "edit.png")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["targets"][0]["index"] == 3 and (tmp_path / "edit.png").stat().st_size > 1000
    bad = subprocess.run([*coar_dask_cli, "edit", "--attributions", str(path), "--target", "class:12",
                          "--cluster", "none"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "selects no example" in bad.stderr


@pytest.mark.slow
def test_sweep_on_a_local_cluster_equals_in_process(wide_experiment):
    from coar_dask.fit.baselines import gradient_x_parameter
    from coar_dask.runtime.clusters import cluster_client

    attributions = gradient_x_parameter(wide_experiment)
    cases = [EditCase([5], list(range(100, 130))), EditCase([8, 9], list(range(200, 220)))]
    local = sweep_edit(wide_experiment, attributions, cases, [2, 20], random_draws=2, seed=3)
    with cluster_client("local", n_workers=2) as client:
        remote = sweep_edit(wide_experiment, attributions, cases, [2, 20], random_draws=2, seed=3, client=client)
    for m in ("coar", "random", "target_only"):
        np.testing.assert_array_equal(local.flipped[m], remote.flipped[m])
        np.testing.assert_allclose(local.reference_accuracy[m], remote.reference_accuracy[m])
    assert local.summary() == remote.summary()
