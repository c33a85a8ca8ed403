"""A catalogue of bad input: each case gets a clear error naming what was wrong
and how to fix it, exits with code 2 and one line (no traceback) on the command
line, and changes nothing on disk (a snapshot of every file's name and bytes,
and every folder, is the same before and after).

The experiments use ``conftest``'s tiny CNN (23 components: 4 + 6 conv
channels, 8 + 5 linear neurons; 12 examples of 1x6x6, 5 classes), so no model
is trained here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from coar_dask.runtime.build import plan_build, run_build
from coar_dask.cli.main import main
from coar_dask.errors import (
    CoarError,
    ConfigError,
    ExperimentError,
    RegressionError,
    SpecError,
    StoreError,
    StoreMismatchError,
)
from coar_dask.fit.evaluate import eval_store_for
from coar_dask.core.experiment import Experiment, load_experiment, load_state
from coar_dask.fit.fit import Attributions, fit
from coar_dask.core.spec import Spec, load_spec
from coar_dask.core.store import init_store

torch = pytest.importorskip("torch")

P_TINY, K_TINY = 23, 12
GOOD_SPEC = {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [P_TINY]},
                                          "margins": {"dtype": "float16", "shape": [K_TINY]}}}


def wrong_shape_examples():
    """Three-channel images for a model whose first conv takes one channel."""
    from conftest import tiny_examples

    x, y = tiny_examples()
    return x.repeat(1, 3, 1, 1), y


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def cli_error(argv: list[str], capsys, root: Path, *fragments: str, one_line: bool = True) -> str:
    """Run ``coar-dask ARGV``: exit code 2, one line on stderr without a traceback,
    naming every fragment, and nothing under ``root`` changed."""
    before = snapshot(root)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"coar-dask {argv[0]}: error: "), err
    if one_line:
        assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert snapshot(root) == before, "a failed command changed files on disk"
    return err


def write_spec(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def write_yaml(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_yaml(tmp_path, tiny_experiment):
    return write_yaml(tmp_path / "tiny.yaml", tiny_experiment.to_dict())


@pytest.fixture
def tiny_store(tmp_path, tiny_experiment):
    """A built 10-row store of the tiny experiment."""
    store = eval_store_for(tmp_path / "built", tiny_experiment, 10, P_TINY, K_TINY, rows_per_chunk=5)
    run_build(store, tiny_experiment)
    return store


def build_argv(store: Path, experiment: Path) -> list:
    return ["build", "--store", store, "--experiment", experiment, "--cluster", "none"]


def test_the_tiny_experiment_has_the_widths_these_cases_assume(tiny_experiment):
    state = load_state(tiny_experiment)
    assert (state.n_components, state.n_examples) == (P_TINY, K_TINY)


# ------------------------------------------------------------------- 1. specs


def test_spec_that_is_not_json(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.json", '{"num_models": 10, "schema": {')
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              "is not valid JSON", "line 1", '{"num_models": 1000, "schema"')
    with pytest.raises(SpecError):
        load_spec(spec)


@pytest.mark.parametrize("missing", ["num_models", "schema"])
def test_spec_missing_a_key(tmp_path, capsys, missing):
    data = {k: v for k, v in GOOD_SPEC.items() if k != missing}
    spec = write_spec(tmp_path / "spec.json", data)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              f"missing '{missing}'", "A spec looks like")


@pytest.mark.parametrize("dtype", ["float128x", "str_", "complex64", "", 3])
def test_spec_with_an_unknown_dtype(tmp_path, capsys, dtype):
    data = json.loads(json.dumps(GOOD_SPEC))
    data["schema"]["margins"]["dtype"] = dtype
    spec = write_spec(tmp_path / "spec.json", data)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              "schema['margins']['dtype']", "'float16'")


@pytest.mark.parametrize("shape, shown", [([-3], "-3"), ([0], "0"), ([2.5], "2.5"), (["12"], "'12'"),
                                          ([True], "True"), ("12", "'12'")])
def test_spec_with_a_negative_or_non_integer_shape(tmp_path, capsys, shape, shown):
    data = json.loads(json.dumps(GOOD_SPEC))
    data["schema"]["margins"]["shape"] = shape
    spec = write_spec(tmp_path / "spec.json", data)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              "schema['margins']['shape']", "positive integers", shown)


def test_spec_naming_the_reserved_completed_array(tmp_path, capsys):
    data = json.loads(json.dumps(GOOD_SPEC))
    data["schema"]["_completed"] = {"dtype": "bool_", "shape": [1]}
    spec = write_spec(tmp_path / "spec.json", data)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              "'_completed' is reserved", "remove it from the spec")


@pytest.mark.parametrize("n", [0, -5, 2.5, "10", True, None])
def test_spec_with_num_models_not_a_positive_integer(tmp_path, capsys, n):
    spec = write_spec(tmp_path / "spec.json", {**GOOD_SPEC, "num_models": n})
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              "'num_models' must be a positive integer", f"found {n!r}")


def test_spec_file_that_does_not_exist(tmp_path, capsys):
    cli_error(["init", "--spec", tmp_path / "nope.json", "--store", tmp_path / "store"], capsys, tmp_path,
              "nope.json", "does not exist", "pass the path of a JSON spec")


@pytest.mark.parametrize("rpc", ["0", "-2"])
def test_rows_per_chunk_not_positive(tmp_path, capsys, rpc):
    spec = write_spec(tmp_path / "spec.json", GOOD_SPEC)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store", "--rows-per-chunk", rpc], capsys, tmp_path,
              "rows_per_chunk must be a positive integer", f"found {rpc}")


# ------------------------------------------------------------------ 2. stores


def test_store_path_holding_another_spec(tmp_path, capsys):
    init_store(tmp_path / "store", GOOD_SPEC)
    other = json.loads(json.dumps(GOOD_SPEC))
    other["schema"]["margins"]["shape"] = [K_TINY + 1]
    spec = write_spec(tmp_path / "other.json", other)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store"], capsys, tmp_path,
              "already exists with another spec", "Use a new store path")
    with pytest.raises(StoreMismatchError):
        init_store(tmp_path / "store", other)


@pytest.mark.parametrize("command", ["init", "build", "status", "fit"])
def test_store_path_that_is_a_file(tmp_path, capsys, command, tiny_yaml):
    file = tmp_path / "store.txt"
    file.write_text("my notes")
    spec = write_spec(tmp_path / "spec.json", GOOD_SPEC)
    argv = {
        "init": ["init", "--spec", spec, "--store", file],
        "build": build_argv(file, tiny_yaml),
        "status": ["status", "--store", file],
        "fit": ["fit", "--store", file, "--out", tmp_path / "a.pt"],
    }[command]
    cli_error(argv, capsys, tmp_path, "store.txt", "is a file")


def test_store_path_that_is_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "results.csv").write_text("1,2,3\n")
    spec = write_spec(tmp_path / "spec.json", GOOD_SPEC)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "data"], capsys, tmp_path,
              "exists and is not empty", "choose an empty or new directory")


def test_build_on_a_store_that_does_not_exist(tmp_path, capsys, tiny_yaml):
    cli_error(build_argv(tmp_path / "nostore", tiny_yaml), capsys, tmp_path,
              "no coar_dask store", "coar-dask init")


# ------------------------------------------- 3. experiment does not fit store


def test_mask_width_in_spec_differs_from_the_selected_components(tmp_path, capsys, tiny_experiment, tiny_yaml):
    init_store(tmp_path / "store", Spec.for_experiment(10, P_TINY + 2, K_TINY))
    cli_error(build_argv(tmp_path / "store", tiny_yaml), capsys, tmp_path,
              f"has {P_TINY + 2} entries per row", f"selects {P_TINY} components",
              "fix the spec's shape or the experiment's components")
    with pytest.raises(ExperimentError):
        plan_build(tmp_path / "store", tiny_experiment)


def test_output_width_in_spec_differs_from_the_examples(tmp_path, capsys, tiny_yaml):
    init_store(tmp_path / "store", Spec.for_experiment(10, P_TINY, K_TINY - 1))
    cli_error(build_argv(tmp_path / "store", tiny_yaml), capsys, tmp_path,
              f"has {K_TINY - 1} entries per row", f"has {K_TINY} examples", "fix the spec's shape or the examples")


def test_store_arrays_named_otherwise_than_the_experiment(tmp_path, capsys, tiny_yaml):
    init_store(tmp_path / "store", Spec.for_experiment(10, P_TINY, K_TINY, y_name="val_margins"))
    cli_error(build_argv(tmp_path / "store", tiny_yaml), capsys, tmp_path,
              "writes array 'margins'", "'val_margins'", "arrays.y_name")


def test_store_built_by_another_experiment(tmp_path, capsys, tiny_store, tiny_experiment):
    other = write_yaml(tmp_path / "other.yaml", tiny_experiment.replace(mask_seed=7).to_dict())
    cli_error(build_argv(tiny_store.path, other), capsys, tmp_path, "mask_seed=", "use the store's value or a new store")


# ------------------------------------------------------------ 4. experiments


@pytest.mark.parametrize("factory, fragments", [
    ("no_such_module_xyz:make_model", ["cannot import module 'no_such_module_xyz'", "PYTHONPATH"]),
    ("coar_dask.zoo.digits:no_such_function", ["has no attribute 'no_such_function'"]),
    ("coar_dask.zoo.digits.load_model", ["import path 'package.module:function'"]),
])
def test_model_factory_that_cannot_be_imported(tmp_path, capsys, tiny_experiment, factory, fragments):
    init_store(tmp_path / "store", GOOD_SPEC)
    data = tiny_experiment.to_dict()
    data["model"]["factory"] = factory
    exp = write_yaml(tmp_path / "exp.yaml", data)
    cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path, factory.split(":")[0], *fragments)


def test_model_factory_that_returns_no_module(tmp_path, capsys, tiny_experiment):
    init_store(tmp_path / "store", GOOD_SPEC)
    data = tiny_experiment.to_dict()
    data["model"]["factory"] = "conftest:tiny_examples"
    exp = write_yaml(tmp_path / "exp.yaml", data)
    cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path, "returned tuple, not an nn.Module")


def test_examples_of_the_wrong_shape_for_the_model(tmp_path, capsys, tiny_experiment):
    init_store(tmp_path / "store", GOOD_SPEC)
    data = tiny_experiment.to_dict()
    data["examples"]["factory"] = "test_bad_input:wrong_shape_examples"
    exp = write_yaml(tmp_path / "exp.yaml", data)
    cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path,
              "cannot run on the examples", "(12, 3, 6, 6)", "Check that the examples factory returns inputs")


@pytest.mark.parametrize("alpha, expected", [(0, "strictly between 0 and 1"), (1, "strictly between 0 and 1"),
                                             (1.5, "strictly between 0 and 1"), (-0.1, "strictly between 0 and 1"),
                                             ("lots", "a number in (0, 1)")])
def test_alpha_outside_zero_one(tmp_path, capsys, tiny_experiment, alpha, expected):
    init_store(tmp_path / "store", GOOD_SPEC)
    data = tiny_experiment.to_dict()
    data["alpha"] = alpha
    exp = write_yaml(tmp_path / "exp.yaml", data)
    cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path, "alpha", expected, repr(alpha))
    with pytest.raises(ExperimentError):
        Experiment.from_dict(data)


@pytest.mark.parametrize("alpha", ["0", "1.0"])
def test_alpha_outside_zero_one_at_init(tmp_path, capsys, alpha):
    spec = write_spec(tmp_path / "spec.json", GOOD_SPEC)
    cli_error(["init", "--spec", spec, "--store", tmp_path / "store", "--alpha", alpha], capsys, tmp_path,
              "alpha must lie strictly between 0 and 1")


@pytest.mark.parametrize("where, key, valid", [
    ("top", "alhpa", "'alpha'"),
    ("run", "batchsize", "'batch_size'"),
    ("components", "kind", "'kinds'"),
    ("model", "kwarg", "'kwargs'"),
])
def test_yaml_with_unknown_keys_lists_the_valid_ones(tmp_path, capsys, tiny_experiment, where, key, valid):
    init_store(tmp_path / "store", GOOD_SPEC)
    data = tiny_experiment.to_dict()
    (data if where == "top" else data[where])[key] = 1
    exp = write_yaml(tmp_path / "exp.yaml", data)
    err = cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path,
                    f"unknown keys ['{key}']", "valid keys are", valid)
    if where != "top":
        assert where in err
    with pytest.raises(ConfigError):
        load_experiment(exp)


def test_yaml_that_is_not_yaml(tmp_path, capsys):
    init_store(tmp_path / "store", GOOD_SPEC)
    exp = write_yaml(tmp_path / "exp.yaml", "model: {factory: [unclosed\nalpha: 0.1\n")
    cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path, "exp.yaml", "is not valid YAML")


def test_yaml_file_that_does_not_exist(tmp_path, capsys):
    init_store(tmp_path / "store", GOOD_SPEC)
    cli_error(build_argv(tmp_path / "store", tmp_path / "nope.yaml"), capsys, tmp_path, "nope.yaml", "does not exist")


def test_yaml_cannot_run_code(tmp_path, capsys):
    """``yaml.safe_load``: a python tag is refused, and what it names never runs."""
    init_store(tmp_path / "store", GOOD_SPEC)
    marker = tmp_path / "pwned"
    exp = write_yaml(tmp_path / "exp.yaml", f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    cli_error(build_argv(tmp_path / "store", exp), capsys, tmp_path, "is not valid YAML")
    assert not marker.exists()


# ---------------------------------------------------------------- 5. fitting


def test_regression_asking_for_more_rows_than_completed(tmp_path, capsys, tiny_store):
    cli_error(["fit", "--store", tiny_store.path, "--out", tmp_path / "attrs.pt", "--num-train", "8", "--num-val", "5"],
              capsys, tmp_path, "8 train + 5 validation rows", "only 10 completed rows",
              "build more rows or lower num_train/num_val")
    with pytest.raises(RegressionError):
        fit(tiny_store.path, num_train=11)


def test_regression_on_a_store_with_no_completed_rows(tmp_path, capsys):
    init_store(tmp_path / "store", GOOD_SPEC)
    cli_error(["fit", "--store", tmp_path / "store", "--out", tmp_path / "attrs.pt"], capsys, tmp_path,
              "only 0 completed rows")


@pytest.fixture
def ffcv():
    try:
        from coar_dask.formats.beton import import_ffcv

        return import_ffcv()
    except CoarError as exc:
        pytest.skip(str(exc))


@pytest.mark.ffcv
def test_beton_missing_the_expected_fields(tmp_path, capsys, ffcv):
    from coar_dask.formats.beton import BetonError, BetonRows
    from coar_dask.cli.run_regression import main as run_regression

    path = tmp_path / "other.beton"
    writer = ffcv.DatasetWriter(str(path), {"x": ffcv.NDArrayField(dtype=np.dtype("float32"), shape=(2,)),
                                            "label": ffcv.IntField()}, num_workers=1)

    class Rows:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.zeros(2, np.float32), i

    writer.from_indexed_dataset(Rows())
    with pytest.raises(BetonError, match="no array field 'mask'"):
        BetonRows(path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = run_regression(["--data.data_path", str(path), "--cfg.out_dir", str(tmp_path / "out"),
                           "--data.num_train", "3", "--data.num_val", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no array field 'mask'" in err and "'x'" in err and "'label'" in err and "export_beton()" in err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------- 6. attributions files


@pytest.fixture
def tiny_attributions(tmp_path, tiny_store):
    path = tmp_path / "attrs.pt"
    fit(tiny_store.path, ridge=1.0).save(path)
    return path


def test_attributions_from_a_store_of_other_widths(tmp_path, capsys, tiny_attributions, tiny_experiment):
    narrow = tiny_experiment.replace(kinds=("conv2d",))
    other = eval_store_for(tmp_path / "other", narrow, 10, 10, K_TINY, rows_per_chunk=5)
    run_build(other, narrow)
    cli_error(["evaluate", "--attributions", tiny_attributions, "--store", other.path], capsys, tmp_path,
              f"{P_TINY} components x {K_TINY} examples", f"has 10 components x {K_TINY} outputs",
              "come from another experiment")


def test_attributions_from_a_store_of_another_experiment_with_the_same_widths(tmp_path, capsys, tiny_attributions,
                                                                            tiny_experiment):
    other_exp = tiny_experiment.replace(examples_kwargs={"n": K_TINY}, mask_seed=1)
    other = eval_store_for(tmp_path / "other", other_exp, 10, P_TINY, K_TINY, rows_per_chunk=5)
    run_build(other, other_exp)
    cli_error(["evaluate", "--attributions", tiny_attributions, "--store", other.path], capsys, tmp_path,
              "come from another experiment", "Evaluate on a store built with the same model")


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _not_attributions(path: Path, content: str, marker: Path) -> Path:
    if content == "pickle":
        path.write_bytes(pickle.dumps({"weight": _Exploit(str(marker))}, protocol=2))
    elif content == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    else:
        torch.save({"w": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("content", ["pickle", "garbage", "no-weight"])
def test_attributions_file_that_is_not_one_is_refused_safely(tmp_path, capsys, tiny_store, content):
    """``torch.load(weights_only=True)``: a pickle that would run code is refused unrun."""
    marker = tmp_path / "pwned"
    path = _not_attributions(tmp_path / "attrs.pt", content, marker)
    # One line, without torch's unsafe advice: checked separately below.
    cli_error(["evaluate", "--attributions", path, "--store", tiny_store.path], capsys, tmp_path,
              "attrs.pt", "is not an attributions file" if content != "no-weight" else "has no 'weight'",
              one_line=False)
    assert not marker.exists()
    with pytest.raises(RegressionError):
        Attributions.load(path)


@pytest.mark.parametrize("content", ["pickle", "garbage"])
def test_attributions_file_refusal_is_one_line_without_unsafe_advice(tmp_path, capsys, tiny_store, content):
    path = _not_attributions(tmp_path / "attrs.pt", content, tmp_path / "pwned")
    err = cli_error(["evaluate", "--attributions", path, "--store", tiny_store.path], capsys, tmp_path, "attrs.pt")
    assert "weights_only` set to `False`" not in err


def test_attributions_file_that_does_not_exist(tmp_path, capsys, tiny_store):
    cli_error(["evaluate", "--attributions", tmp_path / "nope.pt", "--store", tiny_store.path], capsys, tmp_path,
              "nope.pt", "does not exist")


# ------------------------------------------------------------ 7. the errors


def test_every_user_error_is_a_coar_error_and_a_standard_one():
    for cls, std in [(SpecError, ValueError), (StoreError, ValueError), (StoreMismatchError, ValueError),
                     (ExperimentError, ValueError), (ConfigError, ValueError), (RegressionError, ValueError)]:
        assert issubclass(cls, CoarError) and issubclass(cls, std)


# ------------------------------------------- issue 22: hostile attributions files, records and pipes
import base64  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

from coar_dask.core.masks import sample_masks  # noqa: E402

_P, _K, _N = 8, 5, 40


def _rows_store(path: Path, extra_meta=None):
    """A store of 40 rows (8 masks, 5 outputs linear in them), written directly: no model."""
    spec = {"num_models": _N, "schema": {"masks": {"dtype": "bool_", "shape": [_P]},
                                         "margins": {"dtype": "float32", "shape": [_K]}}}
    store = init_store(path, spec, rows_per_chunk=20, mask_seed=0, alpha=0.2, extra_meta=extra_meta)
    weights = np.random.default_rng(3).normal(size=(_P, _K))
    for block in store.blocks():
        masks = sample_masks(0, block.rows, _P, 0.2)
        store.write_block(block.index, {"masks": masks, "margins": masks @ weights})
    return store


def _tampered(tmp_path: Path, store, change) -> Path:
    """Attributions fitted on ``store``, saved after ``change(data)`` edited their saved dict."""
    good = fit(store, ridge=1e-6).save(tmp_path / "good.pt")
    data = torch.load(good, weights_only=True)
    change(data)
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    good.unlink()
    return path


def _bomb(data):
    record = data["metadata"]["fitted_on"]["stores"][0]
    record["rows"] = base64.b64encode(zlib.compress(b"\0" * 200_000_000, 9)).decode()  # 200 MB from ~200 KB


@pytest.mark.parametrize("change, fragment", [
    (_bomb, "not a compressed bitmap"),
    (lambda d: d["metadata"]["fitted_on"]["stores"][0].update(num_rows=10**13), "num_rows"),
    (lambda d: d["metadata"]["fitted_on"]["stores"][0].update(num_rows=1e13), "num_rows"),
    (lambda d: d["metadata"].update(fitted_on="abc"), "fitted_on"),
], ids=["zlib-bomb", "num-rows-1e13", "num-rows-float", "fitted-on-string"])
def test_a_tampered_fitted_rows_record_is_one_line(tmp_path, capsys, change, fragment):
    store = _rows_store(tmp_path / "s")
    path = _tampered(tmp_path, store, change)
    t0 = time.perf_counter()
    with pytest.raises(RegressionError, match=fragment):
        Attributions.load(path)
    cli_error(["evaluate", "--attributions", path, "--store", store.path], capsys, tmp_path, fragment)
    assert time.perf_counter() - t0 < 20


def test_a_target_slice_past_the_stores_outputs_is_one_line(tmp_path, capsys):
    store = _rows_store(tmp_path / "s")
    path = _tampered(tmp_path, store, lambda d: d["metadata"].update(target_slice=[3, 3 + _K]))
    cli_error(["evaluate", "--attributions", path, "--store", store.path], capsys, tmp_path,
              "outputs 3 to 7", "another experiment")


@pytest.mark.parametrize("layers", [
    [{"module": "conv", "units": 3e7}],
    [{"module": "conv", "units": 30_000_000}],
    [{"module": "conv"}],
    "abc",
    [{"module": "conv", "units": -3}, {"module": "fc", "units": 11}],
])
def test_top_with_a_malformed_components_record_lists_indices(tmp_path, capsys, layers):
    store = _rows_store(tmp_path / "s")
    path = _tampered(tmp_path, store, lambda d: d["metadata"].update(components={"layers": layers, "total": _P}))
    attrs = Attributions.load(path)
    assert attrs.component_names is None
    t0 = time.perf_counter()
    capsys.readouterr()
    assert main(["top", "--attributions", str(path), "--example", "0", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert time.perf_counter() - t0 < 5
    assert "conv[" not in out and len(out.splitlines()) >= 2


@pytest.mark.parametrize("model", ["os:system", ["a", "b"], None, 5])
def test_status_shows_a_malformed_record_as_it_is(tmp_path, capsys, model):
    record = {"examples": {"factory": "coar_dask.zoo.digits:heldout_examples"}, "output": "margin"}
    if model is not None:
        record["model"] = model
    store = _rows_store(tmp_path / "s", extra_meta={"experiment": record})
    capsys.readouterr()
    assert main(["status", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "model:" in out and ("malformed" in out or "missing" in out)


def test_status_into_a_closed_pipe_is_quiet(tmp_path, coar_dask_cli):
    store = _rows_store(tmp_path / "s")
    cmd = " ".join([*coar_dask_cli, "status", str(store.path), "|", "head", "-1"])
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("store:") and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == "", proc.stderr


def test_init_refuses_a_negative_mask_seed(tmp_path, capsys):
    spec = {"num_models": 10, "schema": {"masks": {"dtype": "bool_", "shape": [4]}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cli_error(["init", "--store", tmp_path / "s", "--spec", tmp_path / "spec.json", "--mask-seed", "-1"],
              capsys, tmp_path, "--mask-seed", "non-negative")


def test_sigterm_during_a_build_says_completed_blocks_are_kept(tmp_path, coar_dask_cli):
    import signal

    from coar_dask.core.store import open_store

    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    store = tmp_path / "s"
    init = subprocess.run([*coar_dask_cli, "init", "--experiment", str(config), "--store", str(store), "--rows",
                           "2000", "--rows-per-chunk", "20"], capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    proc = subprocess.Popen([*coar_dask_cli, "build", str(store), "--cluster", "none"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not open_store(store, read_only=True).completed_blocks().any():
            assert proc.poll() is None and time.monotonic() < deadline, "no block completed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "completed blocks are kept" in err and "Traceback" not in err, err
    assert 0 < int(open_store(store, read_only=True).completed_blocks().sum()) < 100


@pytest.mark.parametrize("components", ["abc", {"layers": "abc", "total": "abc"}, ["x"],
                                        {"layers": [{"module": "c", "units": 3e7}], "total": 3e7}])
def test_fit_on_a_store_with_a_malformed_components_record_names_nothing(tmp_path, capsys, components):
    record = load_experiment(Path(__file__).parents[1] / "configs" / "digits.yaml").to_dict()
    store = _rows_store(tmp_path / "s", extra_meta={"experiment": record, "components": components})
    capsys.readouterr()
    assert main(["fit", str(store.path), "--out", str(tmp_path / "a.pt")]) == 0, capsys.readouterr()
    assert Attributions.load(tmp_path / "a.pt").component_names is None
    assert main(["top", "--attributions", str(tmp_path / "a.pt"), "--example", "0", "-k", "1"]) == 0
