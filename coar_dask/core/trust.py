"""The trust rule: code named only in a file is imported only after the user agrees.

A store records the experiment it was built with, and attributions record the
experiment of their store, so that ``coar-dask build STORE`` needs no
``--experiment``. Such a record names code by import path (the model and
examples factories, an output function), and a store or attributions file can
come from someone else. So an experiment read from a record is usable only
when every import path it names is

- a coar_dask built-in (``coar_dask.zoo.digits:load_model``; a built-in
  factory's keyword arguments that are themselves import paths, such as
  ``seeded_model``'s ``factory``, are checked in turn), or
- agreed to by the user: ``--trust-recorded`` on the command line, or
  :func:`trust_recorded` in Python (for all, or for named import paths), or
- given by the user before, from the same folder: an experiment given on the
  command line (``--experiment EXP.yaml``) is remembered in the user's
  consent file (:func:`consent_file`, outside any store), and one given in
  Python (:func:`~coar_dask.runtime.build.init_experiment_store`, a build
  with an explicit experiment) for the rest of the process. So ``coar-dask
  init --experiment EXP.yaml`` then ``coar-dask build STORE`` from that
  folder needs no flag, while a received store naming the same module, run
  from the folder it was unpacked in (where a module of that name may be
  planted), is refused.

An experiment the user gives (``--experiment EXP.yaml``, an
:class:`~coar_dask.core.experiment.Experiment` passed in Python) is the user's
own code and is never checked. Reading a record (``status``, ``verify``) never
imports anything; only the commands that would run it are refused, before any
import, with one line naming the paths and the two ways to agree.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from coar_dask.core.experiment import Experiment
from coar_dask.errors import UntrustedCodeError

__all__ = ["recorded_imports", "untrusted_imports", "check_recorded", "experiment_from_record", "trust_recorded",
           "is_builtin", "remember_given", "consent_file", "gave_here", "TRUST_HINT"]

logger = logging.getLogger(__name__)

#: How to agree, named in every refusal.
TRUST_HINT = ("if you trust where it came from, rerun with --trust-recorded (Python: `with "
              "coar_dask.trust_recorded(): ...`), or give the experiment yourself: --experiment EXP.yaml")

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: ``True`` (everything), a frozenset of agreed import paths, or ``None`` (nothing agreed).
_AGREED: contextvars.ContextVar[Any] = contextvars.ContextVar("coar_dask_trust_recorded", default=None)
#: (folder, import path) pairs the user gave in this process.
_GIVEN: set[tuple[str, str]] = set()
_LOCK = threading.Lock()


def consent_file() -> Path:
    """Where the import paths given on the command line are remembered, per folder:
    ``$COAR_DASK_CONSENT_FILE``, else ``$XDG_CONFIG_HOME/coar-dask/given-imports.json`` (``~/.config``)."""
    if os.environ.get("COAR_DASK_CONSENT_FILE"):
        return Path(os.environ["COAR_DASK_CONSENT_FILE"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "coar-dask" / "given-imports.json"


def _read_consent() -> dict[str, list[str]]:
    path = consent_file()
    try:
        data = json.loads(path.read_text())
        folders = data["folders"]
        return {str(k): [str(p) for p in v] for k, v in folders.items() if isinstance(v, list)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring the consent file %s, which cannot be read (%s)", path, exc)
        return {}


def remember_given(data: Mapping[str, Any], *, persist: bool = False) -> None:
    """Remember the import paths of an experiment the user gave (its YAML form), for the current folder:
    in this process, and with ``persist`` in :func:`consent_file` too (what the command line does)."""
    folder = os.getcwd()
    paths = sorted({path.strip() for _, path in recorded_imports(data) if not is_builtin(path)})
    if not paths:
        return
    with _LOCK:
        _GIVEN.update((folder, p) for p in paths)
        if not persist:
            return
        known = _read_consent()
        if set(paths) <= set(known.get(folder, ())):
            return
        known[folder] = sorted(set(known.get(folder, ())) | set(paths))
        path = consent_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "folders": known}, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:  # consent not remembered: the next command asks for it again
            logger.warning("could not remember the experiment's import paths in %s (%s)", path, exc)


def gave_here() -> bool:
    """Whether the user has given an experiment naming code of their own from the current folder."""
    folder = os.getcwd()
    with _LOCK:
        if any(f == folder for f, _ in _GIVEN):
            return True
    return bool(_read_consent().get(folder))


def _given_here(paths: set[str]) -> set[str]:
    folder = os.getcwd()
    with _LOCK:
        given = {p for f, p in _GIVEN if f == folder}
    missing = paths - given
    return given | (set(_read_consent().get(folder, ())) & missing if missing else set())


def is_builtin(path: str) -> bool:
    """Whether ``path`` (``module:attribute``) names code of coar_dask itself."""
    module = str(path).partition(":")[0]
    return module == "coar_dask" or module.startswith("coar_dask.")


def _factory(entry: Any) -> tuple[Any, Mapping[str, Any]]:
    if isinstance(entry, Mapping):
        kwargs = entry.get("kwargs")
        return entry.get("factory"), kwargs if isinstance(kwargs, Mapping) else {}
    return entry, {}


def recorded_imports(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(what, import path)`` for every piece of code an experiment record (its YAML form) names.

    ``what`` is ``"model factory"``, ``"examples factory"``, ``"output"`` or
    ``"model factory's factory"`` (a built-in factory's keyword argument that is an import path).
    Malformed entries are left out: :meth:`Experiment.from_dict` refuses them.
    """
    found: list[tuple[str, str]] = []
    if not isinstance(data, Mapping):
        return found
    for section in ("model", "examples"):
        path, kwargs = _factory(data.get(section))
        if not isinstance(path, str):
            continue
        found.append((f"{section} factory", path))
        if is_builtin(path):  # e.g. seeded_model(factory="package.module:function")
            found += [(f"{section} factory's {key}", value) for key, value in kwargs.items()
                      if isinstance(value, str) and _IMPORT_PATH.match(value.strip())]
    output = data.get("output")
    if isinstance(output, str) and ":" in output:
        found.append(("output", output))
    return found


