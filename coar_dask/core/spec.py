"""The store spec: the research code's JSON format, parsed and validated.

A spec says how many rows a store has and which named arrays each row holds::

    {"num_models": 50000,
     "schema": {"masks": {"dtype": "bool_", "shape": [2304]},
                "val_margins": {"dtype": "float16", "shape": [10000]}}}

``dtype`` is the name of a numpy attribute (``np.bool_``, ``np.float16``), as
in the seed; ``_completed`` is reserved for the per-row completion flags.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from coar_dask.errors import SpecError

__all__ = ["ArraySpec", "Spec", "load_spec", "RESERVED_NAMES", "STORE_DTYPES", "MAX_NUM_MODELS"]

#: Names a schema may not use: the store keeps its own arrays and files under them.
RESERVED_NAMES = frozenset({"_completed", "_digests", "zarr.json", "coar_dask.claim.json"})
#: The numpy dtypes a store holds (zarr v3's bool, integer and float types).
STORE_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                          "float16", "float32", "float64"})
#: Most rows a store holds: its completion flags (one byte a row) are read whole, and a build
#: plans one task per block; the paper's stores have 50,000-200,000 rows.
MAX_NUM_MODELS = 100_000_000
#: Longest array name: it becomes a folder name (255 bytes on most filesystems).
_MAX_NAME_BYTES = 200

_HOW_TO = (
    'A spec looks like {"num_models": 1000, "schema": {"masks": {"dtype": "bool_", '
    '"shape": [2304]}, "val_margins": {"dtype": "float16", "shape": [10000]}}}.'
)


def _parse_dtype(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"schema['{name}']['dtype'] must be the name of a numpy type such as "
            f"'bool_', 'float16' or 'float32'; found {value!r}."
        )
    attr = getattr(np, value, None)
    try:
        dtype = np.dtype(attr) if attr is not None else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise SpecError(
            f"schema['{name}']['dtype'] is {value!r}, which is not a numpy boolean, "
            f"integer or float type. Use a numpy attribute name such as 'bool_', "
            f"'float16', 'float32' or 'int64'."
        )
    if dtype.name not in STORE_DTYPES:
        raise SpecError(
            f"schema['{name}']['dtype'] is {value!r} ({dtype.name}), which a zarr store cannot hold; "
            f"use one of {sorted(STORE_DTYPES)} (e.g. 'float64' for {value!r})."
        )
    return value


def _check_name(name: Any) -> None:
    """An array name becomes a folder of the store: refuse names that are not a plain folder name."""
    if not isinstance(name, str) or not name:
        raise SpecError(f"schema names must be non-empty strings; found {name!r}.")
    if name in RESERVED_NAMES:
        raise SpecError(
            f"schema name {name!r} is reserved for the store's own arrays and files "
            f"({sorted(RESERVED_NAMES)}); rename that array."
        )
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if bad or name in (".", "..") or name.strip() != name or not name.isprintable() \
            or len(name.encode()) > _MAX_NAME_BYTES or name.startswith("."):
        raise SpecError(
            f"schema name {name!r} cannot name a folder of the store (no '/', '\\', NUL or other control "
            f"characters, not '.' or '..', no leading dot or surrounding spaces, at most {_MAX_NAME_BYTES} "
            f"bytes); use letters, digits, '_' and '-', e.g. 'val_margins'."
        )


def _parse_shape(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SpecError(
            f"schema['{name}']['shape'] must be a list of positive integers such as "
            f"[2304]; found {value!r}."
        )
    shape = []
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise SpecError(
                f"schema['{name}']['shape'] must hold positive integers; found {dim!r} "
                f"in {list(value)!r}. Write each dimension as a whole number >= 1."
            )
        shape.append(dim)
    return tuple(shape)


@dataclass(frozen=True)
class ArraySpec:
    """One named array of a row: its numpy dtype name and per-row shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "dtype", _parse_dtype(self.name, self.dtype))
        object.__setattr__(self, "shape", _parse_shape(self.name, self.shape))

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of the array (canonical: ``np.longlong`` is ``int64``)."""
        return np.dtype(np.dtype(getattr(np, self.dtype)).name)

    @property
    def row_nbytes(self) -> int:
        """Uncompressed bytes one row of this array takes."""
        return int(np.prod(self.shape)) * self.np_dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Spec:
    """A parsed, validated store spec.

    Use :meth:`from_dict`, :meth:`from_json` or :func:`load_spec` to build one
    from the seed's JSON; :meth:`to_dict` gives the JSON back unchanged.
    """

    num_models: int
    schema: tuple[ArraySpec, ...]

    def __post_init__(self) -> None:
        n = self.num_models
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise SpecError(
                f"'num_models' must be a positive integer (the number of rows); found {n!r}."
            )
        if n > MAX_NUM_MODELS:
            raise SpecError(
                f"'num_models' is {n:,}, more rows than a store holds (at most {MAX_NUM_MODELS:,}: its "
                f"completion flags are read whole); split the rows over several stores."
            )
        if not self.schema:
            raise SpecError(f"'schema' must name at least one array. {_HOW_TO}")
        names = [a.name for a in self.schema]
        if len(set(names)) != len(names):
            raise SpecError(f"schema names must be unique; found {names}.")

    # -- construction -----------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> "Spec":
        """Validate the seed's spec dictionary and build a :class:`Spec`."""
        if not isinstance(data, Mapping):
            raise SpecError(f"A spec must be a JSON object; found {type(data).__name__}. {_HOW_TO}")
        missing = [k for k in ("num_models", "schema") if k not in data]
        if missing:
            raise SpecError(f"The spec is missing {', '.join(repr(m) for m in missing)}. {_HOW_TO}")
        unknown = sorted(set(data) - {"num_models", "schema"})
        if unknown:
            raise SpecError(
                f"The spec has unknown keys {unknown}; valid keys are 'num_models' and 'schema'."
            )
        schema = data["schema"]
        if not isinstance(schema, Mapping):
            raise SpecError(f"'schema' must be an object of name -> {{dtype, shape}}. {_HOW_TO}")
        arrays = []
        for name, entry in schema.items():
            if name in RESERVED_NAMES:
                raise SpecError(
                    f"schema name {name!r} is reserved for the store's own arrays and files; "
                    f"remove it from the spec (the store adds it itself)."
                )
            if not isinstance(entry, Mapping) or set(entry) != {"dtype", "shape"}:
                raise SpecError(
                    f"schema['{name}'] must be an object with exactly 'dtype' and 'shape'; "
                    f"found {entry!r}."
                )
            arrays.append(ArraySpec(name=name, dtype=entry["dtype"], shape=entry["shape"]))
        return cls(num_models=data["num_models"], schema=tuple(arrays))

    @classmethod
    def from_json(cls, text: str, *, source: str = "spec") -> "Spec":
        """Parse a spec from JSON text; ``source`` names it in errors."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno}). {_HOW_TO}"
            ) from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The spec as the seed's JSON dictionary."""
        return {
            "num_models": self.num_models,
            "schema": {a.name: a.to_dict() for a in self.schema},
        }

    # -- derived ----------------------------------------------------------
    def canonical_json(self) -> str:
        """JSON with sorted keys and no spaces: the input of :attr:`sha256`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Fingerprint of the spec, stored in the store's attributes."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.schema)

    def __getitem__(self, name: str) -> ArraySpec:
        for a in self.schema:
            if a.name == name:
                return a
        raise KeyError(
            f"the spec has no array named {name!r}; it has {list(self.names)}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def with_num_models(self, num_models: int) -> "Spec":
        """The same schema with another row count (e.g. for an evaluation store)."""
        return Spec(num_models=num_models, schema=self.schema)

    @classmethod
    def for_experiment(
        cls,
        num_models: int,
        n_components: int,
        n_outputs: int,
        *,
        x_name: str = "masks",
        y_name: str = "margins",
        y_dtype: str = "float16",
    ) -> "Spec":
        """The usual two-array spec: ``masks`` bool[P] and outputs ``y_dtype``[K]."""
        return cls.from_dict(
            {
                "num_models": num_models,
                "schema": {
                    x_name: {"dtype": "bool_", "shape": [n_components]},
                    y_name: {"dtype": y_dtype, "shape": [n_outputs]},
                },
            }
        )


def load_spec(source: str | os.PathLike | Mapping[str, Any] | Spec) -> Spec:
    """Load a spec from a JSON file path, a dictionary, or pass a :class:`Spec` through.

    Examples
    --------
    >>> spec = load_spec({"num_models": 10,
    ...                   "schema": {"masks": {"dtype": "bool_", "shape": [4]}}})
    >>> spec.num_models, spec["masks"].shape
    (10, (4,))
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, Mapping):
        return Spec.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise SpecError(
            f"spec file {str(path)!r} does not exist or is not a file; pass the path "
            f"of a JSON spec."
        )
    return Spec.from_json(path.read_text(), source=f"spec file {str(path)!r}")
