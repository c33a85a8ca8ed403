"""Fitted attributions: weights in mask units, their file format and their sign convention."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from coar_dask.core.output_paths import write_atomically
from coar_dask.core.store import Store
from coar_dask.errors import RegressionError, StoreMismatchError, missing_dependency
from coar_dask.fit import summaries

__all__ = ["Attributions", "TopComponents", "SIGN_CONVENTION", "plain_metadata", "component_names"]

logger = logging.getLogger(__name__)

SIGN_CONVENTION = (
    "weights in mask units: prediction = mask @ weight + bias, mask 1 = kept; "
    "a positive weight means keeping the component raises the output"
)


def plain_metadata(value: Any, where: str = "metadata") -> Any:
    """``value`` as plain Python data that ``torch.load(weights_only=True)`` accepts.

    NumPy scalars become Python numbers, arrays become lists,
    paths become strings and mapping keys strings; anything else raises
    :class:`RegressionError` naming where it was found, so that a file that
    could not be loaded is never written.
    """
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass, yet unpicklable safely
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return plain_metadata(value.tolist(), where)
    if isinstance(value, Mapping):
        return {str(k): plain_metadata(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise RegressionError(
        f"{where} holds a {type(value).__name__}, which an attributions file cannot store safely; "
        f"use numbers, strings, lists or dicts."
    )


def component_names(summary: Mapping[str, Any] | None, total: int | None = None) -> list[str] | None:
    """``"<module>[<unit>]"`` for every component of a components summary
    (:meth:`coar_dask.core.components.Components.summary`), in flat-index order; ``None`` without one,
    or when the summary is malformed (a file from elsewhere) or does not add up to ``total`` components
    (checked before any name is made: ``units: 3e7`` makes no 30 million names)."""
    if not isinstance(summary, Mapping) or not isinstance(summary.get("layers"), (list, tuple)):
        return None
    layers = summary["layers"]
    units = [layer.get("units") if isinstance(layer, Mapping) else None for layer in layers]
    if not layers or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in units):
        return None
    if total is not None and sum(units) != total:
        return None
    return [f"{layer.get('module')}[{u}]" for layer, n in zip(layers, units) for u in range(n)]


#: The most rows a store recorded in ``fitted_on`` may have (the paper's largest store has 200,000).
MAX_RECORDED_ROWS = 10**9


def _check_fitted_on(record: Any, bad: Any) -> None:
    """Refuse a ``fitted_on`` record whose row bitmaps are not what they say: a row count that is not an
    integer up to :data:`MAX_RECORDED_ROWS`, or a compressed bitmap that does not inflate to exactly
    that many bits (read in 1 MB pieces, so a zlib bomb costs no memory)."""
    if record is None:
        return
    stores = record.get("stores") if isinstance(record, Mapping) else None
    if not isinstance(stores, (list, tuple)):
        raise bad("metadata 'fitted_on' has no list of 'stores'")
    for i, entry in enumerate(stores):
        num_rows = entry.get("num_rows") if isinstance(entry, Mapping) else None
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or not 0 <= num_rows <= MAX_RECORDED_ROWS:
            raise bad(f"metadata 'fitted_on' store {i} has num_rows {num_rows!r}, not a row count "
                      f"(an integer from 0 to {MAX_RECORDED_ROWS:.0e})")
        if _inflated_size(entry.get("rows"), math.ceil(num_rows / 8)) != math.ceil(num_rows / 8):
            raise bad(f"metadata 'fitted_on' store {i}: its 'rows' is not a compressed bitmap of {num_rows} rows")


def _inflated_size(text: Any, limit: int) -> int:
    """Bytes that base64 + zlib ``text`` inflates to, counting no further than ``limit + 1``; -1 if unreadable."""
    try:
        data = base64.b64decode(str(text), validate=True)
        inflate, size = zlib.decompressobj(), 0
        while data and size <= limit:
            size += len(inflate.decompress(data, 1 << 20))
            data = inflate.unconsumed_tail
        if size <= limit and not inflate.eof:
            size += len(inflate.flush())  # at most a window's worth still held
        return size if inflate.eof or size > limit else -1
    except (ValueError, zlib.error):
        return -1


@dataclass(frozen=True)
class TopComponents:
    """The components with the largest positive and negative weights for one example.

    ``positive`` and ``negative`` are ``(component, weight)`` pairs, strongest
    first; a component is its name (``"layer1.0.conv2[17]"``) when the
    attributions know the names, else its flat index.
    """

    example: int
    positive: tuple[tuple[str | int, float], ...]
    negative: tuple[tuple[str | int, float], ...]

    def format(self) -> str:
        """Aligned text: one line per component, positive ones first."""
        rows = [("+", c, w) for c, w in self.positive] + [("-", c, w) for c, w in self.negative]
        width = max((len(str(c)) for _, c, _ in rows), default=9)
        lines = [f"example {self.example}: keeping a component with a positive weight raises the output"]
        lines += [f"  {sign} {str(c):<{width}}  {w:+.4g}" for sign, c, w in rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class Attributions:
    """Per-example attributions. ``weight`` (P, K), ``bias`` (K,), ``lam`` (K,).

    Sign convention: weights are in mask units, ``prediction = mask @ weight +
    bias`` with mask 1 = kept; a positive weight means keeping the component
    raises the output.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_examples(self) -> int:
        """Examples (columns) held here: the fitted target slice."""
        return int(self.weight.shape[1])

    @property
    def example_count(self) -> int | None:
        """The experiment's number of examples, when the store recorded its experiment (else ``None``)."""
        count = self.metadata.get("example_count")
        return None if count is None else int(count)

    @property
    def first_example(self) -> int:
        """The experiment's index of column 0 (the start of the fitted target slice)."""
        return int(self.metadata.get("target_slice", (0,))[0])

    @property
    def component_names(self) -> list[str] | None:
        """``"<module>[<unit>]"`` of each component (row of ``weight``), when known (else ``None``)."""
        return component_names(self.metadata.get("components"), self.n_components)

    def top_components(self, example: int, k: int = 10) -> TopComponents:
        """The ``k`` components with the most positive and the ``k`` with the most negative weight for
        ``example`` (the experiment's example index).

        Examples
        --------
        >>> a = Attributions(np.array([[0.5], [-2.0], [0.1]]), np.zeros(1), np.zeros(1))
        >>> a.top_components(0, k=1)
        TopComponents(example=0, positive=((0, 0.5),), negative=((1, -2.0),))
        """
        first = self.first_example
        column = int(example) - first
        if not 0 <= column < self.n_examples:
            raise RegressionError(
                f"example {example} is not in these attributions (examples {first} to "
                f"{first + self.n_examples - 1}); pass an example in that range."
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RegressionError(f"k must be a positive integer; found {k!r}.")
        w = np.asarray(self.weight[:, column], dtype=np.float64)
        names = self.component_names
        order = np.argsort(w, kind="stable")
        order = order[np.isfinite(w[order])]  # an unfitted component (NaN) is never ranked

        def pick(indices: np.ndarray) -> tuple[tuple[str | int, float], ...]:
            return tuple((names[i] if names else int(i), float(w[i])) for i in indices)

        return TopComponents(
            example=int(example),
            positive=pick(np.array([i for i in order[::-1][:k] if w[i] > 0], dtype=np.int64)),
            negative=pick(np.array([i for i in order[:k] if w[i] < 0], dtype=np.int64)),
        )

    def __repr__(self) -> str:
        meta = self.metadata
        how = f", {meta['solver']} on {meta['n_train']} rows" if "solver" in meta and "n_train" in meta else ""
        first, examples = self.first_example, f"{self.n_examples} examples"
        if first or (self.example_count not in (None, self.n_examples)):
            examples += f" ({first}-{first + self.n_examples - 1} of {self.example_count or '?'})"
        names = "named" if self.component_names else "unnamed"
        return f"<Attributions: {self.n_components} {names} components x {examples}{how}>"

    # -- labelled views (xarray and pandas: pip install 'coar_dask[labels]') ------------
    def _component_coords(self) -> dict[str, np.ndarray]:
        """``layer``, ``unit`` and ``name`` of each component ('' and the flat index when unnamed)."""
        summary = self.metadata.get("components")
        if self.component_names is None:
            index = np.arange(self.n_components)
            return {"layer": np.full(self.n_components, "", dtype=object), "unit": index,
                    "name": index.astype(str).astype(object)}
        layers = [(str(layer.get("module")), int(layer["units"])) for layer in summary["layers"]]
        return {"layer": np.array([m for m, n in layers for _ in range(n)], dtype=object),
                "unit": np.concatenate([np.arange(n) for _, n in layers]),
                "name": np.array(self.component_names, dtype=object)}

    def to_xarray(self) -> Any:
        """The weights as an ``xarray.DataArray`` with dims ``component`` and ``example``.

        Coordinates: ``example`` (the experiment's example indices), ``layer``,
        ``unit`` and ``name`` along ``component``, and ``label`` along
        ``example`` when the metadata records the examples' labels. Select with
        xarray, e.g. ``da.sel(example=3)`` or ``da.where(da.layer == "conv1", drop=True)``.

        Examples
        --------
        >>> a = Attributions(np.ones((3, 2)), np.zeros(2), np.zeros(2))
        >>> a.to_xarray().sizes["component"]                       # doctest: +SKIP
        3
        """
        try:
            import xarray as xr
        except ImportError:
            raise missing_dependency("xarray", "labels", "Attributions.to_xarray()") from None
        examples = np.arange(self.first_example, self.first_example + self.n_examples)
        coords: dict[str, Any] = {"example": examples}
        coords.update({k: ("component", v) for k, v in self._component_coords().items()})
        labels = self.metadata.get("labels")
        if isinstance(labels, (list, tuple)) and len(labels) == self.n_examples:
            coords["label"] = ("example", np.asarray(labels))
        return xr.DataArray(self.weight, dims=("component", "example"), coords=coords, name="weight",
                            attrs={"sign_convention": SIGN_CONVENTION})

    def to_pandas(self) -> Any:
        """The weights as a ``pandas.DataFrame``: one row per component, indexed by (``layer``, ``unit``),
        one column per example (the experiment's example index)."""
        try:
            import pandas as pd
        except ImportError:
            raise missing_dependency("pandas", "labels", "Attributions.to_pandas()") from None
        coords = self._component_coords()
        index = pd.MultiIndex.from_arrays([coords["layer"], coords["unit"]], names=["layer", "unit"])
        columns = pd.RangeIndex(self.first_example, self.first_example + self.n_examples, name="example")
        return pd.DataFrame(self.weight, index=index, columns=columns)

    def select(self, example: Any = None, layer: Any = None) -> Any:
        """The weights of some examples (an index or a list of them) and/or layers (a module name or a
        list), as an ``xarray.DataArray`` (:meth:`to_xarray`)."""
        da = self.to_xarray()
        if example is not None:
            wanted = np.atleast_1d(example)
            missing = sorted(set(wanted.tolist()) - set(da["example"].values.tolist()))
            if missing:
                raise RegressionError(f"examples {missing} are not in these attributions (examples "
                                      f"{self.first_example} to {self.first_example + self.n_examples - 1}).")
            da = da.sel(example=example)
        if layer is not None:
            layers = [layer] if isinstance(layer, str) else list(layer)
            known = set(da["layer"].values.tolist())
            if not set(layers) <= known:
                raise RegressionError(f"layers {sorted(set(layers) - known)} are not in these attributions; "
                                      f"they have {sorted(known) if known != {''} else 'no layer names'}.")
            da = da.isel(component=np.isin(da["layer"].values, layers))
        return da

    def by_layer(self, reduce: str = "mean_abs") -> Any:
        """One number per layer and example (:func:`coar_dask.fit.summaries.by_layer`): ``reduce``
        (``mean_abs``, ``sum_abs``, ``max_abs``, ``mean``, ``sum``) over the layer's fitted components."""
        return summaries.by_layer(self, reduce)

    def by_class(self, labels: Any = None, *, by: str = "component", reduce: str = "mean") -> Any:
        """Each component's (or layer's, ``by="layer"``) attribution averaged over each class's examples
        (:func:`coar_dask.fit.summaries.by_class`); ``labels`` default to the recorded ones."""
        return summaries.by_class(self, labels, by=by, reduce=reduce)

    def with_labels(self, labels: Any) -> "Attributions":
        """These attributions with ``labels`` (one class per example) recorded in the metadata (kept by
        :meth:`save`; used by :meth:`by_class`, :meth:`to_xarray`)."""
        array = np.asarray(labels).reshape(-1)
        if array.shape != (self.n_examples,) or array.dtype.kind not in "iub":
            raise RegressionError(f"labels must be {self.n_examples} integers (one per example); found "
                                  f"{array.dtype} of shape {np.shape(labels)}.")
        return Attributions(self.weight, self.bias, self.lam, {**self.metadata, "labels": array.tolist()})

    def _repr_html_(self) -> str:
        """A small table for notebooks: shape, how it was fitted, and the layers."""
        meta = self.metadata
        rows = [("components", self.n_components), ("examples", f"{self.n_examples} (from {self.first_example})"),
                ("solver", meta.get("solver", "?")), ("train rows", meta.get("n_train", "?")),
                ("sign", SIGN_CONVENTION)]
        summary = meta.get("components") if self.component_names else None
        if summary:
            rows.append(("layers", ", ".join(f"{layer.get('module')} ({layer.get('units')})"
                                             for layer in summary["layers"])))
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                       f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f"<div><strong>coar_dask.Attributions</strong><table>{body}</table></div>"

    @property
    def unfitted(self) -> np.ndarray:
        """Indices of the components whose weights are NaN: never (or always) ablated in the rows fitted
        on (a partial build), so the fit could not tell their effect (metadata ``unfitted_components``)."""
        return np.flatnonzero(np.isnan(self.weight).all(axis=1)) if self.weight.size else np.zeros(0, np.int64)

    def fitted_weight(self) -> np.ndarray:
        """``weight`` with unfitted components (NaN rows) contributing nothing (0), saying once, in one
        warning, how many there are; ``weight`` itself when every component is fitted."""
        unfitted = self.unfitted
        if not unfitted.size:
            return self.weight
        if not self.__dict__.get("_warned_unfitted"):
            object.__setattr__(self, "_warned_unfitted", True)  # once per object (frozen dataclass)
            logger.warning("%d of %d component(s) are unfitted (NaN weights: never or always ablated in the "
                           "rows fitted on, e.g. %s); they contribute nothing to predictions. Finish the build "
                           "and refit to fit them.", unfitted.size, self.n_components, unfitted[:5].tolist())
        return np.where(np.isnan(self.weight), np.float32(0), self.weight).astype(self.weight.dtype)

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted outputs ``(n, K)`` for masks ``(n, P)``; unfitted components (NaN weights) contribute
        nothing (:meth:`fitted_weight`)."""
        return np.asarray(masks, dtype=np.float32) @ self.fitted_weight() + self.bias

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save as a torch file with keys ``weight``, ``bias``, ``lam``, ``metadata``
        (the seed's keys), loadable with ``torch.load(path, weights_only=True)``
        (the metadata is stored as plain data: :func:`plain_metadata`).

        Written by :func:`~coar_dask.core.output_paths.write_atomically`: never
        inside a store's folder nor onto a non-regular file, and an existing
        file only with ``overwrite`` (the command line's ``--overwrite``).
        """
        import torch

        metadata = plain_metadata(dict(self.metadata))
        buffer = io.BytesIO()  # serialised first: a full disk is then an OSError of the file write
        torch.save(
            {
                "weight": torch.from_numpy(np.ascontiguousarray(self.weight)),
                "bias": torch.from_numpy(np.ascontiguousarray(self.bias)),
                "lam": torch.from_numpy(np.ascontiguousarray(self.lam)),
                "metadata": metadata,
            },
            buffer,
        )
        return write_atomically(path, lambda tmp: tmp.write_bytes(buffer.getvalue()), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attributions":
        """Load a file written by :meth:`save` (or the seed's ``{weight, bias, lam}``)."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise RegressionError(f"attributions file {str(path)!r} does not exist.")
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
            # torch's own message spans several lines and suggests weights_only=False,
            # which would run arbitrary code: keep only its first line, and say why.
            text = str(exc).strip()
            if "Weights only load failed" in text:
                reason = "it holds Python objects other than tensors and plain data"
            else:
                reason = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'}"
            raise RegressionError(
                f"{str(path)!r} is not an attributions file this package can load safely ({reason}); "
                f"pass a file written by `coar-dask fit`."
            ) from None
        if not isinstance(data, dict) or not {"weight", "bias"} <= set(data):
            raise RegressionError(f"{str(path)!r} has no 'weight' and 'bias'; is it an attributions file?")
        return cls._from_saved(data, str(path))

    @classmethod
    def _from_saved(cls, data: Mapping[str, Any], where: str) -> "Attributions":
        """Attributions from a loaded file's dict, refusing malformed contents in one line naming them."""
        def bad(what: str) -> RegressionError:
            return RegressionError(f"{where!r} is a malformed attributions file: {what}; refit it with "
                                   f"`coar-dask fit` (or restore the file).")

        arrays = {}
        for key, ndim in (("weight", 2), ("bias", 1), ("lam", 1)):
            value = data.get(key)
            if value is None and key == "lam":
                continue
            if not hasattr(value, "numpy") or not hasattr(value, "dtype"):
                raise bad(f"{key!r} is a {type(value).__name__}, not a tensor")
            if value.dtype.is_complex:
                raise bad(f"{key!r} holds {value.dtype} values, not real numbers")
            array = value.detach().cpu().double().numpy()
            if key != "weight":
                array = array.reshape(-1)
            if array.ndim != ndim:
                raise bad(f"{key!r} has shape {tuple(value.shape)}, expected {ndim} dimension(s)")
            finite = np.isfinite(array)
            if key == "weight" and array.ndim == 2:  # a row all NaN is an unfitted component (a partial build)
                finite |= np.isnan(array).all(axis=1, keepdims=True)
            if not finite.all():
                raise bad(f"{key!r} holds NaN or infinite values"
                          + (" (outside whole unfitted components)" if key == "weight" else ""))
            arrays[key] = array.astype(np.float32)
        k = arrays["weight"].shape[1]
        for key in ("bias", "lam"):
            if key in arrays and arrays[key].shape[0] != k:
                raise bad(f"{key!r} has {arrays[key].shape[0]} values but 'weight' has {k} columns (examples)")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise bad(f"'metadata' is a {type(metadata).__name__}, not a mapping")
        target_slice = metadata.get("target_slice")
        if target_slice is not None:
            ok = (isinstance(target_slice, (list, tuple)) and len(target_slice) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in target_slice))
            if not ok or not 0 <= target_slice[0] or target_slice[1] - target_slice[0] != k:
                raise bad(f"metadata 'target_slice' is {target_slice!r}, but 'weight' has {k} columns")
        _check_fitted_on(metadata.get("fitted_on"), bad)
        return cls(
            weight=arrays["weight"],
            bias=arrays["bias"],
            lam=arrays.get("lam", np.zeros(k, np.float32)),
            metadata=dict(metadata),
        )

    def check_store(self, store: Store, x_name: str, y_name: str) -> None:
        """Raise if these attributions cannot describe ``store``'s rows."""
        p = int(np.prod(store.spec[x_name].shape))
        k = int(np.prod(store.spec[y_name].shape))
        s0, s1 = self.metadata.get("target_slice", (0, k))
        if p != self.n_components or (s1 - s0) != self.n_examples or s1 > k:
            raise StoreMismatchError(
                f"these attributions are {self.n_components} components x {self.n_examples} "
                f"examples (outputs {s0} to {s1 - 1}), but store {str(store.path)!r} has {p} components x {k} outputs; "
                f"they come from another experiment."
            )
        fp, mine = store.meta.get("target_fingerprint"), self.metadata.get("target_fingerprint")
        if fp and mine and fp != mine:
            raise StoreMismatchError(
                f"these attributions were fitted for model/examples/components {mine[:12]}…, but store "
                f"{str(store.path)!r} holds rows of {fp[:12]}…; they come from another experiment. "
                f"Evaluate on a store built with the same model, examples and components."
            )
