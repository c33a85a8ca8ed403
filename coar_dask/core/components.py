"""Components of an ``nn.Module``: enumerate, select by name, index both ways.

A *component* is one unit whose weights COAR zeroes. The kinds of the paper's
setups are registered in :data:`KINDS`:

``conv2d``
    ``nn.Conv2d`` output channel ``c``: ``weight[c, :, :, :]``. The channel
    then outputs its bias (or 0), everywhere.
``linear``
    ``nn.Linear`` output neuron ``r``: ``weight[r, :]``. The neuron then
    outputs its bias (or 0).
``mha_in_proj``
    ``nn.MultiheadAttention`` in-projection row ``r``: ``in_proj_weight[r, :]``
    (rows ``0..E-1`` are the query features, ``E..2E-1`` the keys,
    ``2E..3E-1`` the values), as torchvision's ViT is ablated. The ``out_proj``
    of the same attention is an ``nn.Linear`` and selected by ``linear``.
``conv1d``
    GPT-2's ``Conv1D`` (Hugging Face ``transformers.pytorch_utils.Conv1D``,
    matched by class name so ``transformers`` need not be installed): a linear
    layer whose ``weight`` is stored **transposed**, as ``(in, out)``, and
    applied as ``x @ weight + bias``. The seed's GPT-2 code zeroes
    ``weight[idx]`` -- rows of the stored tensor, i.e. **input** features --
    so a unit here is input feature ``i``: ablating it removes feature ``i`` of
    the layer's input from every output (the bias is kept). That is why
    ``attn.c_attn`` has 768 units (its input width) and not 2,304, and
    ``mlp.c_proj`` has 3,072. We keep the seed's axis so that stores and
    attributions are interchangeable with the reference implementation.

Zeroing a unit zeroes its weights only: biases and normalisation layers keep
their values (the seed's semantics).

Components are numbered layer by layer in ``model.named_modules()`` order (the
seed's order), so flat index ``j`` maps to ``(layer, unit)`` through
cumulative offsets, vectorised with ``np.searchsorted``; names like
``"layer1.0.conv2[17]"`` convert both ways (:meth:`Components.names`,
:meth:`Components.find`).

New kinds register a :class:`ComponentKind` in :data:`KINDS` (see
:func:`register_kind`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from coar_dask.errors import ExperimentError

__all__ = [
    "ComponentKind",
    "ComponentGroup",
    "Components",
    "select_components",
    "register_kind",
    "KINDS",
]

#: Where a batched (several masks per forward pass) evaluation can express an
#: ablated unit with a forward hook: ``"output"`` -- the unit is a feature of
#: the module's output, which becomes the bias value (weight zeroed, bias
#: kept); ``"input"`` -- the unit is a feature of the module's input, which
#: becomes 0. ``None``: no hook can express it (in-place zeroing is used).
UNIT_SITES = ("output", "input")


@dataclass(frozen=True)
class ComponentKind:
    """How one kind of module splits into units.

    Parameters
    ----------
    name
        Registry key (``"conv2d"``).
    matches
        ``matches(module) -> bool``: whether a module is of this kind.
    param
        Name of the weight tensor whose slices are zeroed.
    axis
        Axis of ``param`` along which units are slices.
    count
        ``count(module) -> int``: number of units.
    doc
        One line for listings.
    site
        Where a forward hook sees the unit (see :data:`UNIT_SITES`), or
        ``None`` when only in-place zeroing expresses the ablation.
    feature_dim
        Dimension of the unit in the module's output (``site="output"``) or
        first input (``site="input"``): 1 for ``(N, C, H, W)`` conv maps, -1 for
        ``(..., features)``.
    bias
        Name of the bias an ablated output unit still emits (``site="output"``).
    """

    name: str
    matches: Callable[[Any], bool]
    param: str
    axis: int
    count: Callable[[Any], int]
    doc: str = ""
    site: str | None = None
    feature_dim: int = -1
    bias: str | None = None

    def __post_init__(self) -> None:
        if self.site is not None and self.site not in UNIT_SITES:
            raise ValueError(f"ComponentKind.site must be one of {UNIT_SITES} or None; found {self.site!r}.")


def _is_hf_conv1d(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and getattr(weight, "ndim", 0) == 2


def _builtin_kinds() -> dict[str, ComponentKind]:
    from torch import nn

    return {
        "conv2d": ComponentKind(
            "conv2d", lambda m: isinstance(m, nn.Conv2d), "weight", 0, lambda m: m.out_channels,
            "Conv2d output channel: weight[c, :, :, :]", site="output", feature_dim=1, bias="bias",
        ),
        "linear": ComponentKind(
            "linear", lambda m: isinstance(m, nn.Linear), "weight", 0, lambda m: m.out_features,
            "Linear output neuron: weight[r, :]", site="output", feature_dim=-1, bias="bias",
        ),
        "mha_in_proj": ComponentKind(
            "mha_in_proj",
            lambda m: isinstance(m, nn.MultiheadAttention) and getattr(m, "in_proj_weight", None) is not None,
            "in_proj_weight", 0, lambda m: m.in_proj_weight.shape[0],
            "MultiheadAttention in-projection row (q, k, v features): in_proj_weight[r, :]",
        ),
        "conv1d": ComponentKind(
            "conv1d", _is_hf_conv1d, "weight", 0, lambda m: m.weight.shape[0],
            "GPT-2 Conv1D input feature: weight[i, :] (weight stored (in, out), as the seed zeroes it)",
            site="input", feature_dim=-1,
        ),
    }


#: Registered component kinds, by name (filled on first use, so importing this
#: module does not import torch).
KINDS: dict[str, ComponentKind] = {}


def _kinds() -> dict[str, ComponentKind]:
    if not KINDS:
        KINDS.update(_builtin_kinds())
    return KINDS


def register_kind(kind: ComponentKind, *, replace: bool = False) -> None:
    """Add a component kind to :data:`KINDS` (``replace=True`` to redefine one)."""
    registry = _kinds()
    if kind.name in registry and not replace:
        raise ExperimentError(f"component kind {kind.name!r} already exists; pass replace=True to redefine it.")
    registry[kind.name] = kind


def get_kind(name: str) -> ComponentKind:
    """The registered kind ``name``."""
    registry = _kinds()
    try:
        return registry[name]
    except KeyError:
        raise ExperimentError(f"unknown component kind {name!r}; known kinds: {sorted(registry)}.") from None


@dataclass(frozen=True)
class ComponentGroup:
    """The units of one module: ``n_units`` slices of ``module.<param>`` along ``axis``."""

    module: str
    kind: str
    param: str
    axis: int
    n_units: int


_NAME_RE = re.compile(r"^(?P<module>.+?)\[(?P<unit>-?\d+)\]$")


class Components:
    """An ordered set of component groups with flat indexing, both ways.

    Flat index ``j`` is unit ``j - offsets[g]`` of group ``g``, where
    ``offsets`` are the cumulative unit counts. A component's name is
    ``"<module>[<unit>]"``.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    >>> comps = select_components(model)
    >>> len(comps), comps.locate([0, 5])
    (7, (['0', '2'], array([0, 1])))
    >>> comps.names([0, 5]), comps.find(["2[1]", "0"]).tolist()
    (['0[0]', '2[1]'], [5, 0, 1, 2, 3])
    """

    def __init__(self, groups: Sequence[ComponentGroup]):
        self.groups = tuple(groups)
        counts = np.asarray([g.n_units for g in self.groups], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._by_module = {g.module: i for i, g in enumerate(self.groups)}
        if len(self._by_module) != len(self.groups):
            raise ExperimentError("component groups must name distinct modules.")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"<Components: {len(self)} units in {len(self.groups)} layers>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Components) and self.groups == other.groups

    __hash__ = None  # type: ignore[assignment]

    @property
    def modules(self) -> list[str]:
        """Names of the selected layers, in component order."""
        return [g.module for g in self.groups]

    # -- flat index -> (layer, unit) ---------------------------------------
    def _flat(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices if not np.isscalar(indices) else [indices], dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"component indices must lie in [0, {len(self)}); got {idx.min()}..{idx.max()}")
        return idx

    def group_index(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Index into :attr:`groups` of each flat component index (vectorised)."""
        return np.searchsorted(self.offsets, self._flat(indices), side="right") - 1

    def locate(self, indices: Iterable[int] | np.ndarray) -> tuple[list[str], np.ndarray]:
        """Module names and unit indices of flat component indices (vectorised)."""
        idx = self._flat(indices)
        g = np.searchsorted(self.offsets, idx, side="right") - 1
        return [self.groups[i].module for i in g], idx - self.offsets[g]

    def names(self, indices: Iterable[int] | np.ndarray | None = None) -> list[str]:
        """``"<module>[<unit>]"`` of flat indices (all components by default)."""
        idx = np.arange(len(self)) if indices is None else self._flat(indices)
        modules, units = self.locate(idx)
        return [f"{m}[{u}]" for m, u in zip(modules, units.tolist())]

    # -- (layer, unit) -> flat index ---------------------------------------
    def index(self, module: str, units: Iterable[int] | np.ndarray | None = None) -> np.ndarray:
        """Flat indices of ``units`` of layer ``module`` (all its units by default)."""
        if module not in self._by_module:
            close = [m for m in self._by_module if module in m][:5] or self.modules[:5]
            raise KeyError(f"no selected layer named {module!r}; e.g. {close}")
        i = self._by_module[module]
        n = self.groups[i].n_units
        u = np.arange(n) if units is None else np.asarray(units, dtype=np.int64).reshape(-1)
        if u.size and (u.min() < 0 or u.max() >= n):
            raise IndexError(f"layer {module!r} has {n} units; got unit {u.min()}..{u.max()}")
        return self.offsets[i] + u

    def find(self, names: str | Iterable[str]) -> np.ndarray:
        """Flat indices of names: ``"module[unit]"`` is one component, ``"module"`` all of a layer's.

        Names are resolved in order and concatenated.
        """
        if isinstance(names, str):
            names = [names]
        parts = []
        for name in names:
            if name in self._by_module:
                parts.append(self.index(name))
                continue
            match = _NAME_RE.match(name)
            if match is None:
                raise KeyError(f"{name!r} is neither a selected layer nor 'layer[unit]'")
            parts.append(self.index(match["module"], [int(match["unit"])]))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def layer_slice(self, module: str) -> slice:
        """The contiguous flat-index range of one layer."""
        if module not in self._by_module:
            raise KeyError(f"no selected layer named {module!r}")
        i = self._by_module[module]
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def layers_matching(self, pattern: str) -> list[str]:
        """Selected layers whose name matches the regular expression ``pattern`` (``re.search``)."""
        regex = re.compile(pattern)
        return [m for m in self.modules if regex.search(m)]

    # -- masks -------------------------------------------------------------
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

    # -- listings ----------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Layers with their kind, unit count and first flat index, and the total (JSON-able)."""
        return {
            "layers": [
                {"module": g.module, "kind": g.kind, "units": g.n_units, "start": int(s)}
                for g, s in zip(self.groups, self.offsets[:-1])
            ],
            "total": len(self),
        }

    def table(self) -> str:
        """The summary as aligned text: one line per layer, then the total."""
        rows = [(g.module, g.kind, str(g.n_units), f"{int(s)}-{int(s) + g.n_units - 1}")
                for g, s in zip(self.groups, self.offsets[:-1])]
        head = ("layer", "kind", "units", "indices")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head)] + [fmt.format(*r) for r in rows]
        lines.append(f"total: {len(self):,} components in {len(self.groups)} layers")
        return "\n".join(lines)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> "Components":
        """Rebuild from :meth:`summary` (no model needed); ``param``/``axis`` come from the kinds."""
        groups = []
        for layer in summary["layers"]:
            kind = get_kind(layer["kind"])
            groups.append(ComponentGroup(layer["module"], kind.name, kind.param, kind.axis, int(layer["units"])))
        comps = cls(groups)
        if "total" in summary and int(summary["total"]) != len(comps):
            raise ExperimentError(f"summary total {summary['total']} != sum of its layers {len(comps)}.")
        return comps


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
        A ``torch.nn.Module`` (on any device, ``meta`` included: only shapes are read).
    include, exclude
        Regular expressions searched in module names (``named_modules()``): a
        module is selected when it matches some ``include`` pattern (or none
        are given) and no ``exclude`` pattern. The seed's CIFAR setup is
        ``include=["conv"], kinds=["conv2d"]``.
    kinds
        Component kinds to consider (see :data:`KINDS`); a module is taken by
        the first kind in this order that matches it.

    Returns
    -------
    Components
        Groups in ``named_modules()`` order.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
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
