"""End to end: build on a real LocalCluster, resume, fit, evaluate, CLI and demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coar_dask.runtime.build import execute_plan, plan_build, run_build
from coar_dask.cli.main import main
from coar_dask.fit.evaluate import eval_store_for, evaluate
from coar_dask.core.experiment import load_state
from coar_dask.fit.fit import Attributions, fit
from coar_dask.core.store import open_store


def _store_for(path, experiment, rows, rows_per_chunk=None):
    state = load_state(experiment)
    return eval_store_for(path, experiment, rows, state.n_components, state.n_examples, rows_per_chunk=rows_per_chunk)


def assert_same_rows(a, b):
    for name in a.spec.names + ("_completed",):
        np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)


@pytest.fixture(scope="module")
def local_client():
    from coar_dask.runtime.clusters import cluster_client

    with cluster_client("local", n_workers=2) as client:
        yield client


def test_build_on_local_cluster_equals_in_process_build(tmp_path, tiny_experiment, local_client):
    serial = _store_for(tmp_path / "serial", tiny_experiment, 37, rows_per_chunk=8)
    run_build(serial, tiny_experiment)
    dist = _store_for(tmp_path / "dask", tiny_experiment, 37, rows_per_chunk=8)
    report = run_build(dist, tiny_experiment, client=local_client)
    assert report.blocks_done == 5 and report.rows_done == 37
    assert open_store(dist.path).completed_rows().all()
    assert_same_rows(open_store(serial.path), open_store(dist.path))


def test_outputs_are_the_ablated_models_margins(tmp_path, tiny_experiment):
    """Row i of the store = margin of a deepcopy of the model with row i's ablated weights zeroed."""
    import copy

    from conftest import tiny_examples, tiny_model

    store = _store_for(tmp_path / "s", tiny_experiment, 6, rows_per_chunk=3)
    run_build(store, tiny_experiment)
    masks, outputs = store.array("masks")[:], store.array("margins")[:]
    x, y = tiny_examples()
    state = load_state(tiny_experiment)
    for i in range(6):
        model = copy.deepcopy(tiny_model())
        with torch.no_grad():
            for j in np.flatnonzero(~masks[i]):
                [module], [unit] = state.components.locate([j])
                model.get_submodule(module).weight[unit] = 0
            logits = model(x)
        correct = logits[torch.arange(len(y)), y]
        other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
        np.testing.assert_allclose(outputs[i], (correct - other).numpy().astype(np.float16), rtol=0, atol=0)
    assert (~masks).any(), "some component must be ablated for this test to mean anything"


def test_interrupted_build_resumes_and_equals_uninterrupted(tmp_path, tiny_experiment, local_client):
    reference = _store_for(tmp_path / "ref", tiny_experiment, 40, rows_per_chunk=5)
    run_build(reference, tiny_experiment)
    store = _store_for(tmp_path / "s", tiny_experiment, 40, rows_per_chunk=5)
    plan = plan_build(store, tiny_experiment)
    # "Interrupt" after 3 of 8 blocks: only those ran.
    partial = execute_plan(type(plan)(plan.store_path, plan.experiment, plan.blocks[:3], plan.n_blocks_total,
                                      plan.rows_per_chunk))
    assert partial.blocks_done == 3
    resumed_plan = plan_build(store, tiny_experiment)
    assert [b.index for b in resumed_plan.blocks] == [3, 4, 5, 6, 7]
    report = execute_plan(resumed_plan, local_client)
    assert report.blocks_done == 5
    assert plan_build(store, tiny_experiment).blocks == ()
    assert_same_rows(open_store(reference.path), open_store(store.path))


def test_build_refuses_a_store_of_another_experiment(tmp_path, tiny_experiment):
    from coar_dask.errors import StoreMismatchError

    store = _store_for(tmp_path / "s", tiny_experiment, 10, rows_per_chunk=5)
    run_build(store, tiny_experiment)
    with pytest.raises(StoreMismatchError, match="mask_seed|another experiment"):
        plan_build(store, tiny_experiment.replace(mask_seed=7))


