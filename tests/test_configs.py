"""configs/<setup>/: the seed's four setups validate (spec, regression YAML, experiment)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from coar_dask.core.experiment import Experiment
from coar_dask.zoo.presets import build_model, get_preset
from coar_dask.compat.seed import load_regression_config
from coar_dask.core.spec import load_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# setup -> (component preset, components, examples per row, rows, output array)
SETUPS = {
    "cifar_resnet": ("cifar_resnet", 2_304, 10_000, 50_000, "test_margins"),
    "imagenet_resnet": ("imagenet_resnet", 22_720, 50_000, 100_000, "val_margins"),
    "imagenet_vit": ("imagenet_vit", 82_944, 5_000, 200_000, "val_margins"),
    "gpt2_tinystories": ("gpt2_tinystories", 64_512, 500, 100_000, "test_margins"),
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_spec_matches_the_papers_setup(setup):
    preset, n_components, n_examples, rows, y_name = SETUPS[setup]
    spec = load_spec(CONFIGS / setup / "spec.json")
    assert spec.num_models == rows
    assert spec.names == ("masks", y_name)
    assert spec["masks"].dtype == "bool_" and spec["masks"].shape == (n_components,)
    assert spec[y_name].dtype == "float16" and spec[y_name].shape == (n_examples,)
    assert get_preset(preset).total == n_components


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_regression_config_reads_and_fits_the_spec(setup):
    spec = load_spec(CONFIGS / setup / "spec.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_regression_config(CONFIGS / setup / "regression_config.yaml")
    # The seed's keys are all known; its extra `true_random` is reported, not dropped.
    assert cfg.unknown == ("cfg.true_random",)
    assert any("cfg.true_random" in str(w.message) for w in caught)
    assert (cfg.k, cfg.manual_max_lambda, cfg.use_bias) == (1, 0.0, 1)  # what coar_dask fits exactly
    assert cfg.data_path is None and cfg.out_dir is None  # given on the command line, as in the seed
    assert 0 < cfg.num_train + cfg.num_val <= spec.num_models
    assert cfg.batch_size > 0 and cfg.lr > 0


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_experiment_names_the_preset_and_the_data_to_supply(setup):
    from coar_dask.core.components import select_components

    preset, n_components, n_examples, _, y_name = SETUPS[setup]
    path = CONFIGS / setup / "experiment.yaml"
    experiment = Experiment.from_yaml(path)
    text = path.read_text()
    assert f"preset {preset}" in text and "YOU MUST SUPPLY" in text
    # The data cannot be downloaded here: the examples factory and its path are placeholders.
    assert experiment.examples.startswith("REPLACE_ME")
    assert any("REPLACE_ME" in str(v) for v in experiment.examples_kwargs.values())
    assert (experiment.x_name, experiment.y_name, experiment.y_dtype) == ("masks", y_name, "float16")
    spec = load_spec(CONFIGS / setup / "spec.json")
    assert spec[y_name].shape == (n_examples,)
    # Its component selection, applied to the preset's architecture, is the paper's count.
    p = get_preset(preset)
    assert set(experiment.include) == set(p.include) and set(experiment.exclude) == set(p.exclude)
    assert set(experiment.kinds) == set(p.kinds)
    comps = select_components(build_model(preset), include=experiment.include, exclude=experiment.exclude,
                              kinds=experiment.kinds)
    assert len(comps) == n_components
