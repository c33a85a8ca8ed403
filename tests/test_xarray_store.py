"""A store opens in xarray (issue 24 item 1): dimension names on every array, the claim and content
record where zarr does not trip on them, and coordinates for components and examples."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from coar_dask.core.identity import CONTENT_FILE, read_content
from coar_dask.core.spec import Spec
from coar_dask.core.store import CLAIM_FILE, COMPLETED, dimension_names, init_store, open_store
from coar_dask.core.verify import verify_store

xr = pytest.importorskip("xarray")
zarr = pytest.importorskip("zarr")

ROWS, RPC = 30, 10


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits_experiment):
    """A digits store of 30 rows built in this process (20 rows completed, one block pending)."""
    from coar_dask.runtime.build import init_experiment_store, run_build

    path = tmp_path_factory.mktemp("xr") / "store"
    store = init_experiment_store(path, digits_experiment, ROWS, rows_per_chunk=RPC)
    run_build(store, digits_experiment)
    store = open_store(path)
    completed = store.array(COMPLETED)
    completed[20:30] = False  # the last block pending (its data stays: build rewrites it)
    return open_store(path)


def _open(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr's "not recognized as a component" warning fails the test
        ds = xr.open_zarr(path, consolidated=False)
        list(zarr.open_group(str(path), mode="r").arrays())
    return ds


def test_the_demo_store_opens_as_a_labelled_dataset(built, digits_experiment):
    ds = _open(built.path)
    p, k = built.spec["masks"].shape[0], built.spec["margins"].shape[0]
    assert ds["masks"].dims == ("row", "component")
    assert ds["margins"].dims == ("row", "example")
    assert ds["_completed"].dims == ("row",)
    assert ds.sizes["component"] == p and ds.sizes["example"] == k
    summary = built.meta["components"]
    first = summary["layers"][0]
    assert ds["layer"].dims == ("component",) and "layer" in ds.coords
    assert list(ds["layer"].values[: first["units"]]) == [first["module"]] * first["units"]
    assert ds["unit"].values[: first["units"]].tolist() == list(range(first["units"]))
    assert ds["name"].values[1] == f"{first['module']}[1]"
    np.testing.assert_array_equal(ds["component"].values, np.arange(p))
    np.testing.assert_array_equal(ds["example"].values, np.arange(k))
    from coar_dask.core.experiment import load_examples

    _, labels = load_examples(digits_experiment, "cpu")
    np.testing.assert_array_equal(ds["label"].values, labels.numpy())
    assert "label" in ds.coords and ds["label"].dims == ("example",)
    # selection by layer works the xarray way
    conv = ds["masks"].isel(component=(ds["layer"] == first["module"]).values)
    assert conv.sizes["component"] == first["units"]


def test_to_dask_and_open_zarr_agree(built):
    ds = _open(built.path)
    for name in (*built.spec.names, COMPLETED):
        lazy = built.to_dask(name)
        assert ds[name].shape == lazy.shape and ds[name].dims == built.dimension_names(name)
        assert ds[name].data.chunks == lazy.chunks
        np.testing.assert_array_equal(ds[name].values, lazy.compute())
    assert ds["_completed"].values.tolist() == [True] * 20 + [False] * 10


def test_records_live_outside_zarrs_hierarchy_and_first_writer_still_wins(built):
    assert not (built.path / CLAIM_FILE).exists() and not (built.path / CONTENT_FILE).exists()
    assert built.record_file(CLAIM_FILE).is_file() and built.record_file(CONTENT_FILE).is_file()
    assert built.read_claim()["experiment_fingerprint"] == built.experiment_fingerprint
    assert read_content(built)["experiment_fingerprint"] == built.experiment_fingerprint
    with pytest.raises(Exception, match="belongs to another experiment"):
        built.claim({"experiment_fingerprint": "another"})
    assert verify_store(built.path).intact


def _as_an_earlier_version_wrote_it(store):
    """Claim and content record moved back to the store's root, and the record folder forgotten."""
    for name in (CLAIM_FILE, CONTENT_FILE):
        shutil.move(store.record_file(name), store.path / name)
    meta = dict(store.meta)
    meta.pop("record_folder", None)
    meta["format_version"] = 3
    group = zarr.open_group(str(store.path), mode="r+")
    group.attrs["coar_dask"] = meta
    return open_store(store.path)


def test_a_store_with_its_claim_at_the_root_opens_verifies_builds_and_fits(built, tmp_path, digits_experiment):
    from coar_dask.fit.fit import fit
    from coar_dask.runtime.build import run_build

    old = tmp_path / "old"
    shutil.copytree(built.path, old)
    store = _as_an_earlier_version_wrote_it(open_store(old))
    assert store.read_claim()["experiment_fingerprint"] == store.experiment_fingerprint
    assert store.record_file(CLAIM_FILE) == old / CLAIM_FILE
    assert verify_store(old).intact
    run_build(store, digits_experiment)  # the pending block: the root claim and content record are checked
    assert open_store(old).completed_rows().all()
    assert not (old / COMPLETED / CLAIM_FILE).exists()  # no second claim was written elsewhere
    with pytest.raises(Exception, match="belongs to another experiment"):
        store.claim({"experiment_fingerprint": "another"})
    attrs = fit(open_store(old), num_train=25)
    assert attrs.weight.shape == (store.spec["masks"].shape[0], store.spec["margins"].shape[0])


def test_a_spec_store_has_dimension_names_before_any_build(tmp_path):
    spec = {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [6]},
                                          "y": {"dtype": "float16", "shape": [3]},
                                          "z": {"dtype": "float32", "shape": [2, 2]}}}
    store = init_store(tmp_path / "s", spec, rows_per_chunk=5)
    ds = _open(store.path)
    assert ds["masks"].dims == ("row", "component") and ds["y"].dims == ("row", "example")
    assert ds["z"].dims == ("row", "z_0", "z_1")
    assert ds["_digests"].dims == ("block", "digest_array", "digest_byte")
    np.testing.assert_array_equal(ds["component"].values, np.arange(6))
    for name in ("masks", "y", "z", COMPLETED):
        assert store.dimension_names(name) == dimension_names(store.spec)[name]
        assert ds[name].dims == dimension_names(store.spec)[name]


def test_two_output_arrays_of_different_lengths_do_not_share_a_dimension(tmp_path):
    spec = {"num_models": 4, "schema": {"masks": {"dtype": "bool_", "shape": [6]},
                                         "train": {"dtype": "float16", "shape": [3]},
                                         "val": {"dtype": "float16", "shape": [5]}}}
    store = init_store(tmp_path / "s", spec)
    ds = _open(store.path)
    assert ds["train"].dims == ("row", "example") and ds["val"].dims == ("row", "val_0")
