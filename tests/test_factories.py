"""An experiment's factories fail in one line that names them (issue 14).

A model or examples factory that raises (when called or when its module is
imported), returns zero examples, calls ``sys.exit(0)`` or hangs gives a
:class:`~coar_dask.errors.FactoryError` naming it when the state first loads
(:func:`coar_dask.core.experiment.load_state`), and exit code 2 with one line
on the command line; ``KeyboardInterrupt`` is never swallowed. The factories
live in a module these tests write to ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import dask
import pytest
import torch
import yaml

from coar_dask.config import factory_timeout
from coar_dask.core.experiment import Experiment, call_factory, load_state
from coar_dask.errors import CoarError, ConfigError, ExperimentError, FactoryError, FactoryTimeoutError

torch = pytest.importorskip("torch")

FACTORIES = '''
import sys
import threading

import torch

from conftest import tiny_examples, tiny_model

#: Set by the tests to let a hung factory's abandoned thread finish.
RELEASE = threading.Event()
CALLS = []

def raises():
    raise ValueError("no checkpoint at /nowhere/model.pt")

def exits():
    sys.exit(0)

def interrupted():
    raise KeyboardInterrupt

def hangs():
    RELEASE.wait(60)
    return tiny_model()

def no_examples():
    x, y = tiny_examples()
    return x[:0], y[:0]

def empty_dataset():
    return torch.utils.data.TensorDataset(torch.zeros(0, 1, 6, 6))

def where_called():
    CALLS.append(threading.current_thread())
    return tiny_model()

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module ``user_factories`` (the source above) importable here and by subprocesses."""
    name = f"user_factories_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    module = sys.modules.pop(name, None)
    if module is not None:
        module.RELEASE.set()  # end any abandoned thread


def experiment(model: str = "conftest:tiny_model", examples: str = "conftest:tiny_examples") -> Experiment:
    # Distinct mask seeds; load_state caches by model and examples (not the seed), and a failed load is never cached.
    experiment.seed = getattr(experiment, "seed", 1000) + 1
    return Experiment(model=model, examples=examples, alpha=0.2, batch_size=5, mask_seed=experiment.seed)


@pytest.mark.parametrize("kind, factory, fragments", [
    ("model", "raises", ["raised ValueError: no checkpoint at /nowhere/model.pt", "python -c"]),
    ("examples", "raises", ["raised ValueError: no checkpoint", "python -c"]),
    ("model", "exits", ["called sys.exit(0)", "must return its value or raise"]),
    ("examples", "exits", ["called sys.exit(0)"]),
    ("examples", "no_examples", ["returned 0 examples"]),
    ("examples", "empty_dataset", ["empty Dataset (0 examples)"]),
    ("model", "NOT_A_FUNCTION", ["is a int, not a function"]),
])
@pytest.mark.parametrize("timeout", ["config", 0])
def test_a_failing_factory_is_one_line_naming_it(factories, kind, factory, fragments, timeout):
    path = f"{factories}:{factory}"
    exp = experiment(**{kind: path})
    with dask.config.set({"coar-dask.factory-timeout": timeout if timeout == 0 else "10m"}):
        with pytest.raises(FactoryError) as info:
            load_state(exp)
    message = str(info.value)
    assert isinstance(info.value, (ExperimentError, ValueError, CoarError))
    assert "\n" not in message
    assert f"{kind} factory {path!r}" in message
    for fragment in fragments:
        assert fragment in message


def test_a_module_that_fails_on_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_on_import.py").write_text("raise RuntimeError('CUDA driver too old')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FactoryError, match=r"model factory 'broken_on_import:load' raised RuntimeError: CUDA "
                                           r"driver too old"):
        load_state(experiment(model="broken_on_import:load"))


def test_a_hung_factory_times_out_in_the_calling_thread(factories):
    path = f"{factories}:hangs"
    t0 = time.perf_counter()
    with dask.config.set({"coar-dask.factory-timeout": "0.5s"}):
        with pytest.raises(FactoryTimeoutError) as info:
            load_state(experiment(model=path))
    assert time.perf_counter() - t0 < 10
    message = str(info.value)
    assert isinstance(info.value, TimeoutError) and "\n" not in message
    assert f"model factory {path!r} did not return within 0.5 s" in message
    assert "coar-dask.factory-timeout" in message and "DASK_COAR_DASK__FACTORY_TIMEOUT" in message
    # the abandoned thread is a daemon: it cannot keep the process alive
    assert all(t.daemon for t in threading.enumerate() if t.name == "coar-dask model factory")


def test_keyboard_interrupt_is_never_swallowed(factories):
    for timeout in (0, "10m"):
        with pytest.raises(KeyboardInterrupt):
            call_factory("model", f"{factories}:interrupted", {}, timeout=timeout)


