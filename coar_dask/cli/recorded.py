"""The experiment a store records: the default of ``build``, ``evaluate`` and ``status``.

``plan_build`` records the whole experiment description in a store the first
time it builds it, so a command given a store needs no ``--experiment``
after that: ``coar-dask build --store S`` resumes what S was built with. An
experiment given anyway is checked against the store by the build (a
different one is refused).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from coar_dask._yaml import read_yaml_file
from coar_dask.core.experiment import Experiment, load_experiment
from coar_dask.cli.parser_rules import TRUST_COMMANDS
from coar_dask.core.trust import gave_here, recorded_imports, remember_given, trust_recorded, untrusted_imports
from coar_dask.runtime.build import recorded_experiment
from coar_dask.core.store import Store, open_store
from coar_dask.errors import CoarError, ConfigError

__all__ = ["recorded_experiment", "experiment_for_store", "import_from_current_folder", "describe_experiment",
           "describe_imports", "command_context"]


def experiment_for_store(given: Any, store: Store | str | os.PathLike, command: str) -> Experiment:
    """``given`` (a YAML path or an experiment) when there is one, else the experiment ``store`` records."""
    if given:
        return load_experiment(given)
    recorded = recorded_experiment(store)
    if recorded is None:
        path = store.path if isinstance(store, Store) else store
        raise ConfigError(f"store {str(path)!r} records no experiment yet (it has never been built); "
                          f"give one: coar-dask {command} --store {path} --experiment EXP.yaml.")
    return recorded


def _factory_line(entry: Any) -> str:
    if isinstance(entry, Mapping):
        return f"{entry.get('factory')} {entry.get('kwargs') or ''}".rstrip()
    return "(missing)" if entry is None else f"{entry!r} (malformed: not a mapping with 'factory')"


def describe_experiment(data: Any) -> list[str]:
    """A few lines naming what an experiment (its YAML form, as a store records it) computes.

    A malformed record (a store from elsewhere) is described as it is, never refused: ``status`` shows it.
    """
    if not isinstance(data, Mapping):
        return [f"(malformed record: a {type(data).__name__}, not a mapping)"]
    comps = data.get("components") or {}
    selection = (", ".join(f"{k} {v}" for k, v in comps.items() if v) or "all") if isinstance(comps, Mapping) \
        else repr(comps)
    return [
        f"model:      {_factory_line(data.get('model'))}",
        f"examples:   {_factory_line(data.get('examples'))}",
        f"components: {selection}",
        f"output:     {data.get('output')}, alpha {data.get('alpha')}, mask seed {data.get('mask_seed')}",
    ]


def describe_imports(data: Any) -> list[str]:
    """What running the record ``data`` would import, and whether that needs ``--trust-recorded``."""
    found = recorded_imports(data) if isinstance(data, Mapping) else []
    if not found:
        return []
    untrusted = set(untrusted_imports(data))
    return [f"imports {what}: {path}" + (" (not imported without --trust-recorded or --experiment)"
                                         if (what, path) in untrusted else " (built-in)")
            for what, path in found]


def imports_experiment(args: argparse.Namespace) -> bool:
    """Whether the command imports the user's experiment: it was given one, agreed to a recorded one, or
    may run a recorded one from a folder the user gave experiments from before (their project)."""
    if getattr(args, "experiment", None) or getattr(args, "trust_recorded", False):
        return True
    return getattr(args, "command", None) in TRUST_COMMANDS and gave_here()


def _remember_experiment(path: Any) -> None:
    """Remember the import paths of an experiment YAML given on the command line (for this folder), so
    that later commands here may run the store's record of it without ``--trust-recorded``."""
    if not path or not Path(path).is_file():
        return
    try:
        data = read_yaml_file(path, "experiment file")
    except (CoarError, OSError):  # the command itself says what is wrong with it
        return
    if isinstance(data, Mapping):
        remember_given(data, persist=True)


@contextlib.contextmanager
def command_context(args: argparse.Namespace) -> Iterator[None]:
    """Run a command with the current folder importable only if it imports the user's experiment
    (a module planted in an unpacked archive must not shadow a library for ``verify``), and with the
    recorded experiments' code agreed to only under ``--trust-recorded``."""
    if imports_experiment(args):
        import_from_current_folder()
    _remember_experiment(getattr(args, "experiment", None))
    with trust_recorded() if getattr(args, "trust_recorded", False) else contextlib.nullcontext():
        yield


def import_from_current_folder() -> None:
    """Let factory import paths name modules in the current folder, as ``python -m`` does.

    The ``coar-dask`` console script starts with its own folder on
    ``sys.path``, not the current one; ``python -m`` and ``python file.py``
    put the current (or the script's) folder first. Local Dask workers start
    with this process's ``sys.path``, so they find the module too.
    """
    here = str(Path.cwd())
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
