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
    assert set(printed["results"]["0.05"]) == {"coar", "loo", "gp"}
    assert printed["results"]["0.05"]["loo"]["mean"] == pytest.approx(scores["loo"]["mean"], abs=1e-6)
    assert (tmp_path / "cli.png").stat().st_size > 1000
