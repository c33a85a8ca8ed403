"""The seed's three commands with `coar_dask.` in front, and its regression YAML."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coar_dask.cli import initialize_store
from coar_dask.cli import run_regression
from coar_dask.cli import write_dataset
from coar_dask.errors import ConfigError
from coar_dask.compat.seed import SeedConfigWarning, load_regression_config
from coar_dask.core.store import init_store, open_store

REPO = Path(__file__).resolve().parents[1]

# See tests/test_beton.py: numba's harmless finalizer KeyError when FFCV loaders are freed.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_loaders():
    yield
    gc.collect()

SEED_YAML = """\
data:
  data_path: ~
  num_train: 90
  num_val: 10
cfg:
  out_dir: ~
  num_workers: 8
  k: 1
  batch_size: 10
  lr: 1e-3
  eps: 1e-4
  true_random: true
  manual_max_lambda: 0
early_stopping:
  check_every: 3
  eps: 1e-10
"""


@pytest.fixture
def seed_yaml(tmp_path):
    path = tmp_path / "regression_config_test.yaml"
    path.write_text(SEED_YAML)
    return path


# --------------------------------------------------------------------------
# The regression YAML
# --------------------------------------------------------------------------
def test_seed_yaml_is_typed_and_unused_keys_are_reported(seed_yaml):
    with pytest.warns(SeedConfigWarning) as record:
        cfg = load_regression_config(seed_yaml, {"data.data_path": "x.beton", "cfg.out_dir": "out"})
    assert (cfg.num_train, cfg.num_val, cfg.k, cfg.batch_size) == (90, 10, 1, 10)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.early_stopping_eps == 1e-10 and cfg.manual_max_lambda == 0.0
    assert (cfg.data_path, cfg.out_dir, cfg.target_slice) == ("x.beton", "out", (0, -1))
    assert cfg.unknown == ("cfg.true_random",)
    assert set(cfg.unused) == {"cfg.lr", "cfg.eps", "early_stopping.check_every", "early_stopping.eps"}
    message = str(record[0].message)
    for key in ("cfg.true_random", "cfg.lr", "early_stopping.eps", "cfg.eps"):
        assert key in message


def test_overrides_win_and_later_files_win(seed_yaml, tmp_path):
    second = tmp_path / "more.yaml"
    second.write_text("data:\n  num_train: 50\n  target_start_ind: 2\n")
    cfg = load_regression_config([seed_yaml, second], {"data.num_val": "5", "cfg.k": None}, warn=False)
    assert (cfg.num_train, cfg.num_val, cfg.k, cfg.target_start_ind) == (50, 5, 1, 2)


@pytest.mark.parametrize(
    "override, match",
    [({"data.num_train": "ninety"}, "data.num_train"), ({"cfg.lr": True}, "cfg.lr"),
     ({"data.num_train": 2.5}, "data.num_train"), ({"data.target_end_ind": 0}, "target_end_ind"),
     ({"cfg.batch_size": 0}, "cfg.batch_size")],
)
def test_bad_values_name_the_key(seed_yaml, override, match):
    with pytest.raises(ConfigError, match=match):
        load_regression_config(seed_yaml, override, warn=False)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_regression_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="sections"):
        load_regression_config(bad)
    cfg = load_regression_config([], {"data.num_train": 3}, warn=False)
    with pytest.raises(ConfigError, match="--cfg.out_dir"):
        cfg.require("data.data_path", "cfg.out_dir")


def test_solver_follows_the_seed_settings(seed_yaml, tmp_path):
    base = {"data.data_path": "x", "cfg.out_dir": str(tmp_path)}
    cfg = load_regression_config(seed_yaml, base, warn=False)
    assert run_regression.solver_for(cfg) == ("lstsq", {})
    name, options = run_regression.solver_for(cfg, "saga")
    assert name == "saga" and options == {"lr": 1e-3, "k": 1, "eps": 1e-4, "max_lambda": 0.0, "batch_size": 10,
                                          "early_stop_every": 3, "early_stop_eps": 1e-10}
    path = load_regression_config(seed_yaml, {**base, "cfg.k": 20, "cfg.manual_max_lambda": -1}, warn=False)
    name, options = run_regression.solver_for(path)
    assert name == "saga" and options["k"] == 20 and options["max_lambda"] == "auto"
    # With SAGA running, its settings are used: only the keys nobody reads are reported.
    assert path.unused == () and path.unknown == ("cfg.true_random",)
    with pytest.raises(ConfigError, match="--solver saga"):
        run_regression.solver_for(path, "lstsq")
    with pytest.raises(ConfigError, match="use_bias: 1"):
        run_regression.solver_for(load_regression_config(seed_yaml, {**base, "cfg.use_bias": 0}, warn=False))


# --------------------------------------------------------------------------
# Commands on a small store (no FFCV needed for init and store regression)
# --------------------------------------------------------------------------
P, K, N = 16, 4, 100


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"num_models": %d, "schema": {"masks": {"dtype": "bool_", "shape": [%d]}, '
                    '"val_margins": {"dtype": "float16", "shape": [%d]}}}' % (N, P, K))
    return path


def _fill(store_path, n_done=N):
    store = open_store(store_path)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((P, K))
    for b in store.blocks():
        if b.start >= n_done:
            break
        m = rng.random((len(b), P)) < 0.8
        store.write_block(b.index, {"masks": m, "val_margins": m @ w + 0.05 * rng.standard_normal((len(b), K))})
    return store


def test_initialize_store_command(tmp_path, spec_file, capsys):
    store_dir = tmp_path / "store"
    argv = ["--logging.logdir", str(store_dir), "--logging.spec", str(spec_file)]
    assert initialize_store.main(argv) == 0
    assert open_store(store_dir).spec.num_models == N
    assert initialize_store.main(argv) == 0  # again: the same store, unchanged
    other = tmp_path / "other.json"
    other.write_text(spec_file.read_text().replace(str(N), "7", 1))
    assert initialize_store.main(["--logging.logdir", str(store_dir), "--logging.spec", str(other)]) == 2
    assert "another spec" in capsys.readouterr().err
    assert initialize_store.main(["--logging.spec", str(spec_file)]) == 2
    assert "--logging.logdir" in capsys.readouterr().err


def test_run_regression_on_a_store_equals_the_python_api(tmp_path, spec_file, seed_yaml):
    from coar_dask.fit.fit import Attributions, fit

    init_store(tmp_path / "store", spec_file, rows_per_chunk=30)
    _fill(tmp_path / "store")
    out = tmp_path / "coar_attributions.pt"
    with pytest.warns(SeedConfigWarning):
        code = run_regression.main(["--config", str(seed_yaml), "--data.data_path", str(tmp_path / "store"),
                                    "--cfg.out_dir", str(out), "--data.target_start_ind", "1"])
    assert code == 0
    got = Attributions.load(out / "datamodels.pt")
    api = fit(tmp_path / "store", num_train=N, num_val=0, target_slice=(1, K))
    np.testing.assert_allclose(got.weight, api.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.bias, api.bias, rtol=1e-5, atol=1e-6)
    assert got.metadata["n_train"] == 90 and got.metadata["n_val"] == 10 and got.metadata["n_fit"] == N
    assert "cfg.true_random" in got.metadata["seed_config_unknown"]
    # The seed refuses to overwrite; so do we, unless asked.
    with pytest.warns(SeedConfigWarning):
        assert run_regression.main(["-C", str(seed_yaml), "--data.data_path", str(tmp_path / "store"),
                                    "--cfg.out_dir", str(out)]) == 2


def test_run_regression_with_the_seeds_saga(tmp_path, spec_file, seed_yaml):
    """--solver saga runs fast_l1's algorithm with the seed's settings; at k: 1 and
    lambda 0 it approximates the exact fit."""
    from coar_dask.fit.fit import Attributions

    init_store(tmp_path / "store", spec_file, rows_per_chunk=30)
    store = _fill(tmp_path / "store")
    argv = ["--config", str(seed_yaml), "--data.data_path", str(tmp_path / "store"), "--cfg.lr", "0.05",
            "--cfg.out_dir"]
    with pytest.warns(SeedConfigWarning):
        assert run_regression.main(argv + [str(tmp_path / "exact")]) == 0
    with pytest.warns(SeedConfigWarning, match="cfg.true_random") as record:
        assert run_regression.main(argv + [str(tmp_path / "saga"), "--solver", "saga"]) == 0
    assert "cfg.lr" not in str(record[0].message)  # SAGA uses it
    exact = Attributions.load(tmp_path / "exact" / "datamodels.pt")
    saga = Attributions.load(tmp_path / "saga" / "datamodels.pt")
    assert saga.metadata["solver"] == "saga" and saga.metadata["n_fit"] == N
    masks = store.array("masks")[:]
    np.testing.assert_allclose(saga.predict(masks), exact.predict(masks), atol=0.1)


def test_run_regression_needs_enough_rows(tmp_path, spec_file, seed_yaml, capsys):
    init_store(tmp_path / "store", spec_file, rows_per_chunk=30)
    _fill(tmp_path / "store", n_done=60)
    with pytest.warns(SeedConfigWarning):
        code = run_regression.main(["--config", str(seed_yaml), "--data.data_path", str(tmp_path / "store"),
                                    "--cfg.out_dir", str(tmp_path / "o")])
    assert code == 2
    assert "only 60 completed rows" in capsys.readouterr().err


def test_subcommand_parsers_register(tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    initialize_store.add_initialize_store_parser(sub)
    write_dataset.add_export_beton_parser(sub)
    run_regression.add_run_regression_parser(sub)
    args = parser.parse_args(["export-beton", "--store", "s", "--out", "o.beton", "--cfg.ignore_completed",
                              "--cfg.y_slice", "3"])
    assert (args.data_dir, args.out_path, args.ignore_completed, args.y_slice) == ("s", "o.beton", True, 3)
    assert args.func is write_dataset.run
    args = parser.parse_args(["run-regression", "--config", "c.yaml", "--data.num_train", "5"])
    assert args.config_files == ["c.yaml"] and getattr(args, "data.num_train") == "5"
    args = parser.parse_args(["initialize-store", "--store", "s", "--spec", "x.json"])
    assert (args.logdir, args.spec) == ("s", "x.json")


# --------------------------------------------------------------------------
# With FFCV
# --------------------------------------------------------------------------
@pytest.mark.ffcv
def test_write_dataset_command(tmp_path, spec_file, capsys, caplog):
    pytest.importorskip("ffcv")
    from coar_dask.formats.beton import BetonRows

    init_store(tmp_path / "store", spec_file, rows_per_chunk=30)
    store = _fill(tmp_path / "store", n_done=60)
    out = tmp_path / "store" / "component_datasets.beton"
    base = ["--cfg.data_dir", str(tmp_path / "store"), "--cfg.out_path", str(out), "--cfg.x_name", "masks",
            "--cfg.y_name", "val_margins"]
    assert write_dataset.main(base) == 0
    assert "wrote 60 rows" in capsys.readouterr().out
    assert BetonRows(out).n_rows == 60
    assert write_dataset.main(base + ["--cfg.ignore_completed", "--cfg.y_slice", "2"]) == 2  # it exists
    assert "--overwrite" in capsys.readouterr().err and BetonRows(out).n_rows == 60
    assert write_dataset.main(base + ["--cfg.ignore_completed", "--cfg.y_slice", "2", "--overwrite"]) == 0
    assert any(f"{N - 60} of {N} rows written were never completed" in r.getMessage() for r in caplog.records)
    src = BetonRows(out)
    assert (src.n_rows, src.n_targets) == (N, 1)
    ys = np.concatenate([y for _, y in src.blocks()])
    np.testing.assert_array_equal(ys[:, 0], store.array("val_margins")[:, 2].astype(np.float32))
    assert write_dataset.main(["--cfg.data_dir", str(tmp_path / "store")]) == 2
    assert "--cfg.out_path" in capsys.readouterr().err


ACCEPTANCE_SCRIPT = """\
#!/usr/bin/env bash
# The seed README's commands, with `coar_dask.` in front of the module names.
set -euo pipefail
STORE_DIR="$1"
python -m coar_dask.initialize_store --logging.logdir $STORE_DIR --logging.spec spec.json
python -m coar_dask.cli build --store $STORE_DIR --experiment "$REPO/configs/digits.yaml" --cluster none
python -m coar_dask.write_dataset --cfg.data_dir $STORE_DIR --cfg.out_path $STORE_DIR/component_datasets.beton \\
    --cfg.x_name masks --cfg.y_name margins --cfg.ignore_completed
