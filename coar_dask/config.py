"""coar_dask's defaults in dask's config (``dask.config.get("coar-dask....")``).

The packaged ``coar_dask.yaml`` is loaded into dask's defaults when this module
is imported, in memory only, the way dask-jobqueue does; nothing is written.
``coar-dask config --write`` (:func:`write_user_config`) puts a commented copy
in dask's user config folder for a user to edit.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.config
import yaml
from dask.utils import parse_timedelta

from coar_dask.errors import ConfigError

__all__ = ["DEFAULTS_FILE", "SLURM_EXAMPLE_FILE", "factory_timeout", "load_defaults", "user_config_path",
           "worker_dask_config", "write_user_config"]

#: The packaged defaults, commented.
DEFAULTS_FILE = Path(__file__).with_name("coar_dask.yaml")
#: A commented SLURM settings file (``coar-dask config slurm --example`` prints it).
SLURM_EXAMPLE_FILE = Path(__file__).with_name("slurm.yaml")


def load_defaults() -> None:
    """Put the packaged defaults into dask's config (idempotent, no file written)."""
    with open(DEFAULTS_FILE) as f:
        dask.config.update_defaults(yaml.safe_load(f))


def factory_timeout(value: object = None) -> float | None:
    """Seconds a factory may run on its first load (``coar-dask.factory-timeout``); ``None``: no limit.

    ``value`` (not ``None``) overrides the config: a number of seconds, a
    duration such as ``"10m"``, or ``0`` / ``False`` / ``"off"`` for no limit.
    ``None`` reads the config, where ``null`` also means no limit.

    >>> factory_timeout("90s"), factory_timeout(0)
    (90.0, None)
    >>> with dask.config.set({"coar-dask.factory-timeout": "2m"}):
    ...     factory_timeout()
    120.0
    """
    value = dask.config.get("coar-dask.factory-timeout", None, override_with=value)
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    try:
        seconds = float(parse_timedelta(value, default="seconds"))
    except (AttributeError, TypeError, ValueError, KeyError):
        raise ConfigError(f"coar-dask.factory-timeout must be a duration such as '10m' or '90s', or 0 / null for "
                          f"no limit; found {value!r}.") from None
    if seconds < 0:
        raise ConfigError(f"coar-dask.factory-timeout must not be negative; found {value!r} (0 or null: no limit).")
    return seconds or None


def worker_dask_config(value: object = None) -> dict[str, str]:
    """Dask settings that clusters coar_dask starts give their workers: the profiler's sampling
    interval from ``coar-dask.worker-profile-interval`` (``{}`` when it is null: dask's own).

    ``value`` (not ``None``) overrides the config: a duration, or ``False`` /
    ``"null"`` for dask's own interval.

    >>> worker_dask_config("250ms")
    {'distributed.worker.profile.interval': '250ms'}
    >>> worker_dask_config(False)
    {}
    >>> with dask.config.set({"coar-dask.worker-profile-interval": "0.2s"}):
    ...     worker_dask_config()
    {'distributed.worker.profile.interval': '200ms'}
    """
    value = dask.config.get("coar-dask.worker-profile-interval", None, override_with=value)
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return {}
    try:
        seconds = float(parse_timedelta(value, default="seconds"))
    except (AttributeError, TypeError, ValueError, KeyError):
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"coar-dask.worker-profile-interval must be a positive duration such as '100ms', or null "
                          f"for dask's own distributed.worker.profile.interval; found {value!r}.")
    return {"distributed.worker.profile.interval": f"{round(seconds * 1000, 3):g}ms"}


def user_config_path() -> Path:
    """Where :func:`write_user_config` writes: dask's user config folder."""
    return Path(dask.config.PATH) / DEFAULTS_FILE.name


def write_user_config(path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Path:
    """Write the commented defaults to ``path`` (default: :func:`user_config_path`).

    An existing file is kept unless ``overwrite``; returns the path.
    """
    target = Path(path) if path is not None else user_config_path()
    if target.exists() and not overwrite:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(DEFAULTS_FILE.read_text())
    return target


load_defaults()
