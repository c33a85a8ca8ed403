"""The package's shape: layers, import cycles, side effects of importing it.

These walk the source's syntax trees (imports inside functions count too), so
a rule broken anywhere in ``coar_dask/`` fails here with the module named.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "coar_dask"

#: Layers, lowest first; a module may import only its own layer and those below.
LAYERS = [
    {"coar_dask._version", "coar_dask.errors", "coar_dask._yaml", "coar_dask.config", "coar_dask._exports"},
    {"coar_dask.core"},
    {"coar_dask.ablation"},
    {"coar_dask.solvers"},
    {"coar_dask.formats"},
    {"coar_dask.runtime"},
    {"coar_dask.fit"},
    {"coar_dask.zoo"},
    {"coar_dask.compat"},
    {"coar_dask.cli", "coar_dask.initialize_store", "coar_dask.write_dataset", "coar_dask.run_regression"},
]
#: Stand apart: the package façade re-exports the library; the SLURM harness is a tool of its own.
OUTSIDE_LAYERS = {"coar_dask", "coar_dask.testing"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module that ``name`` imports, anywhere in it (absolute names)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _internal(name: str) -> set[str]:
    """The coar_dask modules that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    return {m for m in _imports(name) if m in MODULES and m != name}


def _layer(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(name == top or name.startswith(top + ".") for top in layer):
            return i
    return None


def test_every_module_has_a_layer():
    loose = [m for m in MODULES if _layer(m) is None
             and not any(m == o or m.startswith(o + ".") for o in OUTSIDE_LAYERS)]
    assert not loose, f"modules outside every layer (add them to LAYERS or move them): {loose}"


def test_layers_import_only_downwards():
    bad = []
    for name in MODULES:
        mine = _layer(name)
        if mine is None:
            continue
        for dep in _internal(name):
            theirs = _layer(dep)
            if theirs is not None and theirs > mine:
                bad.append(f"{name} imports {dep} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {name: _internal(name) - {"coar_dask"} for name in MODULES}
    # a package's __init__ importing its own submodules is not a cycle of concern
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _third_party(name: str, top: str) -> bool:
    return any(m == top or m.startswith(top + ".") for m in _imports(name))


def test_argparse_only_in_the_command_line():
    users = [m for m in MODULES if _third_party(m, "argparse")
             and not (m.startswith("coar_dask.cli") or m.startswith("coar_dask.testing"))]
    assert not users, f"argparse imported outside coar_dask/cli/: {users}"


@pytest.mark.parametrize("heavy", ["distributed", "dask_jobqueue", "matplotlib"])
def test_core_imports_no_cluster_or_plotting(heavy):
    users = [m for m in MODULES if m.startswith("coar_dask.core") and _third_party(m, heavy)]
    assert not users, f"{heavy} imported by the core layer: {users}"


def _function_lengths() -> list[tuple[str, str, int]]:
    rows = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    length -= first.end_lineno - first.lineno + 1
                rows.append((name, node.name, length))
    return rows


def test_function_length_counter_counts():
    """The counter itself: this module's own longest function is found and measured."""
    rows = {(m, f): n for m, f, n in _function_lengths()}
    assert rows[("coar_dask.core.spec", "load_spec")] > 3


def test_no_function_longer_than_80_lines():
    long = [f"{m}.{f}: {n} lines" for m, f, n in _function_lengths() if n > 80]
    assert not long, "functions over 80 lines (docstring not counted):\n" + "\n".join(long)


def test_import_writes_nothing_and_stays_light(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys, coar_dask; "
            "print(__import__('json').dumps(sorted(m for m in ('torch', 'distributed', 'matplotlib', "
            "'argparse', 'dask_jobqueue') if m in sys.modules)))")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(home / ".config")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert json.loads(out.stdout) == []
    assert list(home.rglob("*")) == [], f"import coar_dask wrote {list(home.rglob('*'))}"


def test_the_test_command_runs_the_docstring_examples():
    """``pytest`` alone (``make test``, CI) collects the package's doctests as well as ``tests/``."""
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in config["addopts"].split()
    assert {"tests", "coar_dask"} <= set(config["testpaths"])
    make_test = (PACKAGE.parent / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "-m pytest $(PYTEST_ARGS)" in make_test, "make test must run pytest over its configured testpaths"


def test_every_overwrite_parameter_defaults_to_false():
    """Like the command line's ``--overwrite``: no library call replaces an existing file unless asked."""
    true = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                true += [f"{name}.{node.name}" for a, d in pairs
                         if a.arg == "overwrite" and not (isinstance(d, ast.Constant) and d.value is False)]
    assert not true, "overwrite= must default to False:\n" + "\n".join(true)


#: The pipeline: what ``from coar_dask import *`` gives, and nothing more (trust_recorded: the trust gate).
PIPELINE = {
    "__version__", "CoarError", "Spec", "load_spec", "Store", "init_store", "open_store", "Experiment",
    "load_experiment", "Components", "select_components", "Batch", "register_output", "sample_masks",
    "init_experiment_store", "BuildPlan", "plan_build", "execute_plan", "run_build",
    "cluster_client", "Attributions", "fit", "EvaluationResult", "evaluate",
}
#: The top-level names of 0.1 that moved, and their homes now.
MOVED = {
    "leave_one_out": "coar_dask.fit", "gradient_x_parameter": "coar_dask.fit", "edit_scores": "coar_dask.fit",
    "edited": "coar_dask.fit", "edit_model": "coar_dask.fit", "sweep_edit": "coar_dask.fit",
    "plot_evaluation": "coar_dask.fit", "compare": "coar_dask.fit.compare", "BetonRows": "coar_dask.formats",
    "export_beton": "coar_dask.formats", "export_npy": "coar_dask.formats", "import_npy": "coar_dask.formats",
}


def _run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing of this test session imported), warnings shown."""
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)


def test_the_top_level_is_the_pipeline():
    import coar_dask

    assert PIPELINE <= set(coar_dask.__all__) <= PIPELINE | {"trust_recorded"}
    assert len(coar_dask.__all__) == len(set(coar_dask.__all__))
    out = _run_python("import json, warnings; warnings.simplefilter('error'); ns = {}; "
                      "exec('from coar_dask import *', ns); print(json.dumps(sorted(set(ns) - {'__builtins__'})))")
    assert set(json.loads(out.stdout)) == set(coar_dask.__all__)


@pytest.mark.parametrize("name, home", sorted(MOVED.items()))
def test_a_moved_name_still_imports_from_the_top_with_a_warning_naming_its_home(name, home):
    import importlib

    import coar_dask

    with pytest.warns(DeprecationWarning, match=rf"coar_dask\.{name} is deprecated: import it from "
                                                rf"{home.replace('.', '[.]')} \(from {home} import {name}\)"):
        alias = getattr(coar_dask, name)
    assert alias is getattr(importlib.import_module(home), name)
    assert name not in coar_dask.__all__


@pytest.mark.parametrize("package", ["coar_dask.fit", "coar_dask.formats"])
def test_subpackage_exports_resolve_and_shadow_no_module(package):
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__module__", "").startswith(package), (name, value)
        assert not (MODULES[package].parent / f"{name}.py").exists(), f"{package}.{name} would hide a module"
        assert name in dir(module)


def test_importing_a_subpackage_imports_none_of_its_modules():
    out = _run_python("import sys, coar_dask.fit, coar_dask.formats; print(sorted(m for m in sys.modules if "
                      "m.startswith(('coar_dask.fit.edit', 'coar_dask.fit.baselines', 'coar_dask.fit.compare', "
                      "'coar_dask.formats.'))))")
    assert out.stdout.strip() == "[]"


def test_beton_writing_and_reading_are_apart():
    """Each side imports only what both share (``layout``), never the other side."""
    write, read = "coar_dask.formats.beton.write", "coar_dask.formats.beton.read"
    assert read not in _internal(write) and write not in _internal(read)
    assert "coar_dask.formats.beton.layout" in _internal(write) & _internal(read)
