"""Summaries a researcher asks for first: attributions by layer, and by the examples' class.

Pure functions of an :class:`~coar_dask.fit.attributions.Attributions` (thin
methods on it call them, so this module does not import it: ``Attributions``
below is any object with its ``weight``, ``metadata``, ``component_names``,
``first_example``, ``n_examples`` and ``n_components``). Unfitted components (NaN weights: never or always
ablated in the rows fitted on) are left out of every reduction. Results are
labelled: a ``pandas.DataFrame`` when pandas is installed (``pip install
'coar_dask[labels]'``), else a :class:`Table` (values, row and column names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from coar_dask.errors import RegressionError

__all__ = ["REDUCTIONS", "Table", "layer_of_components", "by_layer", "by_class"]

#: How a set of weights becomes one number (NaN weights, unfitted components, are ignored).
REDUCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "mean_abs": lambda w, axis: np.nanmean(np.abs(w), axis=axis),
    "sum_abs": lambda w, axis: np.nansum(np.abs(w), axis=axis),
    "max_abs": lambda w, axis: np.nanmax(np.abs(w), axis=axis),
    "mean": lambda w, axis: np.nanmean(w, axis=axis),
    "sum": lambda w, axis: np.nansum(w, axis=axis),
}


@dataclass(frozen=True)
class Table:
    """A labelled 2-d result without pandas: ``values[i, j]`` for row ``rows[i]`` and column ``columns[j]``."""

    values: np.ndarray
    rows: list[Any]
    columns: list[Any]
    row_name: str
    column_name: str


def _labelled(values: np.ndarray, rows: list[Any], columns: list[Any], row_name: str, column_name: str) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return Table(values, rows, columns, row_name, column_name)
    return pd.DataFrame(values, index=pd.Index(rows, name=row_name), columns=pd.Index(columns, name=column_name))


def _reduction(reduce: str) -> Callable[..., np.ndarray]:
    if reduce not in REDUCTIONS:
        raise RegressionError(f"reduce must be one of {sorted(REDUCTIONS)}; found {reduce!r}.")
    return REDUCTIONS[reduce]


def layer_of_components(attributions: Any) -> np.ndarray:
    """The layer (module name) of each component; refused when the attributions do not name them."""
    names = attributions.component_names
    if names is None:
        raise RegressionError("these attributions do not name their components' layers; fit them on a store "
                              "that records its experiment (coar-dask build records the components).")
    return np.array([n.rsplit("[", 1)[0] for n in names], dtype=object)


def by_layer(attributions: Any, reduce: str = "mean_abs") -> Any:
    """One number per layer and example: ``reduce`` over the layer's (fitted) components.

    Returns a table with one row per layer (in the model's order) and one
    column per example (the experiment's indices). ``reduce``: ``mean_abs``
    (default: how much the layer's components matter, whatever the sign),
    ``sum_abs``, ``max_abs``, ``mean`` or ``sum`` (``sum``: the predicted change
    of ablating the whole layer is its negative).

    Examples
    --------
    >>> meta = {"components": {"layers": [{"module": "a", "units": 2}, {"module": "b", "units": 1}], "total": 3}}
    >>> from coar_dask.fit.attributions import Attributions
    >>> a = Attributions(np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 1.0]]), np.zeros(2), np.zeros(2), meta)
    >>> by_layer(a, "sum").to_numpy().tolist()      # doctest: +SKIP
    [[4.0, -2.0], [-1.0, 1.0]]
    """
    fn = _reduction(reduce)
    layer_of = layer_of_components(attributions)
    layers = list(dict.fromkeys(layer_of.tolist()))
    weight = np.asarray(attributions.weight, dtype=np.float64)
    values = np.stack([fn(weight[layer_of == layer], 0) for layer in layers])
    examples = list(range(attributions.first_example, attributions.first_example + attributions.n_examples))
    return _labelled(values, layers, examples, "layer", "example")


def _labels(attributions: Any, labels: Sequence[Any] | None) -> np.ndarray:
    labels = attributions.metadata.get("labels") if labels is None else labels
    array = None if labels is None else np.asarray(labels)
    if array is None or array.shape != (attributions.n_examples,):
        found = "none recorded" if labels is None else f"shape {array.shape}"
        raise RegressionError(f"a summary by class needs one label per example ({attributions.n_examples}); "
                              f"{found}. Pass labels=... (e.g. the examples factory's labels), or record them "
                              f"with Attributions.with_labels(labels).save(...).")
    return array


def by_class(attributions: Any, labels: Sequence[Any] | None = None, *, by: str = "component",
             reduce: str = "mean") -> Any:
    """Each component's (``by="component"``) or layer's (``by="layer"``) attribution averaged over each
    class's examples.

    ``labels``: one class per example (default: the metadata's ``labels``).
    ``by="layer"`` first reduces each layer's components with ``reduce``
    (:func:`by_layer`), then averages over the class. Returns a table with one
    row per component name (or index when unnamed) or layer, one column per
    class.
    """
    labels = _labels(attributions, labels)
    classes = np.unique(labels)
    if by == "component":
        weight = np.asarray(attributions.weight, dtype=np.float64)
        names = attributions.component_names or list(range(attributions.n_components))
        row_name = "component"
    elif by == "layer":
        table = by_layer(attributions, reduce)
        weight = np.asarray(table.values, dtype=np.float64)
        names = list(table.index if hasattr(table, "index") else table.rows)
        row_name = "layer"
    else:
        raise RegressionError(f"by must be 'component' or 'layer'; found {by!r}.")
    values = np.stack([np.mean(weight[:, labels == c], axis=1) for c in classes], axis=1)
    return _labelled(values, list(names), classes.tolist(), row_name, "class")
