"""Evaluate attributions on fresh held-out masks: per-example correlation, plots.

The evaluation store holds masks drawn with another seed (and possibly other
alphas) and the real outputs of the ablated model; for each example, the
Pearson correlation between predicted (``mask @ w + b``) and actual outputs
over the evaluation rows is the paper's headline metric.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coar_dask.core.experiment import Experiment
from coar_dask.core.output_paths import write_atomically
from coar_dask.core.spec import Spec
from coar_dask.core.store import Store, init_store, open_store
from coar_dask.errors import RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.rows import in_sample_rows, infer_names
from coar_dask.solvers.streaming import PearsonAccumulator, correlation_summary

__all__ = ["EvaluationResult", "evaluate", "plot_evaluation", "plot_path", "eval_store_for"]

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Per-example correlations on held-out rows, and a sample for plotting.

    An example whose prediction or actual outputs do not vary over the rows
    has correlation NaN: :attr:`mean` and :attr:`median` leave it out, and
    :attr:`n_nan` (``n_nan_examples`` in :meth:`summary`) counts it.
    """

    correlations: np.ndarray
    n_rows: int
    alpha: float | None = None
    sample_examples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    sample_predicted: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    sample_actual: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    #: Rows evaluated that the attributions were fitted on (same store, or same mask seed and alpha);
    #: ``None`` when the attributions do not record their rows (files not written by ``fit``).
    n_in_sample: int | None = None

    @property
    def kind(self) -> str:
        """``"held-out"``, ``"in-sample"`` (every row was fitted on), ``"partly in-sample"``, or
        ``"unknown"`` (the attributions do not record what they were fitted on)."""
        if self.n_in_sample is None:
            return "unknown"
        if self.n_in_sample == 0:
            return "held-out"
        return "in-sample" if self.n_in_sample >= self.n_rows else "partly in-sample"

    def heading(self) -> str:
        """What the correlation is, in words: ``"held-out correlation over 100 masks"``, or in-sample."""
        kind = self.kind
        if kind == "partly in-sample":
            return (f"correlation over {self.n_rows} masks, {self.n_in_sample} of them in-sample (fitted on; "
                    f"evaluate on a store built with another mask seed for a held-out figure)")
        if kind == "in-sample":
            return (f"in-sample correlation over {self.n_rows} masks (all fitted on, not held out; evaluate "
                    f"on a store built with another mask seed for a held-out figure)")
        return f"{'held-out ' if kind == 'held-out' else ''}correlation over {self.n_rows} masks"

    @property
    def mean(self) -> float:
        """Mean correlation over the examples that have one (NaN if none has)."""
        return correlation_summary(self.correlations)["mean"]

    @property
    def median(self) -> float:
        """Median correlation over the examples that have one (NaN if none has)."""
        return correlation_summary(self.correlations)["median"]

    @property
    def n_nan(self) -> int:
        """Examples without a correlation (constant prediction or constant outputs)."""
        return correlation_summary(self.correlations)["n_nan"]

    def describe(self) -> str:
        """One line: mean and median, and how many examples had no correlation."""
        text = f"mean {self.mean:.4f}, median {self.median:.4f}"
        if self.n_nan:
            text += (f" over {self.correlations.size - self.n_nan} of {self.correlations.size} examples "
                     f"({self.n_nan} without variance: NaN, left out)")
        return text

    def summary(self) -> dict[str, Any]:
        return {
            "n_eval_rows": self.n_rows,
            "eval_alpha": self.alpha,
            "mean_correlation": self.mean,
            "median_correlation": self.median,
            "n_examples": int(self.correlations.size),
            "n_nan_examples": self.n_nan,
            "evaluation": self.kind,
            "n_in_sample_rows": self.n_in_sample,
        }


def eval_store_for(
    path: str | os.PathLike,
    experiment: Experiment,
    num_models: int,
    n_components: int,
    n_examples: int,
    *,
    rows_per_chunk: int | None = None,
) -> Store:
    """Create (or reopen) a store shaped for ``experiment`` with ``num_models`` rows."""
    spec = Spec.for_experiment(
        num_models, n_components, n_examples,
        x_name=experiment.x_name, y_name=experiment.y_name, y_dtype=experiment.y_dtype,
    )
    return init_store(path, spec, rows_per_chunk=rows_per_chunk, mask_seed=experiment.mask_seed, alpha=experiment.alpha)


