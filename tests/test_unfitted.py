"""Issue 22 item 6: components never (or always) ablated in the rows fitted on get NaN weights, not 0, and
every reader handles them: predictions and evaluation treat them as contributing nothing (one warning),
``top`` and the edit selection never rank them, the labelled views keep NaN, a saved file loads."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from coar_dask import fit, init_store
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.edit import choose_components, edit_scores
from coar_dask.fit.evaluate import evaluate


def _partial_store(path, keep_always: int = 0):
    """200 of 300 rows built, every built row keeping component ``keep_always`` (as when the rows ablating a
    unit the output is divided by all failed)."""
    rng = np.random.default_rng(0)
    spec = {"num_models": 300, "schema": {"masks": {"dtype": "bool_", "shape": [8]},
                                          "margins": {"dtype": "float32", "shape": [3]}}}
    store = init_store(path, spec, rows_per_chunk=50, mask_seed=0, alpha=0.2)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    for block in list(store.blocks())[:4]:
        m = rng.random((len(block), 8)) >= 0.2
        m[:, keep_always] = True
        store.write_block(block.index, {"masks": m, "margins": m @ w + 0.01 * rng.normal(size=(len(m), 3))})
    return store


@pytest.fixture()
def partial(tmp_path):
    store = _partial_store(tmp_path / "s")
    return store, fit(store)


def test_an_unfitted_component_gets_nan_weights_and_the_others_are_finite(partial):
    _, attrs = partial
    assert np.isnan(attrs.weight[0]).all()
    assert np.isfinite(attrs.weight[1:]).all()
    assert attrs.unfitted.tolist() == [0] == attrs.metadata["unfitted_components"]


def test_predict_treats_an_unfitted_component_as_contributing_nothing_and_warns_once(partial, caplog):
    _, attrs = partial
    masks = np.random.default_rng(1).random((20, 8)) >= 0.5
    with caplog.at_level(logging.WARNING):
        first, second = attrs.predict(masks), attrs.predict(masks)
    assert np.isfinite(first).all() and np.array_equal(first, second)
    expected = masks[:, 1:].astype(np.float32) @ attrs.weight[1:] + attrs.bias
    np.testing.assert_allclose(first, expected, rtol=1e-6, atol=1e-6)
    lines = [r for r in caplog.records if "unfitted" in r.getMessage()]
    assert len(lines) == 1 and "1 of 8 component(s) are unfitted" in lines[0].getMessage()


def test_a_saved_file_with_unfitted_components_loads_and_evaluates(partial, tmp_path, caplog):
    store, attrs = partial
    loaded = Attributions.load(attrs.save(tmp_path / "a.pt"))
    assert np.isnan(loaded.weight[0]).all() and loaded.unfitted.tolist() == [0]
    with caplog.at_level(logging.WARNING):
        result = evaluate(loaded, store)
    assert np.isfinite(result.correlations).all() and result.mean > 0.9
    assert np.isfinite(result.sample_predicted).all()


def test_a_weight_with_a_stray_nan_is_still_refused(tmp_path):
    torch = pytest.importorskip("torch")
    w = torch.ones(4, 2)
    w[1, 0] = float("nan")  # not a whole component: a broken file
    torch.save({"weight": w, "bias": torch.zeros(2), "lam": torch.zeros(2), "metadata": {}}, tmp_path / "x.pt")
    from coar_dask.errors import RegressionError

    with pytest.raises(RegressionError, match="NaN"):
        Attributions.load(tmp_path / "x.pt")


def test_top_never_ranks_an_unfitted_component(partial):
    _, attrs = partial
    top = attrs.top_components(0, k=8)
    ranked = [c for c, _ in top.positive + top.negative]
    assert 0 not in ranked and len(ranked) == 7


def test_the_edit_selection_never_chooses_an_unfitted_component(partial):
    _, attrs = partial
    scores = edit_scores(attrs, [0], [1, 2])
    assert np.isnan(scores[0])
    for direction in ("lower", "raise"):
        chosen = choose_components(scores, 8, direction)
        assert 0 not in chosen.tolist() and len(chosen) == 7


def test_the_labelled_views_keep_nan(partial):
    pytest.importorskip("pandas")
    _, attrs = partial
    assert np.isnan(attrs.to_pandas().to_numpy()[0]).all()
    pytest.importorskip("xarray")
    assert np.isnan(attrs.to_xarray().values[0]).all()
