"""A newcomer's first hour (issue 13): their own model from the current folder, a store that remembers its
experiment, attributions that name their components, and one command line that behaves the same everywhere."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from coar_dask import fit, init_store, run_build  # noqa: E402
from coar_dask.cli.main import _auto_solver, build_parser  # noqa: E402
from coar_dask.cli.parser_rules import plain_text, resolve_store, subcommand_parsers  # noqa: E402
from coar_dask.compat.seed import choose_solver  # noqa: E402
from coar_dask.core.masks import sample_masks  # noqa: E402
from coar_dask.core.spec import Spec  # noqa: E402
from coar_dask.errors import ConfigError, ExperimentError, RegressionError, StoreMismatchError  # noqa: E402
from coar_dask.fit.attributions import Attributions  # noqa: E402

RST = re.compile(r"``|:(func|class|mod|meth|data|attr|obj|exc|ref):`")


# -- the command line's rules -----------------------------------------------------
def test_every_subcommand_flag_has_help_and_no_help_text_shows_rst():
    parser = build_parser()
    assert not RST.search(parser.format_help())
    for name, sub in subcommand_parsers(parser):
        text = sub.format_help()
        assert not RST.search(text), f"{name} --help shows reStructuredText: {RST.search(text).group(0)}"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            # argparse.SUPPRESS: deliberately hidden aliases (run-regression's seed keys, listed in its epilog)
            assert action.help, f"coar-dask {name}: {action.option_strings or action.dest} has no help text"


def test_plain_text_rewrites_rst_roles_and_literals():
    assert plain_text("see :func:`~coar_dask.fit.fit.fit` and ``x.npy``") == "see fit and `x.npy`"
    assert plain_text(":class:`coar_dask.Store`") == "coar_dask.Store"


def _store_commands():
    return [(name, sub) for name, sub in subcommand_parsers(build_parser())
            if "--store" in sub._option_string_actions]


def test_every_command_with_a_store_flag_also_takes_it_positionally():
    commands = _store_commands()
    assert {"init", "build", "status", "fit", "evaluate", "verify", "repair", "export-npy",
            "import-npy"} <= {n for n, _ in commands}
    for name, sub in commands:
        positionals = [a for a in sub._actions if not a.option_strings and (a.metavar == "STORE" or a.dest == "store")]
        assert positionals, f"coar-dask {name} takes --store but no positional STORE"


@pytest.mark.parametrize("argv", [
    ["status", "S"], ["status", "--store", "S"], ["build", "S", "--cluster", "none"],
    ["fit", "S", "--out", "a.pt"], ["fit", "--data.data_path", "S", "--out", "a.pt"],
    ["export-npy", "S", "--out", "npy"], ["import-npy", "seed_dir", "S"], ["verify", "S"], ["repair", "--store", "S"],
    ["init", "S", "--spec", "spec.json"],
])
def test_a_store_given_either_way_lands_in_the_same_place(argv):
    args = resolve_store(build_parser().parse_args(argv))
    assert "S" in (getattr(args, "store", None), getattr(args, "store_option", None))


def test_two_different_stores_or_none_are_refused_in_one_line():
    parser = build_parser()
    with pytest.raises(ConfigError, match="two different stores"):
        resolve_store(parser.parse_args(["status", "A", "--store", "B"]))
    with pytest.raises(ConfigError, match=r"coar-dask status STORE"):
        resolve_store(parser.parse_args(["status"]))


def test_verbose_works_before_and_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "status", "S"]).verbose == 1
    assert parser.parse_args(["status", "S", "-vv"]).verbose == 2
    assert parser.parse_args(["status", "S"]).verbose == 0


@pytest.mark.parametrize("k, max_lambda", [(None, None), (1, None), (1, "0"), (1, "auto"), (20, None), (20, "0.5"),
                                           (None, "0.1")])
def test_solver_auto_means_what_it_means_in_run_regression(k, max_lambda):
    args = build_parser().parse_args(["fit", "S", "--out", "a.pt", "--solver", "auto"]
                                     + (["--k", str(k)] if k is not None else [])
                                     + (["--max-lambda", max_lambda] if max_lambda is not None else []))
    seed_max_lambda = 0.0 if max_lambda in (None, "0") else (-1.0 if max_lambda == "auto" else float(max_lambda))
    assert _auto_solver(args) == choose_solver(k, seed_max_lambda, "auto")


# -- attributions you can read ----------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny store built with an experiment (so it records it)."""
    from coar_dask.core.experiment import Experiment

    exp = Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=5)
    path = tmp_path_factory.mktemp("built") / "s"
    run_build(init_store(path, Spec.for_experiment(120, n_components=23, n_outputs=12)), exp)
    return path


