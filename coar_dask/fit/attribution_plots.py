"""Plots of the attributions themselves: one example's top components, and a layer x class heatmap.

Same rule as the other plots (:func:`coar_dask.fit.evaluate.plot_evaluation`):
each function returns the :class:`matplotlib.figure.Figure` (its own Agg
canvas; pyplot's state is left alone) and, given a ``path``, writes it with
:func:`~coar_dask.core.output_paths.write_atomically` and returns the path.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from coar_dask.core.output_paths import write_atomically
from coar_dask.errors import RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.evaluate import plot_path

__all__ = ["plot_top_components", "plot_layer_classes", "layer_class_means"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, path: str | os.PathLike | None, overwrite: bool) -> Any:
    if path is None:
        return fig
    path = plot_path(path)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:].lower()),
                            overwrite=overwrite)


def plot_top_components(attributions: Attributions, example: int, k: int = 10,
                        path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Any:
    """Horizontal bars: the ``k`` most positive and ``k`` most negative weights of ``example``
    (:meth:`Attributions.top_components`), by component name when known.

    Returns the Figure, or with ``path`` the path written.
    """
    top = attributions.top_components(example, k)
    rows = list(top.positive) + list(reversed(top.negative))
    fig = _figure(6.5, 0.3 * max(len(rows), 4) + 1.2)
    ax = fig.add_subplot()
    names = [str(c) for c, _ in rows][::-1]
    weights = np.array([w for _, w in rows][::-1])
    ax.barh(np.arange(len(rows)), weights, color=np.where(weights > 0, "tab:blue", "tab:red"))
    ax.set_yticks(np.arange(len(rows)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("weight (keeping the component: + raises the output)")
    ax.set_title(f"example {top.example}: top {k} components of each sign")
    return _finish(fig, path, overwrite)


def layer_class_means(attributions: Attributions, labels: Sequence[int] | None = None) -> tuple[list[str],
                                                                                                np.ndarray, np.ndarray]:
    """Per layer and class, the mean weight of the layer's components over the class's examples.

    ``labels`` are the examples' classes (one per column; default: the
    metadata's ``labels``). Returns ``(layers, classes, means[layer, class])``.
    """
    if labels is None:
        labels = attributions.metadata.get("labels")
    labels = None if labels is None else np.asarray(labels)
    if labels is None or labels.shape != (attributions.n_examples,):
        raise RegressionError(f"a layer x class heatmap needs one label per example ({attributions.n_examples}); "
                              f"pass labels=... (e.g. the examples factory's labels).")
    names = attributions.component_names
    if names is None:
        raise RegressionError("these attributions do not name their components' layers; fit them on a store "
                              "that records its experiment (coar-dask build records the components).")
    layer_of = np.array([n.rsplit("[", 1)[0] for n in names])
    layers = list(dict.fromkeys(layer_of.tolist()))
    classes = np.unique(labels)
    means = np.array([[attributions.weight[layer_of == layer][:, labels == c].mean() for c in classes]
                      for layer in layers])
    return layers, classes, means


def plot_layer_classes(attributions: Attributions, labels: Sequence[int] | None = None,
                       path: str | os.PathLike | None = None, *, overwrite: bool = False) -> Any:
    """A heatmap of :func:`layer_class_means`: rows layers, columns classes, diverging colours around 0.

    Returns the Figure, or with ``path`` the path written.
    """
    layers, classes, means = layer_class_means(attributions, labels)
    fig = _figure(1.2 + 0.45 * len(classes), 1.2 + 0.35 * len(layers))
    ax = fig.add_subplot()
    bound = float(np.abs(means).max()) or 1.0
    image = ax.imshow(means, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(np.arange(len(classes)), [str(c) for c in classes])
    ax.set_yticks(np.arange(len(layers)), layers, fontsize=8)
    ax.set_xlabel("class")
    ax.set_title("mean weight per layer and class")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _finish(fig, path, overwrite)

