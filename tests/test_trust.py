"""Issue 22 items 8-10: code named only in a received file runs nothing without consent.

A store (or attributions file) from someone else records an experiment whose
model factory is ``os:system`` with a command that writes a marker file. Every
command that would run the recorded experiment (``build``, ``evaluate``,
``compare``, ``edit``; ``fit`` when the store records no components) must
refuse it in one line, before importing anything, unless the user agrees
(``--trust-recorded``, :func:`coar_dask.trust_recorded`) or gives the
experiment. ``status`` shows what would be imported, with control characters
escaped; a module planted in the current folder is never imported by commands
that import no experiment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import coar_dask
from coar_dask.core.experiment import load_experiment
from coar_dask.core.masks import sample_masks
from coar_dask.core.store import init_store
from coar_dask.fit.fit import fit
from coar_dask.runtime.build import plan_build, run_build

torch = pytest.importorskip("torch")

P, K, N, RPC = 8, 5, 40, 20
CONFIGS = Path(__file__).parents[1] / "configs"


def evil_record(marker: Path, **changes) -> dict:
    """An experiment record whose model factory runs a shell command that creates ``marker``."""
    record = {
        "model": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "examples": {"factory": "coar_dask.zoo.digits:heldout_examples", "kwargs": {}},
        "components": {"include": [], "exclude": [], "kinds": ["conv2d"]},
        "output": "margin", "alpha": 0.2, "mask_seed": 0,
        "arrays": {"x_name": "masks", "y_name": "margins", "y_dtype": "float32"},
    }
    record.update(changes)
    return record


def evil_store(path: Path, marker: Path, *, done: bool = True, record: dict | None = None):
    """A store recording ``evil_record`` (with its fingerprint), its rows written when ``done``."""
    record = record or evil_record(marker)
    spec = {"num_models": N, "schema": {"masks": {"dtype": "bool_", "shape": [P]},
                                        "margins": {"dtype": "float32", "shape": [K]}}}
    store = init_store(path, spec, rows_per_chunk=RPC, mask_seed=0, alpha=0.2, extra_meta={"experiment": record})
    weights = np.random.default_rng(1).normal(size=(P, K))
    for block in store.blocks() if done else ():
        masks = sample_masks(0, block.rows, P, 0.2)
        store.write_block(block.index, {"masks": masks, "margins": masks @ weights})
    return store


@pytest.fixture(autouse=True)
def consent_file(tmp_path, monkeypatch):
    """The user's consent file (import paths given before, per folder), for this test only."""
    path = tmp_path / "home" / "given-imports.json"
    monkeypatch.setenv("COAR_DASK_CONSENT_FILE", str(path))
    return path


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


