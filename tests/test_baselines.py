"""Baselines (leave-one-out, gradient x parameter) and ``compare``, on real models and data."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from coar_dask.ablation.zeroing import reference_model  # noqa: E402
from coar_dask.core.experiment import Experiment, load_state  # noqa: E402
from coar_dask.errors import StoreMismatchError  # noqa: E402
from coar_dask.fit.baselines import gradient_x_parameter, leave_one_out, loo_from_outputs  # noqa: E402


def bias_free_model():
    """Components: the 6 channels of one bias-free Conv2d, then ReLU and a bias-free linear head."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 36, 5, bias=False)).eval()


def bias_free_examples():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 5, (10,), generator=g)


def _bias_free(**changes):
    fields = dict(model="test_baselines:bias_free_model", examples="test_baselines:bias_free_examples",
                  kinds=["conv2d"], output="correct_logit", batch_size=4)
    return Experiment(**{**fields, **changes})


def test_gp_equals_loo_on_a_bias_free_conv_relu(tmp_path):
    # relu(g * z) = g * relu(z) for g >= 0 and the head is linear: the output is linear in each
    # channel's gate, so the first-order estimate (GP) is exact: GP == LOO, sign and all.
    experiment = _bias_free()
    loo = leave_one_out(experiment, tmp_path / "loo")
    gp = gradient_x_parameter(experiment, examples_per_task=3)
    scale = float(np.abs(loo.weight).max())
    assert scale > 0.05
    np.testing.assert_allclose(gp.weight, loo.weight, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(gp.bias, loo.bias, atol=1e-5 * scale, rtol=0)
    assert gp.metadata["method"] == "gp" and loo.metadata["method"] == "loo"


def test_loo_weights_are_single_ablations(tmp_path, tiny_experiment):
    loo = leave_one_out(tiny_experiment, tmp_path / "loo", components_per_block=7)
    state = load_state(tiny_experiment)
    x, y = state.inputs, state.labels
    with torch.no_grad():
        full = state.output_fn(state.model(x).float(), y).numpy()
        for j in (0, 5, state.n_components - 1):
            mask = np.ones(state.n_components, dtype=bool)
            mask[j] = False
            ablated = state.output_fn(reference_model(state.model, state.components, mask)(x).float(), y).numpy()
            np.testing.assert_allclose(loo.weight[j], full - ablated, atol=1e-5)
    # mask units: the all-kept mask predicts the unablated output, each single ablation its own output
    np.testing.assert_allclose(loo.predict(np.ones((1, state.n_components), bool))[0], full, atol=1e-4)
    w, b = loo_from_outputs(np.array([[1.0], [3.0]]), np.array([4.0]))
    assert w.ravel().tolist() == [3.0, 1.0] and b.tolist() == [0.0]


def test_loo_resumes_and_refuses_another_experiment(tmp_path, tiny_experiment):
    path = tmp_path / "loo"

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        leave_one_out(tiny_experiment, path, components_per_block=5, progress=stop_after_two)
    resumed = leave_one_out(tiny_experiment, path, components_per_block=5)
    fresh = leave_one_out(tiny_experiment, tmp_path / "fresh", components_per_block=5)
    n_blocks = -(-(load_state(tiny_experiment).n_components + 1) // 5)
    assert resumed.metadata["blocks_computed"] == n_blocks - 2
    np.testing.assert_array_equal(resumed.weight, fresh.weight)
    with pytest.raises(StoreMismatchError, match="not the leave-one-out store of this experiment"):
        leave_one_out(tiny_experiment.replace(output="correct_logit"), path, components_per_block=5)
    with pytest.raises(StoreMismatchError, match="another spec"):
        leave_one_out(_bias_free(), path)


@pytest.mark.slow
def test_compare_on_digits_on_a_local_cluster(tmp_path, digits_experiment, coar_dask_cli):
    """Baselines as Dask tasks equal the in-process ones; COAR > LOO > GP > 0 on held-out digits masks;
    the command prints the table, --json and a plot."""
    from coar_dask.fit.compare import compare, plot_comparison
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.runtime.build import run_build
    from coar_dask.runtime.clusters import cluster_client

    state = load_state(digits_experiment)
    held_exp = digits_experiment.replace(mask_seed=1)
    store = eval_store_for(tmp_path / "store", digits_experiment, 1000, state.n_components, state.n_examples)
    held = eval_store_for(tmp_path / "held", held_exp, 300, state.n_components, state.n_examples)
    with cluster_client("local", n_workers=2) as client:
        run_build(store, digits_experiment, client=client)
        run_build(held, held_exp, client=client)
        result = compare(store, [held], client=client)
    local_gp = gradient_x_parameter(digits_experiment)
    np.testing.assert_allclose(result.attributions["gp"].weight, local_gp.weight, atol=1e-5)
    local_loo = leave_one_out(digits_experiment, tmp_path / "loo-local", components_per_block=30)
    np.testing.assert_allclose(result.attributions["loo"].weight, local_loo.weight, atol=1e-5)
    scores = result.to_dict()["0.05"]
    assert scores["coar"]["mean"] > scores["loo"]["mean"] > scores["gp"]["mean"] > 0
    assert plot_comparison(result, tmp_path / "c.png").stat().st_size > 1000

    out = subprocess.run([*coar_dask_cli, "compare", "--store", str(store.path), "--eval-store", str(held.path),
                          "--cluster", "none", "--json", "--plot", str(tmp_path / "cli.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert {"coar", "loo", "gp"} <= set(printed["results"]["0.05"])  # and nc, ii with Captum installed
    assert printed["results"]["0.05"]["loo"]["mean"] == pytest.approx(scores["loo"]["mean"], abs=1e-6)
    assert (tmp_path / "cli.png").stat().st_size > 1000


# -- neuron conductance and internal influence (Captum) ------------------------------------------------------


def homogeneous_model():
    """Bias-free conv -> ReLU -> linear -> ReLU -> linear: positively homogeneous (f(a x) = a f(x), a >= 0),
    so along the path from a zero input every unit's gradient is the one at the example (for a > 0) and
    its activation scales with the path: conductance = activation x gradient = gradient x parameter."""
    from torch import nn

    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 7, bias=False), nn.ReLU(), nn.Linear(7, 5, bias=False)).eval()


def _homogeneous(**changes):
    fields = dict(model="test_baselines:homogeneous_model", examples="test_baselines:bias_free_examples",
                  kinds=["conv2d", "linear"], include=["^0$", "^3$"], output="correct_logit", batch_size=4)
    return Experiment(**{**fields, **changes})


def test_neuron_conductance_equals_gp_on_a_homogeneous_model_in_component_order():
    pytest.importorskip("captum")
    from coar_dask.fit.baselines import neuron_conductance

    experiment = _homogeneous()
    state = load_state(experiment)
    assert [g.module for g in state.components.groups] == ["0", "3"] and state.n_components == 11
    nc = neuron_conductance(experiment, examples_per_task=3, steps=4)
    gp = gradient_x_parameter(experiment, examples_per_task=5)
    scale = float(np.abs(gp.weight).max())
    assert scale > 0.05 and nc.weight.shape == (11, 10)
    # The trapezoid rule's 5 points 0, 1/4, ..., 1: conductance sums gradient x activation step over the 4
    # steps, each gradient taken at the step's start; at the zero input every ReLU is off (gradient 0),
    # so exactly 3 of the 4 steps count.
    np.testing.assert_allclose(nc.weight, 0.75 * gp.weight, atol=1e-4 * scale, rtol=0)
    assert nc.metadata["method"] == "nc" and nc.metadata["steps"] == 4
    # the unablated output: the all-kept mask predicts it
    with torch.no_grad():
        full = state.output_fn(state.model(state.inputs).float(), state.labels).numpy()
    np.testing.assert_allclose(nc.predict(np.ones((1, 11), bool))[0], full, atol=1e-4)
    many = neuron_conductance(experiment, steps=200)  # and it converges to GP
    np.testing.assert_allclose(many.weight, gp.weight, atol=0.01 * scale, rtol=0)


def test_internal_influence_is_the_units_gradient_summed_over_positions():
    pytest.importorskip("captum")
    from coar_dask.fit.baselines import internal_influence

    experiment = _homogeneous()
    state = load_state(experiment)
    ii = internal_influence(experiment, steps=3)
    seen = {}
    hooks = [state.model[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i in (0, 3)]
    try:
        values = state.output_fn(state.model(state.inputs.clone().requires_grad_(True)), state.labels)
        conv_grad, lin_grad = torch.autograd.grad(values.sum(), [seen[0], seen[3]])
    finally:
        for h in hooks:
            h.remove()
    expected = torch.cat([conv_grad.sum(dim=(2, 3)), lin_grad], dim=1).T.numpy()
    np.testing.assert_allclose(ii.weight, expected, atol=1e-4 * float(np.abs(expected).max()), rtol=0)


def test_captum_baselines_name_the_install_command_without_captum(monkeypatch):
    import sys

    from coar_dask.errors import MissingDependencyError
    from coar_dask.fit.baselines import neuron_conductance
    from coar_dask.fit.compare import default_methods

    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'coar_dask\[baselines\]'"):
        neuron_conductance(_homogeneous())
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert default_methods() == ("coar", "loo", "gp")


class AttentionModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def attention_model():
    return AttentionModel().eval()


def attention_examples():
    g = torch.Generator().manual_seed(4)
    return torch.randn(10, 4, 8, generator=g), torch.randint(0, 5, (10,), generator=g)


def test_compare_on_an_attention_model_names_coar_loo_before_computing_anything(tmp_path):
    """Issue 24.9: the hook-based baselines have no form for attention in-projections; compare says so
    up front, naming the methods that work, instead of failing after fitting and computing LOO."""
    from coar_dask.errors import ExperimentError
    from coar_dask.fit.compare import compare
    from coar_dask.runtime.build import init_experiment_store

    experiment = Experiment(model="test_baselines:attention_model", examples="test_baselines:attention_examples",
                            kinds=["mha_in_proj", "linear"], alpha=0.1, batch_size=5)
    store = init_experiment_store(tmp_path / "s", experiment, rows=20)  # never built: fitting it would fail
    held = init_experiment_store(tmp_path / "h", experiment.replace(mask_seed=1), rows=20)
    with pytest.raises(ExperimentError, match=r"--methods coar,loo") as err:
        compare(store.path, [held.path], methods=["coar", "loo", "gp"])
    assert "mha_in_proj" in str(err.value) and "gradient x parameter" in str(err.value)
    assert not (tmp_path / "s-loo").exists()


# -- the client stays on the CPU; GPU tasks need GPU workers (issue 23.6) ---------------------------------


def _cuda_tiny():
    return Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=5,
                      device="cuda")


@pytest.fixture
def no_cuda_in_client(monkeypatch):
    """A login node: asking torch about CUDA, or moving anything to it, in this process is the bug."""

    def touched(*args, **kwargs):
        raise AssertionError("the client touched CUDA")

    for name in ("is_available", "device_count", "init", "mem_get_info", "set_device", "current_device"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(torch.cuda, "_lazy_init", touched)


class FakeClient:
    """A client whose scheduler knows ``workers``; ``submit`` records what it was given, then stops the run."""

    def __init__(self, workers):
        self.workers, self.submitted = workers, []

    def scheduler_info(self):
        return {"workers": self.workers}

    def submit(self, fn, *args, **kwargs):
        self.submitted.append(kwargs)
        raise RuntimeError("submitted")

    def cancel(self, futures):
        pass


def _baselines(tmp_path):
    from coar_dask.fit import baselines as B

    calls = {"loo": lambda e, c: B.leave_one_out(e, tmp_path / "loo", client=c),
             "gp": lambda e, c: B.gradient_x_parameter(e, client=c)}
    if B.captum_available():
        calls.update(nc=lambda e, c: B.neuron_conductance(e, client=c, steps=2),
                     ii=lambda e, c: B.internal_influence(e, client=c, steps=2))
    return calls


def test_baselines_of_a_cuda_experiment_on_cpu_workers_fail_fast_without_touching_cuda(tmp_path,
                                                                                       no_cuda_in_client):
    from coar_dask.errors import ExperimentError

    cpu_workers = FakeClient({"tcp://a:1": {"resources": {}}, "tcp://b:2": {"resources": {"MEM": 1}}})
    for name, call in _baselines(tmp_path).items():
        with pytest.raises(ExperimentError, match="none of the cluster's 2 worker") as err:
            call(_cuda_tiny(), cpu_workers)
        assert "--gpus-per-job 1" in str(err.value) and "device: cpu" in str(err.value), name
    assert cpu_workers.submitted == []


def test_baselines_of_a_cuda_experiment_are_gpu_tasks_and_the_client_stays_on_the_cpu(tmp_path,
                                                                                      no_cuda_in_client):
    gpu_workers = FakeClient({"tcp://a:1": {"resources": {"GPU": 1}}})
    calls = _baselines(tmp_path)
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="submitted"):
            call(_cuda_tiny(), gpu_workers)
    assert len(gpu_workers.submitted) == len(calls)
    assert all(kw["resources"] == {"GPU": 1} for kw in gpu_workers.submitted)
