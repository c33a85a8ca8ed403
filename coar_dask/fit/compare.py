"""COAR against the baselines: fit/compute each method, evaluate all on the same held-out rows.

:func:`compare` fits COAR on a store (:func:`~coar_dask.fit.fit.fit`),
computes leave-one-out, gradient x parameter, neuron conductance and
internal influence (:mod:`~coar_dask.fit.baselines`; the last two need
Captum) for the store's experiment, and evaluates
every method on each held-out store (:func:`~coar_dask.fit.evaluate.evaluate`):
the paper's Figure 1, per method and per held-out alpha.
:func:`plot_comparison` draws it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from coar_dask.core.experiment import Experiment, load_experiment
from coar_dask.core.output_paths import write_atomically
from coar_dask.core.store import Store, open_store
from coar_dask.core.trust import experiment_from_record
from coar_dask.core.experiment import load_state
from coar_dask.errors import ConfigError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.baselines import (BASELINES, HOOK_METHODS, captum_available, check_hook_kinds,
                                     gradient_x_parameter, internal_influence, leave_one_out, neuron_conductance)
from coar_dask.fit.evaluate import EvaluationResult, evaluate, plot_path
from coar_dask.fit.fit import fit
from coar_dask.runtime.gpu import client_experiment

__all__ = ["METHODS", "MethodScore", "Comparison", "compare", "plot_comparison", "default_loo_store",
           "default_methods"]

logger = logging.getLogger(__name__)

#: Methods compared, in table order, with their names.
METHODS = {"coar": "COAR", **BASELINES}
#: The methods that need Captum.
CAPTUM_METHODS = ("nc", "ii")


def default_methods() -> tuple[str, ...]:
    """Every method of :data:`METHODS`, less neuron conductance and internal influence when Captum is
    not installed (naming them explicitly then raises, with the install command)."""
    if captum_available():
        return tuple(METHODS)
    logger.info("Captum is not installed: comparing without nc and ii (pip install 'coar_dask[baselines]')")
    return tuple(m for m in METHODS if m not in CAPTUM_METHODS)


@dataclass(frozen=True)
class MethodScore:
    """One method evaluated on one held-out store."""

    method: str
    alpha_key: str
    mean: float
    median: float
    n_nan: int
    n_rows: int
    seconds: float


@dataclass
class Comparison:
    """Scores of every method on every held-out store, and each method's time (seconds).

    ``attributions`` holds each method's :class:`Attributions`; ``results``
    each :class:`EvaluationResult`, keyed by ``(method, alpha key)``.
    """

    scores: list[MethodScore]
    seconds: dict[str, float]
    attributions: dict[str, Attributions] = field(default_factory=dict, repr=False)
    results: dict[tuple[str, str], EvaluationResult] = field(default_factory=dict, repr=False)

    @property
    def alpha_keys(self) -> list[str]:
        return list(dict.fromkeys(s.alpha_key for s in self.scores))

    def to_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{alpha: {method: {"mean": m, "median": m}}}`` (the demo's ``compare.json``)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for s in self.scores:
            out.setdefault(s.alpha_key, {})[s.method] = {"mean": s.mean, "median": s.median}
        return out

    def table(self) -> str:
        """Aligned text: per held-out store, one line per method (mean, median correlation, time)."""
        lines = []
        for key in self.alpha_keys:
            rows = [s for s in self.scores if s.alpha_key == key]
            lines.append(f"held-out alpha {key} ({rows[0].n_rows} masks)")
            lines.append(f"  {'method':<26} {'mean':>7} {'median':>7} {'time':>9}")
            for s in rows:
                name = f"{s.method} ({METHODS.get(s.method, s.method)})"
                nan = f"  ({s.n_nan} examples without variance left out)" if s.n_nan else ""
                lines.append(f"  {name:<26} {s.mean:>7.4f} {s.median:>7.4f} {s.seconds:>8.2f}s{nan}")
        return "\n".join(lines)


def default_loo_store(store: Store | str | os.PathLike) -> Path:
    """Where :func:`compare` keeps the LOO store by default: ``<store>-loo`` beside the store."""
    path = Path(store.path if isinstance(store, Store) else os.path.abspath(store))
    return path.with_name(path.name + "-loo")


def _experiment_of(store: Store, experiment: Any) -> Experiment:
    if experiment is not None:
        return load_experiment(experiment)
    recorded = store.meta.get("experiment")
    if not recorded:
        raise ConfigError(f"store {str(store.path)!r} records no experiment; give it: experiment=EXP.yaml "
                          f"(--experiment).")
    return experiment_from_record(recorded, f"the experiment recorded in store {str(store.path)!r}")


def _alpha_key(store: Store, taken: set[str]) -> str:
    key = f"{store.alpha:g}" if store.alpha is not None else store.path.name
    return key if key not in taken else f"{key} ({store.path.name})"


def _compute(method: str, store: Store, experiment: Experiment, client: Any, loo_store: Any,
             fit_options: Mapping[str, Any]) -> Attributions:
    if method == "coar":
        return fit(store, **dict(fit_options))
    if method == "loo":
        return leave_one_out(experiment, loo_store or default_loo_store(store), client=client)
    if method == "nc":
        return neuron_conductance(experiment, client=client)
    if method == "ii":
        return internal_influence(experiment, client=client)
    return gradient_x_parameter(experiment, client=client)


def compare(
    store: Store | str | os.PathLike,
    eval_stores: Sequence[Store | str | os.PathLike],
    *,
    experiment: Experiment | Mapping[str, Any] | str | os.PathLike | None = None,
    client: Any | None = None,
    loo_store: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    fit_options: Mapping[str, Any] | None = None,
) -> Comparison:
    """Fit COAR on ``store``, compute the baselines, evaluate all on each of ``eval_stores``.

    Parameters
    ----------
    store
        A built store (COAR is fitted on its completed rows).
    eval_stores
        Held-out stores of the same model, examples and components (other mask
        seeds; one per alpha for a plot across alphas).
    experiment
        The experiment of the baselines (default: the one ``store`` records).
    client
        A Dask client for the baselines' tasks (``None``: in this process).
    loo_store
        Where the leave-one-out rows are kept (default :func:`default_loo_store`);
        reused, and resumed, by later calls.
    methods
        Any of ``"coar"``, ``"loo"``, ``"gp"``, ``"nc"``, ``"ii"`` (default :func:`default_methods`).
        The hook-based ones (``gp``, ``nc``, ``ii``) are refused up front for component kinds without a
        forward-hook form (attention in-projections): give ``["coar", "loo"]`` there.
    fit_options
        Keywords of :func:`~coar_dask.fit.fit.fit` for COAR (default: exact least squares).

    Examples
    --------
    >>> result = compare("store", ["eval_store"])    # doctest: +SKIP
    >>> print(result.table())                        # doctest: +SKIP
    """
    methods = default_methods() if methods is None else tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown}; choose from {list(METHODS)}.")
    if not eval_stores:
        raise ConfigError("compare needs at least one held-out store (--eval-store HELD).")
    store = store if isinstance(store, Store) else open_store(store, read_only=True)
    held = [s if isinstance(s, Store) else open_store(s, read_only=True) for s in eval_stores]
    exp = _experiment_of(store, experiment)
    hooked = [m for m in methods if m in HOOK_METHODS]
    if hooked:  # before any method runs; counts only, on the CPU
        components = load_state(client_experiment(exp)).components
        for method in hooked:
            check_hook_kinds(components, method)
    comparison = Comparison(scores=[], seconds={})
    for method in methods:
        t0 = time.perf_counter()
        comparison.attributions[method] = _compute(method, store, exp, client, loo_store, fit_options or {})
        comparison.seconds[method] = time.perf_counter() - t0
        logger.info("%s computed in %.2f s", method, comparison.seconds[method])
    keys: set[str] = set()
    for eval_store in held:
        key = _alpha_key(eval_store, keys)
        keys.add(key)
        for method in methods:
            result = evaluate(comparison.attributions[method], eval_store)
            comparison.results[(method, key)] = result
            comparison.scores.append(MethodScore(method, key, result.mean, result.median, result.n_nan,
                                                 result.n_rows, comparison.seconds[method]))
    return comparison


def plot_comparison(comparison: Comparison, path: str | os.PathLike,
                    title: str = "Held-out correlation by method", *, overwrite: bool = False) -> Path:
    """Write a PNG in the style of the paper's Figure 1: per held-out alpha, one bar per method
    (mean correlation over examples), whiskers from the 25th to the 75th percentile.

    Draws on its own :class:`matplotlib.figure.Figure` with an Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = comparison.alpha_keys
    methods = list(dict.fromkeys(s.method for s in comparison.scores))
    colors = {"coar": "#4477aa", "loo": "#ee6677", "gp": "#228833", "nc": "#ccbb44", "ii": "#aa3377"}
    fig = Figure(figsize=(1.6 + 1.4 * len(keys) * max(1, len(methods)) / 2, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        means, lo, hi = [], [], []
        for key in keys:
            r = comparison.results[(method, key)].correlations
            r = r[np.isfinite(r)]
            mean = float(r.mean()) if r.size else float("nan")
            q1, q3 = (np.percentile(r, [25, 75]) if r.size else (np.nan, np.nan))
            means.append(mean)
            lo.append(max(0.0, mean - q1))
            hi.append(max(0.0, q3 - mean))
        x = np.arange(len(keys)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(x, means, width, yerr=[lo, hi], capsize=3, color=colors.get(method, None),
               label=METHODS.get(method, method))
    ax.set_xticks(np.arange(len(keys)), [f"alpha {k}" for k in keys])
    ax.set_ylabel("correlation (predicted vs actual)")
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    path = plot_path(path)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix[1:].lower()),
                            overwrite=overwrite)