@pytest.fixture
def cli(coar_dask_cli, tmp_path):
    """``cli(*argv)``: ``coar-dask ARGV`` in a subprocess whose current folder is ``tmp_path``."""

    def run(*argv, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        return subprocess.run([*coar_dask_cli, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                              timeout=300)

    return run


def assert_refused(proc: subprocess.CompletedProcess, marker: Path, *fragments: str, named: str = "os:system") -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in (named, "--trust-recorded", *fragments):
        assert fragment in proc.stderr, proc.stderr
    assert not marker.exists(), "the recorded factory ran"


# ------------------------------------------------------------------ the API


def test_run_build_refuses_a_recorded_factory_and_runs_it_with_consent(tmp_path, marker):
    from coar_dask.errors import UntrustedCodeError

    store = evil_store(tmp_path / "s", marker, done=False)
    for call in (lambda: plan_build(store, None), lambda: run_build(store, None)):
        with pytest.raises(UntrustedCodeError, match="os:system"):
            call()
        assert not marker.exists()
    with coar_dask.trust_recorded(["os:system"]), pytest.raises(coar_dask.CoarError):
        plan_build(store, None)  # agreed: imported and run (it returns 0, not a model)
    assert marker.exists()


def test_fit_names_no_components_rather_than_running_the_recorded_factory(tmp_path, marker):
    attrs = fit(evil_store(tmp_path / "s", marker), ridge=1e-6)
    assert not marker.exists()
    assert attrs.component_names is None and attrs.n_components == P


def test_components_from_model_refuses_the_recorded_factory_without_consent(tmp_path, marker):
    from coar_dask.errors import UntrustedCodeError
    from coar_dask.fit.fit import components_from_model

    store = evil_store(tmp_path / "s", marker)
    with pytest.raises(UntrustedCodeError, match="os:system"):
        components_from_model(store)
    assert not marker.exists()
    with coar_dask.trust_recorded(["os:system"]), pytest.raises(AttributeError):
        components_from_model(store)  # agreed: imported and run (it returns 0, not a model)
    assert marker.exists()


def test_what_a_record_would_import():
    from coar_dask.core.trust import check_recorded, recorded_imports, untrusted_imports
    from coar_dask.errors import UntrustedCodeError

    digits = load_experiment(CONFIGS / "digits.yaml").to_dict()
    assert [p for _, p in recorded_imports(digits)] == ["coar_dask.zoo.digits:load_model",
                                                        "coar_dask.zoo.digits:heldout_examples"]
    assert untrusted_imports(digits) == []
    check_recorded(digits, "digits")  # built-ins need no consent
    # a built-in factory that imports its keyword argument: the argument is checked too
    seeded = {**digits, "model": {"factory": "coar_dask.zoo.presets:seeded_model",
                                  "kwargs": {"factory": "os:system"}}, "output": "mymod:out"}
    assert untrusted_imports(seeded) == [("model factory's factory", "os:system"), ("output", "mymod:out")]
    with pytest.raises(UntrustedCodeError, match="os:system"):
        check_recorded(seeded, "the record")
    with coar_dask.trust_recorded(["os:system"]):
        assert untrusted_imports(seeded) == [("output", "mymod:out")]
    with coar_dask.trust_recorded():
        check_recorded(seeded, "the record")
    assert untrusted_imports(seeded)  # consent ends with the block


# ------------------------------------------------------------------ the command line


def test_build_refuses_the_recorded_factory_even_with_nothing_pending(tmp_path, marker, cli):
    for done in (False, True):
        store = evil_store(tmp_path / f"s{done}", marker, done=done)
        assert_refused(cli("build", store.path), marker, "recorded in store")


def test_build_with_trust_recorded_runs_it(tmp_path, marker, cli):
    store = evil_store(tmp_path / "s", marker, done=False)
    proc = cli("build", store.path, "--trust-recorded", "--cluster", "none")
    assert marker.exists(), proc.stderr  # consent given: the factory ran (and returned no model)
    assert proc.returncode == 2 and "os:system" in proc.stderr


@pytest.fixture
def evil_attrs(tmp_path, marker):
    store = evil_store(tmp_path / "s", marker)
    path = fit(store, ridge=1e-6).save(tmp_path / "a.pt")
    assert not marker.exists()
    return store, path


def test_evaluate_edit_and_compare_refuse_the_recorded_factory(tmp_path, marker, cli, evil_attrs):
    store, attrs = evil_attrs
    assert_refused(cli("evaluate", "--attributions", attrs, "--store", tmp_path / "ev", "--rows", 20,
                       "--cluster", "none"), marker, "recorded in")
    pending = evil_store(tmp_path / "pending", marker, done=False)
    assert_refused(cli("evaluate", "--attributions", attrs, "--store", pending.path, "--cluster", "none"),
                   marker)
    assert_refused(cli("edit", "--attributions", attrs, "--target", 0, "--cluster", "none"), marker)
    assert_refused(cli("compare", "--store", store.path, "--eval-store", pending.path, "--methods", "coar",
                       "--cluster", "none"), marker)


def test_fit_on_the_command_line_runs_nothing(tmp_path, marker, cli):
    store = evil_store(tmp_path / "s", marker)
    proc = cli("fit", store.path, "--out", tmp_path / "a.pt")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_status_lists_what_would_be_imported_with_control_characters_escaped(tmp_path, marker, cli):
    record = evil_record(marker, description="\x1b]0;owned\x07\x1b[2J")
    record["examples"]["kwargs"] = {"seed": "\x1b[31mred\r"}
    store = evil_store(tmp_path / "s", marker, record=record)
    proc = cli("status", store.path)
    assert proc.returncode == 0, proc.stderr
    assert not any(ch in proc.stdout for ch in "\x1b\x07\r"), repr(proc.stdout)
    assert "\\x1b[31mred" in proc.stdout
    assert "os:system" in proc.stdout and "--trust-recorded" in proc.stdout
    assert not marker.exists()


def test_a_module_planted_in_the_current_folder_is_not_imported_by_verify(tmp_path, marker, cli):
    store = evil_store(tmp_path / "s", marker)
    folder = tmp_path / "unpacked"
    folder.mkdir()
    for name in ("zarr", "numpy", "yaml"):
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for argv in (("verify", store.path), ("status", store.path)):
        proc = cli(*argv, cwd=folder)
        assert proc.returncode == 0, proc.stderr
        assert not marker.exists(), f"coar-dask {argv[0]} imported a module from the current folder"


def test_a_factory_in_the_current_folder_is_still_found_when_given(tmp_path, cli):
    """The experiment the user gives may name a module in the current folder (as ``python -m`` allows)."""
    (tmp_path / "mymodels.py").write_text(
        "from coar_dask.zoo.digits import load_model as _load\n"
        "def load_model():\n    return _load()\n")
    exp = load_experiment(CONFIGS / "digits.yaml").to_dict()
    exp["model"]["factory"] = "mymodels:load_model"
    import yaml

    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    proc = cli("components", "--experiment", "exp.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "conv" in proc.stdout


def _user_folder(folder: Path, marker: Path | None = None) -> Path:
    """A folder holding ``mymodels.py`` (the digits model; with ``marker``, a planted one that writes it)
    and ``exp.yaml`` naming it."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    body = (f"open({str(marker)!r}, 'w').close()\n" if marker else "") + (
        "from coar_dask.zoo.digits import load_model as _load\n"
        "def load_model():\n    return _load()\n")
    (folder / "mymodels.py").write_text(body)
    exp = load_experiment(CONFIGS / "digits.yaml").to_dict()
    exp["model"]["factory"] = "mymodels:load_model"
    (folder / "exp.yaml").write_text(yaml.safe_dump(exp))
    return folder


def test_build_store_resumes_the_users_own_experiment_but_not_from_an_unpacked_folder(tmp_path, marker, cli,
                                                                                       consent_file):
    """README's flow, `init --experiment EXP.yaml` then `build STORE` from the same folder, needs no flag;
    the same store run from another folder holding a planted module of that name is refused."""
    project = _user_folder(tmp_path / "project")
    init = cli("init", "store", "--experiment", "exp.yaml", "--rows", 20, "--rows-per-chunk", 20, cwd=project)
    assert init.returncode == 0, init.stderr
    assert "mymodels:load_model" in consent_file.read_text()
    status = cli("status", "store", cwd=project)
    assert "imports model factory: mymodels:load_model" in status.stdout
    assert "not imported without" not in status.stdout  # given before, here
    build = cli("build", "store", "--cluster", "none", cwd=project)
    assert build.returncode == 0, build.stderr
    received = _user_folder(tmp_path / "received", marker)
    shutil.copytree(project / "store", received / "store")
    assert_refused(cli("build", "store", "--cluster", "none", cwd=received), marker, named="mymodels:load_model")
    assert "not imported without" in cli("status", "store", cwd=received).stdout


def test_the_api_runs_the_experiment_it_was_given_in_this_process(tmp_path, tiny_experiment):
    from coar_dask.runtime.build import init_experiment_store

    store = init_experiment_store(tmp_path / "s", tiny_experiment, rows=10, rows_per_chunk=10)
    assert plan_build(store, None).blocks  # conftest:tiny_model, given just above