def evaluate(
    attributions: Attributions | str | os.PathLike,
    store: Store | str | os.PathLike,
    *,
    x_name: str | None = None,
    y_name: str | None = None,
    n_plot_examples: int = 4,
) -> EvaluationResult:
    """Correlation of predicted and actual outputs, per example, over the store's completed rows.

    Parameters
    ----------
    attributions
        Fitted attributions (or a path to a saved file).
    store
        An evaluation store of the same experiment's components and examples,
        built with another mask seed. Rows the attributions were fitted on
        (the same store, or a store with the same mask seed and alpha, whose
        rows hold the same masks) are counted in
        :attr:`EvaluationResult.n_in_sample`, and the result calls itself
        in-sample (:meth:`EvaluationResult.heading`) rather than held-out.
    """
    if not isinstance(attributions, Attributions):
        attributions = Attributions.load(attributions)
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    x_name, y_name = infer_names(store, x_name or attributions.metadata.get("x_name"),
                                 y_name or attributions.metadata.get("y_name"))
    attributions.check_store(store, x_name, y_name)
    s0, s1 = attributions.metadata.get("target_slice", (0, attributions.n_examples))
    rng = np.random.default_rng(0)
    k = attributions.n_examples
    sample = np.sort(rng.choice(k, size=min(n_plot_examples, k), replace=False))
    acc = PearsonAccumulator(k)
    preds, actuals, evaluated = [], [], []
    for rows, data in store.iter_completed([x_name, y_name]):
        evaluated.append(rows)
        x = data[x_name].reshape(len(data[x_name]), -1)
        y = data[y_name].reshape(len(data[y_name]), -1)[:, s0:s1].astype(np.float64)
        p = attributions.predict(x).astype(np.float64)
        acc.update(p, y)
        preds.append(p[:, sample])
        actuals.append(y[:, sample])
    if acc.n < 3:
        raise RegressionError(
            f"evaluation store {str(store.path)!r} has {acc.n} completed rows; build it first (needs >= 3)."
        )
    return EvaluationResult(
        correlations=acc.result(),
        n_rows=acc.n,
        alpha=store.alpha,
        sample_examples=sample,
        sample_predicted=np.concatenate(preds),
        sample_actual=np.concatenate(actuals),
        n_in_sample=in_sample_rows(attributions.metadata, store, np.concatenate(evaluated), x_name),
    )


def plot_path(path: str | os.PathLike) -> Path:
    """Where :func:`plot_evaluation` writes: ``path``, with ``.png`` added when it has no suffix."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


def plot_evaluation(result: EvaluationResult, path: str | os.PathLike, title: str = "COAR held-out evaluation",
                    *, overwrite: bool = True) -> Path:
    """Write a PNG: histogram of per-example correlations, and predicted vs actual
    outputs for a few examples; returns the path written (:func:`plot_path`).

    Draws on its own :class:`matplotlib.figure.Figure` with an Agg canvas:
    pyplot's state and the process's backend are left untouched. Written by
    :func:`~coar_dask.core.output_paths.write_atomically` (never into a
    store, never onto a non-regular file; an existing file only with
    ``overwrite``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.sample_examples)
    fig = Figure(figsize=(4 * (1 + n), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + n, squeeze=False)
    ax = axes[0, 0]
    r = result.correlations[np.isfinite(result.correlations)]
    ax.hist(r, bins=30, color="#4477aa")
    ax.axvline(result.mean, color="k", ls="--", label=f"mean {result.mean:.3f}")
    ax.set_xlabel("correlation (predicted vs actual)")
    ax.set_ylabel("examples")
    ax.set_title(f"{r.size} examples, {result.n_rows} held-out masks")
    ax.legend(loc="upper left")
    for j in range(n):
        ax = axes[0, j + 1]
        p, a = result.sample_predicted[:, j], result.sample_actual[:, j]
        ax.scatter(p, a, s=6, alpha=0.5, color="#aa3377")
        lo, hi = float(min(p.min(), a.min())), float(max(p.max(), a.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ex = int(result.sample_examples[j])
        ax.set_title(f"example {ex}: r = {result.correlations[ex]:.3f}")
        ax.set_xlabel("predicted margin")
        ax.set_ylabel("actual margin")
    fig.suptitle(title)
    fig.tight_layout()
    path = plot_path(path)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix[1:].lower()),
                            overwrite=overwrite)