python -m coar_dask.run_regression --config regression_config.yaml \\
    --data.data_path $STORE_DIR/component_datasets.beton --cfg.out_dir $STORE_DIR/coar_attributions.pt
"""


@pytest.mark.ffcv
@pytest.mark.slow
def test_seed_commands_from_a_shell_script_equal_the_python_api(tmp_path, digits_experiment):
    """Acceptance: init -> build -> write_dataset -> run_regression from a shell
    script on a digits store; the attributions equal the Python API's fit."""
    pytest.importorskip("ffcv")
    from coar_dask.formats.beton import BetonRows
    from coar_dask.fit.fit import Attributions, fit

    rows = 120  # > 81 parameters per fit; small, since the build runs in one process
    (tmp_path / "spec.json").write_text(
        '{"num_models": %d, "schema": {"masks": {"dtype": "bool_", "shape": [80]}, '
        '"margins": {"dtype": "float16", "shape": [360]}}}' % rows)
    (tmp_path / "regression_config.yaml").write_text(
        SEED_YAML.replace("num_train: 90", "num_train: 100").replace("num_val: 10", "num_val: 20"))
    script = tmp_path / "run.sh"
    script.write_text(ACCEPTANCE_SCRIPT)
    script.chmod(0o755)
    env = dict(os.environ, REPO=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(["bash", str(script), "store"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SeedConfigWarning" in done.stderr and "cfg.true_random" in done.stderr

    store = open_store(tmp_path / "store")
    assert store.completed_rows().all()
    beton = BetonRows(tmp_path / "store" / "component_datasets.beton")
    idx, x, y = (np.concatenate(a) for a in zip(*beton.indexed_blocks()))
    np.testing.assert_array_equal(idx, np.arange(rows))
    np.testing.assert_array_equal(x, store.array("masks")[:])
    np.testing.assert_array_equal(y, store.array("margins")[:].astype(np.float32))

    cli = Attributions.load(tmp_path / "store" / "coar_attributions.pt" / "datamodels.pt")
    api = fit(store, num_train=rows, num_val=0)
    assert cli.weight.shape == (80, 360)
    np.testing.assert_allclose(cli.weight, api.weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cli.bias, api.bias, rtol=1e-5, atol=1e-5)


def test_run_regression_refuses_when_every_target_is_constant(tmp_path, spec_file, seed_yaml, capsys):
    """Issue 24 item 5: initialize_store then write_dataset --cfg.ignore_completed (no build between) gave a
    .beton of all-zero outputs, and run_regression wrote all-zero attributions with exit 0."""
    store = init_store(tmp_path / "store", spec_file, rows_per_chunk=30)
    rng = np.random.default_rng(0)
    for b in store.blocks():
        store.write_block(b.index, {"masks": rng.random((len(b), P)) < 0.8, "val_margins": np.zeros((len(b), K))})
    with pytest.warns(SeedConfigWarning):
        code = run_regression.main(["--config", str(seed_yaml), "--data.data_path", str(tmp_path / "store"),
                                    "--cfg.out_dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"all {K} targets are constant" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "datamodels.pt").exists()
