"""COAR-Edit: scores, selection, edits that restore bitwise, the k sweep (in process and on Dask), the command."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_baselines import FakeClient, no_cuda_in_client  # noqa: E402,F401 (a fixture)

from coar_dask.core.experiment import load_state  # noqa: E402
from coar_dask.errors import ConfigError  # noqa: E402
from coar_dask.fit.attributions import Attributions  # noqa: E402
from coar_dask.fit.edit import (EditCase, choose_components, edit_model, edit_scores, edited,  # noqa: E402
                                parse_held_out, parse_ks, parse_reference, parse_targets, split_targets,
                                sweep_edit, target_only_scores)


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
                          "--reference", "random:30", "--held-out", "random:100", "--k", "1,10,40", "--draws", "2",
                          "--cluster", "none", "--json", "--plot", str(tmp_path / "edit.png")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["targets"][0]["index"] == 3 and (tmp_path / "edit.png").stat().st_size > 1000
    assert printed["targets"][0]["n_held_out"] == 100 and "coar" in printed["median_held_out_accuracy_at_flip"]
    again = subprocess.run([*coar_dask_cli, "edit", "--attributions", str(path), "--target", "class:3",
                            "--held-out-targets", "0.5", "--k", "5,150", "--draws", "1", "--cluster", "none",
                            "--plot", str(tmp_path / "edit.png")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # the plot exists: refused before computing
    table = subprocess.run([*coar_dask_cli, "edit", "--attributions", str(path), "--target", "class:3",
                            "--held-out-targets", "0.5", "--k", "5,150", "--draws", "1", "--cluster", "none"],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "held-out targets" in table.stdout and "median at the flip" in table.stdout
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


# -- the 0/0 rule, the doctest, the input check (issue 27 items 8-9, issue 24) --------------------------------


def test_edit_score_zero_over_zero_rule():
    """Both spreads 0: +-inf by the sign of the mean difference, 0 when the means agree; one spread 0: finite."""
    w = np.array([[2.0, 1.0, 1.0],    # target above references that agree: +inf
                  [0.0, 1.0, 1.0],    # below: -inf
                  [1.0, 1.0, 1.0],    # all equal: 0, not NaN
                  [3.0, 1.0, 2.0]])   # references spread: finite (3 - 1.5) / sqrt(0.25 / 2)
    scores = edit_scores(Attributions(w, np.zeros(3), np.zeros(3)), [0], [1, 2])
    assert scores[0] == np.inf and scores[1] == -np.inf and scores[2] == 0.0
    assert scores[3] == pytest.approx(1.5 / np.sqrt(0.125))
    assert not np.isnan(scores).any()
    assert choose_components(scores, 2, "lower").tolist() == [0, 3]
    assert choose_components(scores, 1, "raise").tolist() == [1]


def test_the_edit_module_doctests_pass():
    import doctest
    import importlib

    edit = importlib.import_module("coar_dask.fit.edit")  # `coar_dask.fit` is also the fit function
    result = doctest.testmod(edit, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


def test_edit_scores_of_a_bare_array_is_a_coar_error():
    from coar_dask.errors import CoarError

    with pytest.raises(CoarError, match=r"needs Attributions .*found ndarray\(3, 4\).*Attributions\(w"):
        edit_scores(np.zeros((3, 4)), [0], [1, 2])


def dict_model():
    """The tiny CNN returning ``{"logits": ...}`` (as many model wrappers do)."""
    from conftest import tiny_model

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def forward(self, x):
            return {"logits": self.net(x)}

    return Wrapped().eval()


def test_sweep_on_a_model_returning_a_dict(tiny_experiment):
    """Issue 24.4: build, fit, evaluate and compare accept a dict-returning model; so does edit."""
    from coar_dask.fit.baselines import gradient_x_parameter

    experiment = tiny_experiment.replace(model="test_edit:dict_model")
    attributions = gradient_x_parameter(experiment)
    sweep = sweep_edit(experiment, attributions, [EditCase([0], [1, 2, 3, 4], held_out=[5, 6, 7])], [1, 3],
                       random_draws=1)
    assert sweep.flipped["coar"].shape == (1, 1, 2)
    assert sweep.summary()["targets"][0]["n_held_out"] == 3


# -- judged on examples never used for scoring (issue 26.3) ---------------------------------------------------


def test_edit_cases_keep_the_four_sets_apart():
    case = EditCase([1], [2, 3], held_out=[4, 5], held_out_target=[6])
    assert case.held_out == (4, 5) and case.held_out_target == (6,)
    with pytest.raises(ConfigError, match=r"examples \[4\] are in both the reference and the held_out"):
        EditCase([1], [2, 4], held_out=[4, 5])
    with pytest.raises(ConfigError, match="target and the held_out_target"):
        EditCase([1], [2], held_out_target=[1])
    scored, held = split_targets(list(range(10, 20)), 0.5, seed=1)
    assert len(scored) == 5 and sorted(scored + held) == list(range(10, 20))
    assert split_targets([3], 0.9) == ([3], [])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        split_targets([1, 2], 1.0)
    assert parse_held_out("rest", 6, [0, 2]) == [1, 3, 4, 5] and parse_held_out("none", 6, [0]) == []


def test_held_out_accuracy_is_measured_on_the_edited_model(wide_experiment):
    """The held-out numbers are the edited model's accuracy on examples the scores never saw, at the flip;
    the predicted change is minus the sum of the ablated components' weights."""
    from coar_dask.fit.baselines import gradient_x_parameter
    from coar_dask.fit.edit import base_predictions

    attributions = gradient_x_parameter(wide_experiment)
    state = load_state(wide_experiment)
    members = [int(i) for i in np.flatnonzero(state.labels.numpy() == 3)][:40]
    scored, unseen = split_targets(members, 0.5, seed=0)
    reference = parse_reference("random:40", state.n_examples, members, seed=0)
    held = parse_held_out("random:200", state.n_examples, [*members, *reference], seed=1)
    case = EditCase(scored, reference, held, unseen)
    ks = [10, 60, 150]
    sweep = sweep_edit(wide_experiment, attributions, [case], ks, random_draws=1)
    summary = sweep.summary()
    first = int(np.flatnonzero(sweep.flipped["coar"][0, 0] > 0.5)[0])
    order = sweep.chosen["coar"][0, 0][: ks[first]]
    with torch.no_grad():
        pred = edit_model(state.model, state.components, order)(state.inputs).argmax(1)
    right = (pred == state.labels).numpy()
    assert summary["median_held_out_accuracy_at_flip"]["coar"] == pytest.approx(right[held].mean(), abs=1e-6)
    assert summary["median_held_out_target_accuracy_at_flip"]["coar"] == pytest.approx(right[unseen].mean(),
                                                                                        abs=1e-6)
    correct, _ = base_predictions(wide_experiment)
    assert summary["unedited"]["held_out_accuracy"] == pytest.approx(correct[held].mean(), abs=1e-6)
    w = attributions.weight[:, scored].mean(axis=1)
    np.testing.assert_allclose(sweep.predicted_change["coar"][0, 0],
                               [-w[sweep.chosen["coar"][0, 0][:k]].sum() for k in ks], rtol=1e-5)
    assert summary["coar_by_k"]["actual_change"][-1] < 0 and len(summary["coar_by_k"]["flipped"]) == 3


