"""Reading the YAML files users give (experiments, seed configs, SLURM settings).

One place that loads them safely (``yaml.safe_load``: plain data, never
Python objects) and turns a missing or malformed file into a one-line
:class:`~coar_dask.errors.ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from coar_dask.errors import ConfigError


def yaml_problem(exc: Exception) -> str:
    """A YAML error on one line (PyYAML's own message spans several, with a source excerpt)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = ("only plain YAML is read (yaml.safe_load): no python tags"
            if "constructor" in problem else "fix the syntax there")
    return f"{problem}{where}; {hint}."


def read_yaml_file(path: str | os.PathLike, what: str, missing_hint: str = "") -> Any:
    """The data of a YAML file (``None`` for an empty one), read with ``yaml.safe_load``.

    ``what`` names the file in errors ("experiment file"); ``missing_hint`` is
    appended when it does not exist.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist{'; ' + missing_hint if missing_hint else ''}.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {yaml_problem(exc)}") from None