def test_attributions_name_their_components_and_count_their_examples(built, tmp_path):
    attrs = fit(built, target_slice=(2, 10))
    assert attrs.example_count == 12 and attrs.n_examples == 8 and attrs.first_example == 2
    assert attrs.component_names[:2] == ["0[0]", "0[1]"] and attrs.component_names[-1] == "9[4]"
    assert repr(attrs) == "<Attributions: 23 named components x 8 examples (2-9 of 12), lstsq on 120 rows>"
    loaded = Attributions.load(attrs.save(tmp_path / "a.pt"))
    assert loaded.component_names == attrs.component_names and loaded.example_count == 12
    assert loaded.metadata["experiment"]["model"]["factory"] == "conftest:tiny_model"
    torch.load(tmp_path / "a.pt", weights_only=True)


def test_top_components_are_the_extremes_of_the_examples_weights(built):
    attrs = fit(built)
    top = attrs.top_components(3, k=4)
    w = attrs.weight[:, 3]
    names = attrs.component_names
    assert [c for c, _ in top.positive] == [names[i] for i in np.argsort(-w)[:4] if w[i] > 0]
    assert [c for c, _ in top.negative] == [names[i] for i in np.argsort(w)[:4] if w[i] < 0]
    assert all(v > 0 for _, v in top.positive) and all(v < 0 for _, v in top.negative)
    assert top.format().splitlines()[1].startswith(f"  + {top.positive[0][0]}")
    with pytest.raises(RegressionError, match="example 12 is not in these attributions"):
        attrs.top_components(12)


def test_a_store_without_an_experiment_gives_indices_and_no_count(tmp_path):
    spec = {"num_models": 120, "schema": {"masks": {"dtype": "bool_", "shape": [6]},
                                          "margins": {"dtype": "float16", "shape": [2]}}}
    store = init_store(tmp_path / "s", spec, rows_per_chunk=60)
    w = np.array([[2.0, 0], [-1, 0], [0.5, 1], [0.25, -3], [0.25, 0], [1, 0]])
    for b in range(2):
        masks = sample_masks(0, np.arange(b * 60, b * 60 + 60), 6, 0.3)
        store.write_block(b, {"masks": masks, "margins": masks @ w})
    attrs = fit(tmp_path / "s")
    assert attrs.component_names is None and attrs.example_count is None
    assert repr(attrs) == "<Attributions: 6 unnamed components x 2 examples, lstsq on 120 rows>"
    top = attrs.top_components(0, k=2)
    assert [c for c, _ in top.positive] == [0, 5] and [c for c, _ in top.negative] == [1]


# -- the user's own model, from the current folder, with the CLI --------------------
USER_MODULE = textwrap.dedent('''\
    import torch
    from torch import nn


    def load_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


    def examples():
        g = torch.Generator().manual_seed(1)
        return torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    ''')
EXPERIMENT = textwrap.dedent('''\
    model: {factory: "user_mlp:load_model"}
    examples: {factory: "user_mlp:examples"}
    components: {include: ["^0$"], kinds: [linear]}
    alpha: ALPHA
    run: {batch_size: 20}
    ''')