# -- the client stays on the CPU; GPU tasks need GPU workers (issue 23.6) ---------------------------------


def test_edit_of_a_cuda_experiment_fails_fast_on_cpu_workers_and_runs_gpu_tasks_on_gpu_workers(
        tiny_experiment, no_cuda_in_client):
    from coar_dask.errors import ExperimentError
    from coar_dask.fit.edit import base_predictions

    weight = np.random.default_rng(0).normal(size=(load_state(tiny_experiment).n_components, 12))
    attributions = Attributions(weight, np.zeros(12), np.zeros(12))
    cuda = tiny_experiment.replace(device="cuda")
    cases = [EditCase([0], [1, 2, 3])]
    cpu_workers = FakeClient({"tcp://a:1": {"resources": {}}})
    for call in (lambda c: base_predictions(cuda, client=c),
                 lambda c: sweep_edit(cuda, attributions, cases, [1, 2], client=c)):
        with pytest.raises(ExperimentError, match="advertises a GPU"):
            call(cpu_workers)
    assert cpu_workers.submitted == []
    gpu_workers = FakeClient({"tcp://a:1": {"resources": {"GPU": 1}}})
    with pytest.raises(RuntimeError, match="submitted"):
        sweep_edit(cuda, attributions, cases, [1, 2], client=gpu_workers)
    assert gpu_workers.submitted and all(kw["resources"] == {"GPU": 1} for kw in gpu_workers.submitted)


@pytest.mark.slow
def test_edit_command_of_a_cuda_experiment_on_a_local_cpu_cluster_exits_2_fast(tmp_path, tiny_experiment,
                                                                              coar_dask_cli):
    """Issue 23.6's acceptance on a machine without a GPU: no hang, exit 2 naming the missing GPU workers."""
    import time

    n = load_state(tiny_experiment).n_components
    path = Attributions(np.ones((n, 12)), np.zeros(12), np.zeros(12)).save(tmp_path / "a.pt")
    tiny_experiment.replace(device="cuda").to_yaml(tmp_path / "exp.yaml")
    t0 = time.monotonic()
    out = subprocess.run([*coar_dask_cli, "edit", "--attributions", str(path), "--experiment",
                          str(tmp_path / "exp.yaml"), "--target", "0", "--reference",
                          "1,2", "--k", "1,2", "--cluster", "local", "--workers", "1"], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - t0 < 90 and "advertises a GPU" in out.stderr and "Traceback" not in out.stderr