def test_a_limit_runs_the_factory_in_a_helper_thread_and_none_in_this_one(factories):
    import importlib

    module = importlib.import_module(factories)
    call_factory("model", f"{factories}:where_called", {}, timeout=5)
    call_factory("model", f"{factories}:where_called", {}, timeout=0)
    assert module.CALLS[0] is not threading.current_thread()
    assert module.CALLS[1] is threading.current_thread()


@pytest.mark.parametrize("value, seconds", [("10m", 600.0), ("90s", 90.0), (2.5, 2.5), (0, None), (False, None),
                                            ("off", None)])
def test_factory_timeout_setting(value, seconds):
    assert factory_timeout(value) == seconds
    with dask.config.set({"coar-dask.factory-timeout": value}):
        assert factory_timeout() == seconds


def test_the_packaged_default_is_ten_minutes():
    assert factory_timeout() == 600.0


@pytest.mark.parametrize("value", ["soon", -1, [1]])
def test_a_bad_factory_timeout_names_the_key(value):
    with pytest.raises(ConfigError, match="coar-dask.factory-timeout"):
        factory_timeout(value)


@pytest.mark.parametrize("factory, env, fragment", [
    ("exits", {}, "called sys.exit(0)"),
    ("hangs", {"DASK_COAR_DASK__FACTORY_TIMEOUT": "2s"}, "did not return within 2 s"),
])
def test_the_cli_exits_2_with_one_line(tmp_path, factories, coar_dask_cli, factory, env, fragment):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"factory": f"{factories}:{factory}"},
                                   "examples": {"factory": "conftest:tiny_examples"}, "alpha": 0.2}))
    here = os.path.dirname(__file__)
    child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(tmp_path), here])}
    proc = subprocess.run([*coar_dask_cli, "init", "--experiment", str(exp), "--rows", "10",
                           "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, env=child_env, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"model factory '{factories}:{factory}'" in lines[0] and fragment in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()


def test_cli_components_names_a_factory_that_exits(tmp_path, factories, coar_dask_cli):
    exp = tmp_path / "exp.yaml"
    exp.write_text(textwrap.dedent(f"""\
        model: {{factory: "conftest:tiny_model"}}
        examples: {{factory: "{factories}:exits"}}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(__file__)])}
    proc = subprocess.run([*coar_dask_cli, "components", "--experiment", str(exp)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "examples factory" in proc.stderr and "sys.exit(0)" in proc.stderr


def test_listing_an_experiments_components_goes_through_the_same_factory_rules(tmp_path, monkeypatch):
    """``coar-dask components --experiment`` calls only the model factory: it too gives one FactoryError line."""
    from coar_dask.errors import FactoryError
    from coar_dask.zoo.presets import experiment_components

    (tmp_path / "exiting_model.py").write_text("import sys\n\ndef make():\n    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    exp = {"model": {"factory": "exiting_model:make"}, "examples": {"factory": "exiting_model:make"}}
    with pytest.raises(FactoryError, match="exiting_model:make"):
        experiment_components(exp)


# -- models that a build cannot use (issue 22): named in one line at load time, exit 2 -----------------


class _Quirky(torch.nn.Module):
    def __init__(self, quirk: str):
        super().__init__()
        from conftest import tiny_model

        self.net, self.quirk = tiny_model(), quirk

    def forward(self, x):
        x = self.net(x)
        if self.quirk == "dropout":  # training=True: model.eval() does not turn it off
            return torch.nn.functional.dropout(x, 0.5, training=True)
        if self.quirk == "noise":
            return x + 0.1 * torch.randn_like(x)
        return x.squeeze()  # a batch of one loses its batch dimension


def dropout_model():
    return _Quirky("dropout")


def noisy_model():
    return _Quirky("noise")


def squeezing_model():
    return _Quirky("squeeze")


@pytest.mark.parametrize("model, message", [
    ("dropout_model", "the model is not deterministic"),
    ("noisy_model", "the model is not deterministic"),
    ("squeezing_model", "the model cannot run a batch of one example"),
])
def test_a_model_a_build_cannot_use_is_one_line_exit_2(model, message, tmp_path, capsys):
    """Before: dropout or noise built a store and exited 0 ("masks per pass disagree ..."), and a model that
    fails on one example gave the engine probe's traceback (30 of them on a LocalCluster)."""
    import yaml

    from coar_dask.cli.main import main

    exp = experiment(model=f"test_factories:{model}")
    with pytest.raises(ExperimentError) as info:
        load_state(exp)
    assert message in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))
    capsys.readouterr()
    code = main(["init", str(tmp_path / "store"), "--experiment", str(path), "--rows", "10"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