def untrusted_imports(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The entries of :func:`recorded_imports` that are neither built-in nor agreed to."""
    agreed = _AGREED.get()
    if agreed is True:
        return []
    found = [(what, path) for what, path in recorded_imports(data)
             if not is_builtin(path) and not (agreed and path.strip() in agreed)]
    given = _given_here({path.strip() for _, path in found}) if found else set()
    return [(what, path) for what, path in found if path.strip() not in given]


def check_recorded(data: Mapping[str, Any], source: str) -> None:
    """Raise :class:`~coar_dask.errors.UntrustedCodeError` if running the experiment record ``data``
    would import code the user has not agreed to; ``source`` names the record (e.g. "the experiment
    recorded in store 's'")."""
    untrusted = untrusted_imports(data)
    if untrusted:
        named = ", ".join(f"{what} {path!r}" for what, path in untrusted)
        raise UntrustedCodeError(
            f"{source} names code that this would import and run: {named}; code named only in a file that may "
            f"come from someone else is not imported without your consent: {TRUST_HINT}."
        )


def experiment_from_record(data: Mapping[str, Any], source: str) -> Experiment:
    """The :class:`~coar_dask.core.experiment.Experiment` a record describes, for a command that will
    run it: :func:`check_recorded` first (nothing is imported), then
    :meth:`~coar_dask.core.experiment.Experiment.from_dict`. Read a record that is only shown or
    compared with ``Experiment.from_dict`` (it imports nothing either)."""
    check_recorded(data, source)
    return Experiment.from_dict(data, source=source)


@contextlib.contextmanager
def trust_recorded(paths: Iterable[str] | None = None) -> Iterator[None]:
    """Agree to import the code that stores' and attributions' experiment records name, in this block.

    Parameters
    ----------
    paths
        The import paths agreed to (e.g. ``["mypackage.models:load_model"]``);
        ``None``: every path a record names.

    Examples
    --------
    >>> import coar_dask
    >>> with coar_dask.trust_recorded(["mypackage.models:load_model"]):   # doctest: +SKIP
    ...     coar_dask.run_build("store", None)
    """
    if isinstance(paths, str):
        paths = [paths]
    token = _AGREED.set(True if paths is None else frozenset(str(p).strip() for p in paths))
    try:
        yield
    finally:
        _AGREED.reset(token)
