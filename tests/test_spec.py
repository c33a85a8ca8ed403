from __future__ import annotations

import json

import pytest

from coar_dask.errors import SpecError
from coar_dask.core.spec import Spec, load_spec

SEED_SPEC = {
    "num_models": 50000,
    "schema": {"masks": {"dtype": "bool_", "shape": [2304]}, "val_margins": {"dtype": "float16", "shape": [10000]}},
}


def test_round_trip_of_the_seed_format():
    spec = Spec.from_dict(SEED_SPEC)
    assert spec.to_dict() == SEED_SPEC
    assert spec.num_models == 50000
    assert spec["masks"].np_dtype.name == "bool"
    assert spec["val_margins"].shape == (10000,)
    assert Spec.from_json(json.dumps(SEED_SPEC)).sha256 == spec.sha256


def test_sha256_ignores_key_order_but_not_content():
    reordered = {"schema": dict(reversed(list(SEED_SPEC["schema"].items()))), "num_models": 50000}
    assert Spec.from_dict(reordered).sha256 == Spec.from_dict(SEED_SPEC).sha256
    other = json.loads(json.dumps(SEED_SPEC))
    other["num_models"] = 49999
    assert Spec.from_dict(other).sha256 != Spec.from_dict(SEED_SPEC).sha256


def test_load_spec_from_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SEED_SPEC))
    assert load_spec(path).to_dict() == SEED_SPEC


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([], "JSON object"),
        ({"schema": SEED_SPEC["schema"]}, "missing 'num_models'"),
        ({"num_models": 3}, "missing 'schema'"),
        ({"num_models": 0, "schema": SEED_SPEC["schema"]}, "positive integer"),
        ({"num_models": -5, "schema": SEED_SPEC["schema"]}, "positive integer"),
        ({"num_models": 2.5, "schema": SEED_SPEC["schema"]}, "positive integer"),
        ({"num_models": True, "schema": SEED_SPEC["schema"]}, "positive integer"),
        ({"num_models": 3, "schema": {}}, "at least one array"),
        ({"num_models": 3, "schema": {"m": {"dtype": "boolean", "shape": [2]}}}, "not a numpy"),
        ({"num_models": 3, "schema": {"m": {"dtype": "str_", "shape": [2]}}}, "not a numpy"),
        ({"num_models": 3, "schema": {"m": {"dtype": "bool_", "shape": [-2]}}}, "positive integers"),
        ({"num_models": 3, "schema": {"m": {"dtype": "bool_", "shape": [2.5]}}}, "positive integers"),
        ({"num_models": 3, "schema": {"m": {"dtype": "bool_", "shape": "2"}}}, "list of positive"),
        ({"num_models": 3, "schema": {"m": {"dtype": "bool_"}}}, "exactly 'dtype' and 'shape'"),
        ({"num_models": 3, "schema": {"_completed": {"dtype": "bool_", "shape": [1]}}}, "reserved"),
        ({"num_models": 3, "schema": SEED_SPEC["schema"], "extra": 1}, "unknown keys"),
    ],
)
def test_bad_specs_are_rejected_with_a_clear_message(data, fragment):
    with pytest.raises(SpecError, match=fragment):
        Spec.from_dict(data)


def test_not_json_names_the_position():
    with pytest.raises(SpecError, match="not valid JSON.*line 1"):
        Spec.from_json("{num_models: 3}")


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        Spec.from_dict({"num_models": 0, "schema": {}})


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.json")
