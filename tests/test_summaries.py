"""Issue 26 item 4: attributions by layer and by class (``Attributions.by_layer/by_class``,
``coar-dask top --by layer|class``), on a real fit of the digits model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coar_dask import fit, init_store
from coar_dask.cli.main import main
from coar_dask.core.experiment import load_state
from coar_dask.errors import RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.summaries import Table, by_class, by_layer
from coar_dask.runtime.build import init_experiment_store, run_build


@pytest.fixture(scope="module")
def digits_fit(tmp_path_factory, digits_experiment):
    path = tmp_path_factory.mktemp("summaries") / "s"
    store = init_experiment_store(path, digits_experiment, 200, rows_per_chunk=100)
    run_build(store, None)
    attrs = fit(store)
    labels = np.asarray(load_state(digits_experiment).labels).reshape(-1)
    return attrs, labels


def test_by_layer_reduces_each_layers_components(digits_fit):
    attrs, _ = digits_fit
    layer_of = np.array([n.rsplit("[", 1)[0] for n in attrs.component_names])
    layers = list(dict.fromkeys(layer_of.tolist()))
    table = attrs.by_layer()
    assert list(table.index) == layers and list(table.columns) == list(range(attrs.n_examples))
    for layer in layers:
        w = attrs.weight[layer_of == layer].astype(np.float64)
        np.testing.assert_allclose(table.loc[layer].to_numpy(), np.abs(w).mean(0), rtol=1e-12)
        np.testing.assert_allclose(attrs.by_layer("sum").loc[layer].to_numpy(), w.sum(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(RegressionError, match="reduce must be one of"):
        attrs.by_layer("median")


def test_by_class_averages_over_each_class(digits_fit):
    attrs, labels = digits_fit
    with pytest.raises(RegressionError, match="one label per example"):
        attrs.by_class()  # the fit records no labels: asked for, not guessed
    labelled = attrs.with_labels(labels)
    table = labelled.by_class()
    assert list(table.columns) == sorted(set(labels.tolist()))
    assert list(table.index) == attrs.component_names
    for c in (0, 3):
        np.testing.assert_allclose(table[c].to_numpy(), attrs.weight[:, labels == c].astype(np.float64).mean(1), rtol=1e-9)
    per_layer = labelled.by_class(by="layer", reduce="sum")
    np.testing.assert_allclose(per_layer[3].to_numpy(), attrs.by_layer("sum").to_numpy()[:, labels == 3].mean(1))


def test_labels_recorded_with_the_attributions_survive_save_and_load(digits_fit, tmp_path):
    attrs, labels = digits_fit
    loaded = Attributions.load(attrs.with_labels(labels).save(tmp_path / "a.pt"))
    assert loaded.metadata["labels"] == labels.tolist()
    np.testing.assert_allclose(loaded.by_class().to_numpy(), attrs.with_labels(labels).by_class().to_numpy())
    with pytest.raises(RegressionError, match="labels must be"):
        attrs.with_labels(labels[:-1])


def test_summaries_skip_unfitted_components(digits_fit):
    attrs, _ = digits_fit
    weight = attrs.weight.copy()
    weight[0] = np.nan  # an unfitted component of the first layer
    first = attrs.component_names[0].rsplit("[", 1)[0]
    holed = Attributions(weight, attrs.bias, attrs.lam, attrs.metadata)
    layer_of = np.array([n.rsplit("[", 1)[0] for n in attrs.component_names])
    expected = np.abs(attrs.weight[1:][layer_of[1:] == first]).mean(0)
    np.testing.assert_allclose(holed.by_layer().loc[first].to_numpy(), expected, rtol=1e-6)


def test_without_pandas_a_table_of_values_and_names(digits_fit, monkeypatch):
    import builtins

    attrs, _ = digits_fit
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    table = by_layer(attrs)
    assert isinstance(table, Table) and table.row_name == "layer" and table.values.shape == (len(table.rows),
                                                                                              attrs.n_examples)


def test_top_by_layer_and_by_class_print_small_tables(digits_fit, tmp_path, capsys):
    attrs, labels = digits_fit
    path = attrs.save(tmp_path / "a.pt")
    capsys.readouterr()
    assert main(["top", "--attributions", str(path), "--by", "layer"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    layers = list(attrs.by_layer().index)
    assert lines[0].split()[0] == "layer" and [line.split()[0] for line in lines[1:]] == layers
    assert main(["top", "--attributions", str(path), "--by", "class"]) == 2  # no labels recorded: one line
    assert "one label per example" in capsys.readouterr().err
    np.save(tmp_path / "labels.npy", labels)
    assert main(["top", "--attributions", str(path), "--by", "class", "--labels", str(tmp_path / "labels.npy"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["columns"][1:] == [f"class {c}" for c in sorted(set(labels.tolist()))]
    assert [row[0] for row in out["rows"]] == layers
    assert main(["top", "--attributions", str(path)]) == 2
    assert "--by layer|class" in capsys.readouterr().err
