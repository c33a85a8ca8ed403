"""The experiment a store records: the default of ``build``, ``evaluate`` and ``status``.

``plan_build`` records the whole experiment description in a store the first
time it builds it, so a command given a store needs no ``--experiment``
after that: ``coar-dask build --store S`` resumes what S was built with. An
experiment given anyway is checked against the store by the build (a
different one is refused).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

from coar_dask.core.experiment import Experiment, load_experiment
from coar_dask.runtime.build import recorded_experiment
from coar_dask.core.store import Store, open_store
from coar_dask.errors import ConfigError

__all__ = ["recorded_experiment", "experiment_for_store", "import_from_current_folder", "describe_experiment"]


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


def describe_experiment(data: Mapping[str, Any]) -> list[str]:
    """A few lines naming what an experiment (its YAML form) computes."""
    comps = data.get("components") or {}
    selection = ", ".join(f"{k} {v}" for k, v in comps.items() if v) or "all"
    return [
        f"model:      {data['model']['factory']} {data['model'].get('kwargs') or ''}".rstrip(),
        f"examples:   {data['examples']['factory']} {data['examples'].get('kwargs') or ''}".rstrip(),
        f"components: {selection}",
        f"output:     {data.get('output')}, alpha {data.get('alpha')}, mask seed {data.get('mask_seed')}",
    ]


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