def test_digits_fit_and_evaluate(tmp_path, digits_experiment, local_client):
    store = _store_for(tmp_path / "s", digits_experiment, 600, rows_per_chunk=100)
    run_build(store, digits_experiment, client=local_client)
    eval_exp = digits_experiment.replace(mask_seed=1)
    held_out = _store_for(tmp_path / "e", eval_exp, 200)
    run_build(held_out, eval_exp, client=local_client)
    attrs = fit(store, num_val=100)
    assert attrs.weight.shape == (80, 360) and attrs.bias.shape == (360,)
    assert attrs.metadata["n_train"] == 500 and attrs.metadata["n_val"] == 100
    result = evaluate(attrs, held_out)
    # ~0.9 at 2000 rows; a 500-row fit is already well above chance.
    assert result.mean > 0.75, result.mean
    assert np.mean(attrs.metadata["val_correlation"]) > 0.7
    # Saved file loads safely and predicts the same.
    path = attrs.save(tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"weight", "bias", "lam", "metadata"}
    again = Attributions.load(path)
    masks = held_out.array("masks")[:5]
    np.testing.assert_allclose(again.predict(masks), attrs.predict(masks))


def test_cli_stages_demo_and_api_give_the_same_attributions(tmp_path, digits_experiment, capsys):
    store, out = tmp_path / "cli_store", tmp_path / "attrs.pt"
    assert main(["init", "--experiment", "configs/digits.yaml", "--rows", "300", "--store", str(store)]) == 0
    assert main(["build", "--experiment", "configs/digits.yaml", "--store", str(store), "--workers", "2"]) == 0
    assert main(["status", "--store", str(store), "--json"]) == 0
    assert main(["fit", "--store", str(store), "--out", str(out)]) == 0
    cli = Attributions.load(out)

    api = fit(store)
    np.testing.assert_array_equal(cli.weight, api.weight)

    demo_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(demo_dir), "--rows", "300", "--eval-rows", "100", "--workers", "2"]) == 0
    summary = json.loads((demo_dir / "summary.json").read_text())
    for key in ("n_components", "n_rows", "alpha", "build_seconds", "fit_seconds", "mean_correlation",
                "median_correlation"):
        assert key in summary
    assert summary["n_components"] == 80 and summary["n_rows"] == 300
    assert (demo_dir / "evaluation.png").stat().st_size > 10_000
    demo = Attributions.load(demo_dir / "attributions.pt")
    np.testing.assert_allclose(demo.weight, cli.weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(demo.bias, cli.bias, rtol=1e-5, atol=1e-5)

    # Evaluate from the CLI on the demo's held-out store.
    capsys.readouterr()
    assert main(["evaluate", "--attributions", str(out), "--store", str(demo_dir / "eval_store"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mean_correlation"] == pytest.approx(summary["mean_correlation"], abs=1e-4)

    # compare.json has every method; `coar-dask compare` finds the demo's LOO rows where the demo put them
    # (STORE-loo: reused, not recomputed) and refuses to replace its plot without --overwrite.
    scores = json.loads((demo_dir / "compare.json").read_text())["0.05"]
    from coar_dask.fit.compare import default_methods

    assert set(scores) == set(default_methods()) and {"coar", "loo", "gp"} <= set(scores)
    assert (demo_dir / "store-loo").is_dir() and not (demo_dir / "loo_store").exists()
    capsys.readouterr()
    again = ["compare", "--store", str(demo_dir / "store"), "--eval-store", str(demo_dir / "eval_store"),
             "--methods", "loo", "--cluster", "none", "--json", "--plot", str(demo_dir / "compare.png")]
    assert main(again) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"]["0.05"]["loo"]["mean"] == pytest.approx(scores["loo"]["mean"], abs=1e-6)
    assert printed["seconds"]["loo"] < 5  # read back, not P + 1 ablated models again


def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["status", "--store", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no coar_dask store" in err and "Traceback" not in err
