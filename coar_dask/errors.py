"""Error hierarchy of coar_dask.

Every error the package raises on bad input is a :class:`CoarError`, and also
subclasses the standard exception a caller would expect (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` keeps working. The CLI
turns a :class:`CoarError` into a one-line message and exit code 2.
"""

from __future__ import annotations

__all__ = [
    "BetonError",
    "BetonNotFoundError",
    "NotBatchableError",
    "OutputError",
    "CoarError",
    "SpecError",
    "StoreError",
    "StoreNotFoundError",
    "StoreMismatchError",
    "SchedulerLostError",
    "CorruptBlockError",
    "ExperimentError",
    "FactoryError",
    "FactoryTimeoutError",
    "ConfigError",
    "MissingDependencyError",
    "BuildError",
    "RegressionError",
    "UntrustedCodeError",
]


class CoarError(Exception):
    """Base class of every error raised by coar_dask on bad input or state."""


class SpecError(CoarError, ValueError):
    """A store spec (the seed's JSON format) is malformed."""


class StoreError(CoarError, ValueError):
    """A store exists but cannot be used as asked."""


class StoreNotFoundError(CoarError, FileNotFoundError):
    """No coar_dask store at the given path."""


class StoreMismatchError(StoreError):
    """A store was made from another spec, experiment or chunking."""


class CorruptBlockError(StoreError):
    """A completed block's chunks are missing, damaged, or not the ones written for it.

    Its message names the block and ``coar-dask repair``, which marks it pending
    so the next build recomputes it.
    """


class ExperimentError(CoarError, ValueError):
    """An experiment description is invalid or does not fit its store."""


class FactoryError(ExperimentError):
    """An experiment's model or examples factory raised, exited, or returned nothing usable.

    Its message names the factory (``package.module:function``) and what to fix.
    """


class FactoryTimeoutError(FactoryError, TimeoutError):
    """A factory did not return within ``coar-dask.factory-timeout`` on the first load."""


class ConfigError(CoarError, ValueError):
    """A YAML/CLI configuration has unknown keys or bad values."""


class MissingDependencyError(CoarError, ImportError):
    """An optional dependency is needed but not installed."""


class BuildError(CoarError, RuntimeError):
    """A build could not complete some blocks."""


class SchedulerLostError(CoarError, ConnectionError):
    """The client lost its Dask scheduler (stopped, crashed or unreachable) while tasks were running."""


class OutputError(ExperimentError):
    """An output function cannot be computed from what the model returned or the examples hold."""


class NotBatchableError(ExperimentError):
    """The model or a component kind cannot be ablated with forward hooks; use in-place zeroing."""


class BetonError(CoarError, ValueError):
    """A ``.beton`` file is not one this package can read or write as asked."""


class BetonNotFoundError(BetonError, FileNotFoundError):
    """No ``.beton`` file at the given path."""


class RegressionError(CoarError, ValueError):
    """A regression cannot be run on the given data."""


class UntrustedCodeError(CoarError, PermissionError):
    """A store's or attributions file's record names code the user has not agreed to import
    (:mod:`coar_dask.core.trust`)."""


def missing_dependency(package: str, extra: str, purpose: str) -> MissingDependencyError:
    """Build the error raised when an optional dependency is absent."""
    return MissingDependencyError(
        f"{purpose} needs the optional package '{package}', which is not installed. "
        f"Install it with: pip install 'coar_dask[{extra}]'"
    )
