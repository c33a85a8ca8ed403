"""The seed's settings in one place: solver choice, options derived from the options dataclasses,
and the seed's row rule wherever its keys are accepted."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coar_dask.cli.solver_flags import add_fit_solver_arguments, solver_flags, solver_options_from_args
from coar_dask.compat.seed import SeedConfigWarning, choose_solver, load_regression_config, seed_options, solver_for, solver_kind
from coar_dask.core.store import init_store
from coar_dask.errors import ConfigError, RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.fit import fit
from coar_dask.fit.rows import seed_split, select_rows, split_rows
from coar_dask.solvers.base import option_infos
from coar_dask.solvers.saga import SagaOptions

P, K, N = 12, 3, 120


# ------------------------------------------------------------------ solver choice
def test_an_absent_k_counts_as_one_everywhere():
    cfg = load_regression_config([], {"cfg.manual_max_lambda": 0}, warn=False)
    assert cfg.k is None
    assert solver_kind(cfg.k, cfg.manual_max_lambda) == "lstsq"
    assert solver_for(cfg) == ("lstsq", {})
    # SAGA forced: k is left to SagaOptions' default, which is the same 1
    name, options = solver_for(cfg, "saga")
    assert name == "saga" and "k" not in options and SagaOptions(**options).k == 1
    # the unused keys agree with the solver that runs
    lr = load_regression_config([], {"cfg.manual_max_lambda": 0, "cfg.lr": 0.1}, warn=False)
    assert "cfg.lr" in lr.unused


def test_choose_solver_is_the_one_rule():
    assert choose_solver(1, 0.0) == choose_solver(None, 0.0) == "lstsq"
    assert choose_solver(2, 0.0) == choose_solver(1, -1.0) == choose_solver(None, 0.5) == "saga"
    assert choose_solver(20, -1.0, "fast_l1") == "fast_l1"
    with pytest.raises(ConfigError, match="choose one of"):
        choose_solver(1, 0.0, "sgd")
    cfg = load_regression_config([], {"cfg.k": 3, "cfg.manual_max_lambda": 0}, warn=False)
    with pytest.raises(ConfigError, match="--solver saga"):
        solver_for(cfg, "lstsq")


def test_seed_keys_come_from_the_options_fields():
    keyed = {i.name: i.seed_key for i in option_infos(SagaOptions) if i.seed_key}
    assert keyed == {"lr": "cfg.lr", "k": "cfg.k", "eps": "cfg.eps", "max_lambda": "cfg.manual_max_lambda",
                     "batch_size": "cfg.batch_size", "early_stop_every": "early_stopping.check_every",
                     "early_stop_eps": "early_stopping.eps"}
    cfg = load_regression_config([], {"cfg.k": 4, "cfg.manual_max_lambda": -1, "cfg.lr": 0.2}, warn=False)
    options = seed_options(cfg, "saga")
    assert options["max_lambda"] == "auto" and options["k"] == 4 and options["lr"] == 0.2
    SagaOptions(**options)  # every mapped value is a valid option


def test_every_fit_flag_has_one_home():
    flags = {sf.info.flag: sf.solvers for sf in solver_flags()}
    assert flags == {
        "--ridge": ("lstsq",), "--ridge-grid": ("lstsq",), "--refit": ("lstsq",), "--method": ("lstsq",),
        "--prior": ("lstsq",), "--lr": ("saga", "fast_l1"), "--k": ("saga", "fast_l1"), "--eps": ("saga", "fast_l1"),
        "--max-lambda": ("saga", "fast_l1"), "--batch-size": ("saga", "fast_l1"),
        "--early-stop-every": ("saga", "fast_l1"), "--early-stop-eps": ("saga", "fast_l1"),
        "--max-epochs": ("saga", "fast_l1"), "--no-refit": ("saga",),
    }
    p = argparse.ArgumentParser()
    add_fit_solver_arguments(p)
    defaults = vars(p.parse_args([]))
    assert all(defaults[sf.info.name] is None for sf in solver_flags())
    with pytest.raises(RegressionError, match="--refit/--no-refit"):
        solver_options_from_args(p.parse_args(["--solver", "fast_l1", "--no-refit"]))


# ------------------------------------------------------------------ the row rules
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_seed_split_takes_the_first_rows_in_order(n, data):
    num_val = data.draw(st.integers(0, n - 1))
    num_train = data.draw(st.one_of(st.none(), st.integers(1, n - num_val)))
    train, val = seed_split(n, num_train, num_val)
    expect_train = n - num_val if num_train is None else num_train
    assert train.tolist() == list(range(expect_train))
    assert val.tolist() == list(range(expect_train, expect_train + num_val))
    rows = np.sort(np.random.default_rng(n).choice(10 * n, size=n, replace=False))
    t, v = select_rows(rows, num_train, num_val, seed=data.draw(st.integers(0, 9)), rule="seed")
    assert np.array_equal(t, rows[train]) and np.array_equal(v, rows[val])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 200), data=st.data())
def test_split_rules_refuse_too_many_rows(n, data):
    extra = data.draw(st.integers(1, 50))
    with pytest.raises(RegressionError, match="build more rows|has only|only"):
        seed_split(n, n, extra)
    with pytest.raises(RegressionError, match="build more rows"):
        split_rows(np.arange(n), n, extra)


def test_seed_split_without_keys_takes_every_row():
    train, val = seed_split(7, None, None)
    assert train.tolist() == list(range(7)) and val.size == 0
    with pytest.raises(ConfigError, match="positive"):
        seed_split(5, None, 5)


@pytest.fixture
def small_store(tmp_path):
    rng = np.random.default_rng(3)
    spec = {"num_models": N, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                        "margins": {"dtype": "float32", "shape": [K]}}}
    store = init_store(tmp_path / "store", spec, rows_per_chunk=20, mask_seed=3, alpha=0.2)
    w = rng.normal(size=(P, K))
    for block in store.blocks():
        m = rng.random((len(block), P)) >= 0.2
        # noise large enough that different rows give visibly different fits
        store.write_block(block.index, {"masks": m, "margins": m @ w + 0.5 * rng.normal(size=(len(block), K))})
    return store


def test_fit_and_run_regression_pick_the_same_rows_for_the_seeds_keys(small_store, tmp_path):
    from coar_dask.cli.main import main as coar_dask_main
    from coar_dask.cli.run_regression import main as run_regression_main

    keys = ["--data.num_train", "50", "--data.num_val", "0", "--data.seed", "7"]
    assert coar_dask_main(["fit", "--store", str(small_store.path), "--out", str(tmp_path / "fit.pt"), *keys]) == 0
    with pytest.warns(SeedConfigWarning, match="data.seed"):  # the seed does not use it either
        assert run_regression_main(["--data.data_path", str(small_store.path), "--cfg.out_dir",
                                    str(tmp_path / "rr"), "--cfg.k", "1", "--cfg.manual_max_lambda", "0", *keys]) == 0
    via_fit = Attributions.load(tmp_path / "fit.pt")
    via_seed = Attributions.load(tmp_path / "rr" / "datamodels.pt")
    assert via_fit.metadata["row_rule"] == "seed"
    np.testing.assert_allclose(via_fit.weight, via_seed.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(via_fit.bias, via_seed.bias, rtol=1e-5, atol=1e-6)
    # the first 50 rows, not a shuffle: the API with the seed's rule agrees, the default rule does not
    first = fit(small_store, num_train=50, row_rule="seed")
    np.testing.assert_allclose(first.weight, via_fit.weight, rtol=1e-5, atol=1e-6)
    shuffled = fit(small_store, num_train=50, split_seed=7)
    assert not np.allclose(shuffled.weight, via_fit.weight, atol=1e-3)


def test_plain_flags_keep_the_seeded_shuffle(small_store, tmp_path):
    from coar_dask.cli.main import main as coar_dask_main

    out = tmp_path / "plain.pt"
    assert coar_dask_main(["fit", "--store", str(small_store.path), "--out", str(out), "--num-train", "50",
                           "--split-seed", "7"]) == 0
    plain = Attributions.load(out)
    assert plain.metadata["row_rule"] == "shuffle"
    np.testing.assert_allclose(plain.weight, fit(small_store, num_train=50, split_seed=7).weight, rtol=1e-5,
                               atol=1e-6)


def test_fit_settings_are_frozen_and_checked():
    from coar_dask.fit.plan import FitSettings

    s = FitSettings.create(num_train=5, solver="saga", lr=0.1)
    assert s.options == {"lr": 0.1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_train = 6  # type: ignore[misc]
    with pytest.raises(RegressionError, match="no option"):
        FitSettings.create(solver="lstsq", lr=0.1)
    with pytest.raises(RegressionError, match="row_rule"):
        FitSettings.create(row_rule="random")