def _cli(coar_dask_cli, folder: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user: nothing on the path
    return subprocess.run([*coar_dask_cli, *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=240)


def _partial_build(folder: Path) -> None:
    """Build the first block only (a build that was interrupted), from a process started in ``folder``."""
    code = ("import dataclasses; from coar_dask import plan_build, execute_plan; "
            "plan = plan_build('s', 'exp.yaml'); execute_plan(dataclasses.replace(plan, blocks=plan.blocks[:1]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, check=True, timeout=240)


@pytest.mark.slow
def test_cli_uses_the_users_module_from_the_current_folder_and_the_experiment_the_store_records(
        tmp_path, coar_dask_cli):
    (tmp_path / "user_mlp.py").write_text(USER_MODULE)
    (tmp_path / "exp.yaml").write_text(EXPERIMENT.replace("ALPHA", "0.1"))
    (tmp_path / "other.yaml").write_text(EXPERIMENT.replace("ALPHA", "0.2"))
    done = _cli(coar_dask_cli, tmp_path, "components", "--experiment", "exp.yaml")
    assert done.returncode == 0, done.stderr
    assert "total: 16 components in 1 layers" in done.stdout and "examples: 20" in done.stdout
    assert _cli(coar_dask_cli, tmp_path, "init", "s", "--experiment", "exp.yaml", "--rows", "150",
                "--rows-per-chunk", "50").returncode == 0
    _partial_build(tmp_path)
    # no --experiment: the recorded one; a LocalCluster worker imports user_mlp from this folder too
    done = _cli(coar_dask_cli, tmp_path, "build", "--store", "s", "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "Built 100 rows" in done.stdout and "150/150 rows completed" in done.stdout
    done = _cli(coar_dask_cli, tmp_path, "build", "s", "--experiment", "other.yaml", "--cluster", "none")
    assert done.returncode == 2 and "alpha" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    status = json.loads(_cli(coar_dask_cli, tmp_path, "status", "s", "--json").stdout)
    assert status["experiment"]["model"]["factory"] == "user_mlp:load_model"
    assert _cli(coar_dask_cli, tmp_path, "fit", "s", "--out", "a.pt").returncode == 0
    done = _cli(coar_dask_cli, tmp_path, "evaluate", "--attributions", "a.pt", "--store", "e", "--rows", "60",
                "--cluster", "none")
    assert done.returncode == 0, done.stderr
    assert re.search(r"held-out correlation over 60 masks \(alpha 0.1\): mean -?\d", done.stdout)
    done = _cli(coar_dask_cli, tmp_path, "top", "--attributions", "a.pt", "--example", "4", "-k", "3")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^  [+-] 0\[\d+\]", done.stdout, flags=re.M)


def test_the_python_api_sizes_a_store_from_the_experiment_and_resumes_what_it_records(tmp_path,
                                                                                     digits_experiment, capsys):
    from coar_dask.core.experiment import load_state
    from coar_dask.runtime.build import init_experiment_store, recorded_experiment

    state = load_state(digits_experiment)
    store = init_experiment_store(tmp_path / "s", digits_experiment, 40, rows_per_chunk=20, alpha=0.1)
    assert store.spec["masks"].shape == (state.n_components,) and store.spec["margins"].shape == (state.n_examples,)
    assert store.meta["alpha"] == 0.1 and recorded_experiment(store).alpha == 0.1
    report = run_build(store.path, None, progress=True)  # no experiment: the recorded one, with a bar
    assert report.rows_done == 40 and "build" in capsys.readouterr().err
    again = run_build(store.path, digits_experiment.replace(alpha=0.1))
    assert again.rows_done == 0  # the same experiment: nothing left to do
    with pytest.raises(StoreMismatchError, match="alpha=0.1"):
        run_build(store.path, digits_experiment.replace(alpha=0.2))
    bare = init_store(tmp_path / "bare", Spec.for_experiment(20, state.n_components, state.n_examples))
    with pytest.raises(ExperimentError, match="records no experiment"):
        run_build(bare, None)


def test_a_built_store_names_its_components_so_fit_needs_no_model(built, monkeypatch):
    from coar_dask.core.store import open_store
    from coar_dask.fit import fit as fit_module

    assert open_store(built, read_only=True).meta["components"]["total"] == 23
    monkeypatch.setattr(fit_module, "select_components", lambda *a, **k: pytest.fail("fit built the model"))
    attrs = fit(built)
    assert len(attrs.component_names) == 23
