"""A package's re-exported names, imported from their modules when first used (PEP 562).

A package lists what it re-exports as ``name -> module``; :func:`lazy_exports`
gives it the module ``__getattr__`` and ``__dir__`` that import the module on
first access, so importing the package stays light and a module being
changed elsewhere does not break the packages that merely re-export it. Names
that moved keep working for a release: reaching one through its old package
warns (:class:`DeprecationWarning`) and says where it lives now.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]

#: The release from which the moved top-level aliases are gone.
ALIASES_REMOVED_IN = "0.3"


def lazy_exports(
    namespace: dict[str, Any],
    exports: Mapping[str, str],
    moved: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose globals are ``namespace``.

    Parameters
    ----------
    namespace
        The package's ``globals()``: a re-exported name is stored there once
        imported, so later lookups do not come back here.
    exports
        ``name -> module`` (absolute) of the names the package re-exports.
    moved
        ``name -> module`` of old names that now live elsewhere: each access
        warns with a :class:`DeprecationWarning` naming the new home (not
        cached, so every use is seen).

    Examples
    --------
    >>> ns = {"__name__": "pkg"}
    >>> getattr_, dir_ = lazy_exports(ns, {"sqrt": "math"}, {"pi": "math"})
    >>> getattr_("sqrt")(4.0), "sqrt" in ns, dir_()
    (2.0, True, ['__name__', 'sqrt'])
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     round(getattr_("pi"), 2), str(caught[0].message).split(";")[0]
    (3.14, 'pkg.pi is deprecated: import it from math (from math import pi)')
    """
    moved = dict(moved or {})
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        if name in moved:
            home = moved[name]
            warnings.warn(
                f"{package}.{name} is deprecated: import it from {home} (from {home} import {name}); "
                f"the alias is removed in coar_dask {ALIASES_REMOVED_IN}.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(home), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
