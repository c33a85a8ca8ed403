"""Every attributions file ``fit`` writes loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from coar_dask import fit, init_store  # noqa: E402
from coar_dask.core.masks import sample_masks  # noqa: E402
from coar_dask.errors import RegressionError  # noqa: E402
from coar_dask.fit.attributions import Attributions, plain_metadata  # noqa: E402

P, K, N = 12, 3, 240

_numpy_scalars = st.one_of(
    st.floats(allow_nan=False, width=32).map(np.float32), st.floats(allow_nan=False).map(np.float64),
    st.integers(-2**31, 2**31 - 1).map(np.int64), st.booleans().map(np.bool_),
)
_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                    _numpy_scalars,
                    st.lists(st.floats(allow_nan=False), max_size=4).map(np.asarray))
_metadata = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)), max_leaves=12)


def _same(a, b) -> bool:
    """Equal as plain data: numpy values compare by their Python value."""
    a = plain_metadata(a)
    return a == b


@settings(max_examples=60, deadline=None)
@given(meta=st.dictionaries(st.text(min_size=1, max_size=6), _metadata, max_size=4))
def test_any_plain_or_numpy_metadata_round_trips_through_a_safe_load(tmp_path_factory, meta):
    path = tmp_path_factory.mktemp("attr") / "a.pt"
    a = Attributions(np.zeros((2, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32), meta)
    a.save(path)
    loaded = torch.load(path, weights_only=True)["metadata"]
    assert _same(meta, loaded)
    for value in _walk(loaded):
        assert value is None or type(value) in (bool, int, float, str, list, tuple, dict)


def _walk(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk(v)


def test_metadata_that_cannot_be_stored_is_refused_before_writing(tmp_path):
    a = Attributions(np.zeros((2, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
                     {"solver": {"state": object()}})
    with pytest.raises(RegressionError, match=r"metadata\['solver'\]\['state'\] holds a object"):
        a.save(tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("store") / "s"
    spec = {"num_models": N, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                        "margins": {"dtype": "float16", "shape": [K]}}}
    s = init_store(path, spec, rows_per_chunk=60)
    w = rng.normal(size=(P, K))
    for b in range(s.n_blocks):
        rows = np.arange(b * 60, (b + 1) * 60)
        masks = sample_masks(0, rows, P, 0.2)
        y = masks @ w + 700 + 0.1 * rng.normal(size=(60, K))
        s.write_block(b, {"masks": masks, "margins": y})
    return path


VARIANTS = {
    "lstsq": {},
    "ridge": {"ridge": 0.5},
    "ridge-grid": {"num_val": 40, "ridge_grid": "auto"},
    "ridge-grid-refit": {"num_val": 40, "ridge_grid": "auto", "refit": True},
    "cg": {"method": "cg"},
    "validated": {"num_val": 40},
    "target-slice": {"target_slice": (1, 3)},
    "slices": {"slices": 2},
    "saga": {"solver": "saga", "num_val": 40, "max_epochs": 30, "lr": 0.01, "batch_size": 50},
    "saga-k1": {"solver": "saga", "k": 1, "max_epochs": 30, "lr": 0.01, "batch_size": 50},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_fit_variant_writes_a_file_that_loads_safely(store, tmp_path, variant):
    attrs = fit(store, **VARIANTS[variant])
    path = attrs.save(Path(tmp_path) / f"{variant}.pt")
    data = torch.load(path, weights_only=True)
    assert set(data) >= {"weight", "bias", "lam", "metadata"}
    loaded = Attributions.load(path)
    np.testing.assert_array_equal(loaded.weight, attrs.weight)
    assert _same(dict(attrs.metadata), loaded.metadata)


# ------------------------------------------- issue 24 items 2-3: labelled views
def _named(first: int = 10):
    rng = np.random.default_rng(0)
    summary = {"layers": [{"module": "conv1", "units": 2}, {"module": "fc", "units": 3}], "total": 5}
    return Attributions(rng.normal(size=(5, 4)).astype(np.float32), np.zeros(4), np.zeros(4),
                        metadata={"components": summary, "target_slice": [first, first + 4], "solver": "lstsq",
                                  "n_train": 30})


def test_to_xarray_labels_components_and_examples():
    pytest.importorskip("xarray")
    a = _named()
    da = a.to_xarray()
    assert da.dims == ("component", "example")
    assert da["example"].values.tolist() == [10, 11, 12, 13]
    assert da["layer"].values.tolist() == ["conv1", "conv1", "fc", "fc", "fc"]
    assert da["unit"].values.tolist() == [0, 1, 0, 1, 2]
    assert da["name"].values.tolist() == a.component_names
    np.testing.assert_array_equal(da.sel(example=12).values, a.weight[:, 2])
    fc = a.select(example=[11, 13], layer="fc")
    assert fc.shape == (3, 2) and set(fc["layer"].values) == {"fc"}
    np.testing.assert_array_equal(fc.values, a.weight[2:, [1, 3]])
    with pytest.raises(RegressionError, match="examples \\[3\\]"):
        a.select(example=3)
    with pytest.raises(RegressionError, match="conv9"):
        a.select(layer="conv9")


def test_to_pandas_and_the_notebook_view():
    pytest.importorskip("pandas")
    a = _named(first=0)
    df = a.to_pandas()
    assert df.shape == (5, 4) and df.index.names == ["layer", "unit"]
    assert df.loc[("fc", 2), 3] == pytest.approx(float(a.weight[4, 3]))
    html = a._repr_html_()
    assert "conv1 (2)" in html and "lstsq" in html and "<table>" in html
    unnamed = Attributions(np.ones((3, 2)), np.zeros(2), np.zeros(2))
    assert unnamed.to_pandas().index.get_level_values("unit").tolist() == [0, 1, 2]
    assert "<script" not in Attributions(np.ones((1, 1)), np.zeros(1), np.zeros(1),
                                         metadata={"solver": "<script>x</script>"})._repr_html_()


def test_attribution_plots_return_a_figure_and_write_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    from coar_dask.fit.attribution_plots import layer_class_means, plot_layer_classes, plot_top_components

    a = _named(first=0)
    labels = [0, 1, 0, 1]
    layers, classes, means = layer_class_means(a, labels)
    assert layers == ["conv1", "fc"] and classes.tolist() == [0, 1]
    assert means[1, 0] == pytest.approx(float(a.weight[2:, [0, 2]].mean()))
    fig = plot_top_components(a, 2, k=2)
    assert len(fig.axes[0].patches) == 4
    assert plot_layer_classes(a, labels).axes
    written = plot_top_components(a, 2, k=2, path=tmp_path / "top")
    assert written == tmp_path / "top.png" and written.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(Exception, match="overwrite"):
        plot_layer_classes(a, labels, path=written)
    assert plot_layer_classes(a, labels, path=written, overwrite=True) == written
    with pytest.raises(RegressionError, match="one label per example"):
        layer_class_means(a)
