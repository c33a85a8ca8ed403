"""Components of an ``nn.Module``: enumerate, select by name, index both ways.

A *component* is one unit whose weights COAR zeroes: an output channel of a
``Conv2d`` (its ``weight[c]`` slice) or an output row of a ``Linear``
(``weight[r]``). Components are numbered layer by layer in
``model.named_modules()`` order, so flat index ``j`` maps to ``(layer, unit)``
through cumulative offsets, vectorised with ``np.searchsorted``.

New kinds register a :class:`ComponentKind` in :data:`KINDS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import ExperimentError

__all__ = ["ComponentKind", "ComponentGroup", "Components", "select_components", "KINDS"]


@dataclass(frozen=True)
class ComponentKind:
    """How one kind of module splits into units.

    ``matches(module)`` says whether a module is of this kind; ``param`` names
    the weight tensor; units are slices along ``axis`` of it, ``count(module)``
    of them.
    """

    name: str
    matches: Callable[[Any], bool]
    param: str
    axis: int
    count: Callable[[Any], int]
    doc: str = ""


def _builtin_kinds() -> dict[str, ComponentKind]:
    from torch import nn

    return {
        "conv2d": ComponentKind(
            "conv2d", lambda m: isinstance(m, nn.Conv2d), "weight", 0,
            lambda m: m.out_channels, "Conv2d output channel: weight[c, :, :, :]",
        ),
        "linear": ComponentKind(
            "linear", lambda m: isinstance(m, nn.Linear), "weight", 0,
            lambda m: m.out_features, "Linear output neuron: weight[r, :]",
        ),
    }


#: Registered component kinds, by name.
KINDS: dict[str, ComponentKind] = {}


def _kinds() -> dict[str, ComponentKind]:
    if not KINDS:
        KINDS.update(_builtin_kinds())
    return KINDS


@dataclass(frozen=True)
class ComponentGroup:
    """The units of one module: ``n_units`` slices of ``module.<param>`` along ``axis``."""

    module: str
    kind: str
    param: str
    axis: int
    n_units: int


class Components:
    """An ordered set of component groups with flat indexing.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    >>> comps = select_components(model)
    >>> len(comps), comps.locate([0, 5])
    (7, (['0', '2'], array([0, 1])))
    """

    def __init__(self, groups: Sequence[ComponentGroup]):
        self.groups = tuple(groups)
        self.offsets = np.concatenate([[0], np.cumsum([g.n_units for g in self.groups])]).astype(np.int64)
        self._by_module = {g.module: i for i, g in enumerate(self.groups)}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"<Components: {len(self)} units in {len(self.groups)} layers>"

    def locate(self, indices: Iterable[int] | np.ndarray) -> tuple[list[str], np.ndarray]:
        """Module names and unit indices of flat component indices (vectorised)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"component indices must lie in [0, {len(self)}); got {idx.min()}..{idx.max()}")
        g = np.searchsorted(self.offsets, idx, side="right") - 1
        return [self.groups[i].module for i in g], idx - self.offsets[g]

    def group_index(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Index into :attr:`groups` of each flat component index."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return np.searchsorted(self.offsets, idx, side="right") - 1

    def index(self, module: str, units: Iterable[int] | np.ndarray | None = None) -> np.ndarray:
        """Flat indices of ``units`` of layer ``module`` (all its units by default)."""
        if module not in self._by_module:
            raise KeyError(f"no selected layer named {module!r}; layers: {[g.module for g in self.groups][:10]}...")
        i = self._by_module[module]
        n = self.groups[i].n_units
        u = np.arange(n) if units is None else np.asarray(units, dtype=np.int64).reshape(-1)
        if u.size and (u.min() < 0 or u.max() >= n):
            raise IndexError(f"layer {module!r} has {n} units; got unit {u.min()}..{u.max()}")
        return self.offsets[i] + u

    def layer_slice(self, module: str) -> slice:
        """The contiguous flat-index range of one layer."""
        i = self._by_module[module]
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def ablated_units(self, mask: np.ndarray) -> list[tuple[ComponentGroup, np.ndarray]]:
        """For a mask (True = kept), each group with the units it ablates (non-empty only)."""
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.size != len(self):
            raise ExperimentError(f"mask has {mask.size} entries but there are {len(self)} components.")
        out = []
        for i, g in enumerate(self.groups):
            units = np.flatnonzero(~mask[self.offsets[i] : self.offsets[i + 1]])
            if units.size:
                out.append((g, units))
        return out

    def summary(self) -> dict[str, Any]:
        """Layers with their kind and unit count, and the total (JSON-able)."""
        return {
            "layers": [
                {"module": g.module, "kind": g.kind, "units": g.n_units, "start": int(s)}
                for g, s in zip(self.groups, self.offsets[:-1])
            ],
            "total": len(self),
        }


def _compile(patterns: Iterable[str] | str | None, field: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ExperimentError(f"components.{field} pattern {p!r} is not a valid regex: {exc}") from None
    return out


def select_components(
    model: Any,
    *,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    kinds: Iterable[str] = ("conv2d", "linear"),
) -> Components:
    """Select the components of ``model``.

    Parameters
    ----------
    model
        A ``torch.nn.Module``.
    include, exclude
        Regular expressions searched in module names (``named_modules()``): a
        module is selected when it matches some ``include`` pattern (or none
        are given) and no ``exclude`` pattern. The seed's CIFAR setup is
        ``include=["conv"], kinds=["conv2d"]``.
    kinds
        Component kinds to consider (see :data:`KINDS`).
    """
    registry = _kinds()
    unknown = [k for k in kinds if k not in registry]
    if unknown:
        raise ExperimentError(f"unknown component kinds {unknown}; known kinds: {sorted(registry)}.")
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    groups = []
    for name, module in model.named_modules():
        if not name:
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        for kname in kinds:
            kind = registry[kname]
            if kind.matches(module):
                groups.append(ComponentGroup(name, kname, kind.param, kind.axis, int(kind.count(module))))
                break
    if not groups:
        raise ExperimentError(
            f"no components selected: no module of kinds {list(kinds)} matches include={include!r} "
            f"exclude={exclude!r}. List the model's modules with `coar-dask components` and adjust."
        )
    return Components(groups)
