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
from coar_dask.solvers.metrics import PearsonAccumulator, correlation_summary

__all__ = ["EvaluationResult", "evaluate", "evaluation_figure", "plot_evaluation", "plot_path", "ranked_examples",
           "eval_store_for"]

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
    #: The experiment's output (e.g. ``"margin"``) when the attributions or the store record it; names the plots' axes.
    output: str | None = None

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
    n_plot_examples: int = 3,
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
    n_plot_examples
        Examples whose predicted and actual outputs are kept for
        :func:`plot_evaluation`: evenly spaced by correlation, best first (3:
        the best, median and worst; see :func:`ranked_examples`). They are
        read in a second pass over the store once the correlations are known;
        ``0`` skips it.
    """
    if not isinstance(attributions, Attributions):
        attributions = Attributions.load(attributions)
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    x_name, y_name = infer_names(store, x_name or attributions.metadata.get("x_name"),
                                 y_name or attributions.metadata.get("y_name"))
    attributions.check_store(store, x_name, y_name)
    targets = tuple(attributions.metadata.get("target_slice", (0, attributions.n_examples)))
    acc = PearsonAccumulator(attributions.n_examples)
    evaluated = []
    for rows, data in store.iter_completed([x_name, y_name]):
        evaluated.append(rows)
        x, y = _rows_of(data, x_name, y_name, targets)
        acc.update(attributions.predict(x).astype(np.float64), y)
    if acc.n < 3:
        raise RegressionError(
            f"evaluation store {str(store.path)!r} has {acc.n} completed rows; build it first (needs >= 3)."
        )
    correlations = acc.result()
    sample = ranked_examples(correlations, n_plot_examples)
    predicted, actual = _sample_outputs(attributions, store, x_name, y_name, targets, sample)
    return EvaluationResult(
        correlations=correlations,
        n_rows=acc.n,
        alpha=store.alpha,
        sample_examples=sample,
        sample_predicted=predicted,
        sample_actual=actual,
        n_in_sample=in_sample_rows(attributions.metadata, store, np.concatenate(evaluated), x_name),
        output=_output_of(attributions.metadata, store.meta),
    )


def _rows_of(data: dict[str, np.ndarray], x_name: str, y_name: str,
             targets: tuple[int, int]) -> tuple[Any, np.ndarray]:
    """A chunk's masks ``(n, P)`` and the outputs ``(n, K)`` of the attributions' targets (float64)."""
    x = data[x_name].reshape(len(data[x_name]), -1)
    y = data[y_name].reshape(len(data[y_name]), -1)[:, targets[0]:targets[1]].astype(np.float64)
    return x, y


def _sample_outputs(attributions: Attributions, store: Store, x_name: str, y_name: str,
                    targets: tuple[int, int], sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and actual outputs ``(rows, len(sample))`` of the sampled examples (a second pass)."""
    if not sample.size:
        return np.zeros((0, 0)), np.zeros((0, 0))
    weight, bias = attributions.fitted_weight()[:, sample], attributions.bias[sample]
    preds, actuals = [], []
    for _, data in store.iter_completed([x_name, y_name]):
        x, y = _rows_of(data, x_name, y_name, targets)
        preds.append((np.asarray(x, dtype=np.float32) @ weight + bias).astype(np.float64))
        actuals.append(y[:, sample])
    return np.concatenate(preds), np.concatenate(actuals)


def _output_of(*metadata: Any) -> str | None:
    """The experiment's output (e.g. ``"margin"``) as the first metadata that records one has it."""
    for meta in metadata:
        recorded = meta.get("experiment") if isinstance(meta, dict) else None
        if isinstance(recorded, dict) and isinstance(recorded.get("output"), str):
            return recorded["output"]
    return None


def ranked_examples(correlations: np.ndarray, n: int = 3) -> np.ndarray:
    """``n`` examples evenly spaced by correlation, best first (NaN left out).

    ``n=3`` gives the best, the median and the worst example; ties keep the
    lower index. Fewer when fewer examples have a correlation.
    """
    correlations = np.asarray(correlations, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(correlations))
    if n <= 0 or finite.size == 0:
        return np.zeros(0, dtype=int)
    order = finite[np.argsort(-correlations[finite], kind="stable")]
    ranks = np.unique(np.round(np.linspace(0, order.size - 1, min(n, order.size))).astype(int))
    return order[ranks]


def plot_path(path: str | os.PathLike) -> Path:
    """Where :func:`plot_evaluation` writes: ``path``, with ``.png`` added when it has no suffix."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


def plot_evaluation(result: EvaluationResult, path: str | os.PathLike | None = None, title: str | None = None,
                    *, overwrite: bool = False) -> Any:
    """Draw an evaluation on one page; with ``path``, also write it (PNG or PDF by its suffix).

    Returns the :class:`matplotlib.figure.Figure` (:func:`evaluation_figure`)
    when ``path`` is ``None`` -- in a notebook it displays itself, and
    ``fig.savefig(...)`` writes it anywhere -- and, when given a ``path``,
    the path written (:func:`plot_path`: ``.png`` is added to a name without
    a suffix), as the command line prints it.

    The figure has its own Agg canvas: pyplot's state and the process's
    backend are left untouched. A file is written by
    :func:`~coar_dask.core.output_paths.write_atomically` (never into a
    store, never onto a non-regular file; an existing file only with
    ``overwrite``).

    Examples
    --------
    >>> fig = plot_evaluation(evaluate("attributions.pt", "eval_store"))   # doctest: +SKIP
    >>> plot_evaluation(result, "evaluation.pdf")                          # doctest: +SKIP
    """
    fig = evaluation_figure(result, title=title)
    if path is None:
        return fig
    path = plot_path(path)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:].lower()),
                            overwrite=overwrite)


def evaluation_figure(result: EvaluationResult, *, title: str | None = None) -> Any:
    """A page-sized :class:`~matplotlib.figure.Figure` of an evaluation, three panels a row.

    Top row: the histogram of per-example correlations with their mean and
    median marked (examples without a correlation, NaN, are left out and
    counted in the title); the correlations ranked; a summary in words.
    Below: predicted vs actual outputs for each sampled example (by default
    the best, median and worst by correlation; :func:`ranked_examples`),
    on equal axes with the line y = x. Axes name the experiment's output
    when it is recorded (:attr:`EvaluationResult.output`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.sample_examples)
    rows = 1 + -(-n // 3)
    fig = Figure(figsize=(11.0, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 3, squeeze=False)
    output = result.output or "output"
    _histogram(axes[0, 0], result, output)
    _ranked(axes[0, 1], result)
    _summary(axes[0, 2], result, output)
    for j, ax in enumerate(axes[1:].ravel()):
        if j < n:
            _scatter(ax, result, j, output)
        else:
            ax.set_visible(False)
    kind = result.kind
    fig.suptitle(title or (f"COAR {kind} evaluation" if kind != "unknown" else "COAR evaluation"))
    return fig


_BLUE, _PURPLE = "#4477aa", "#aa3377"


def _histogram(ax: Any, result: EvaluationResult, output: str) -> None:
    r = result.correlations[np.isfinite(result.correlations)]
    ax.hist(r, bins=30, color=_BLUE)
    ax.axvline(result.mean, color="k", ls="--", label=f"mean {result.mean:.3f}")
    ax.axvline(result.median, color="#ee7733", ls=":", lw=2, label=f"median {result.median:.3f}")
    ax.set_xlabel(f"correlation, predicted vs actual {output}")
    ax.set_ylabel("examples")
    nan = f" ({result.n_nan} NaN left out)" if result.n_nan else ""
    ax.set_title(f"{r.size} examples{nan}")
    ax.legend(loc="upper left", fontsize="small")


def _ranked(ax: Any, result: EvaluationResult) -> None:
    r = result.correlations
    finite = np.flatnonzero(np.isfinite(r))
    order = finite[np.argsort(-r[finite], kind="stable")]
    ax.plot(np.arange(1, order.size + 1), r[order], color=_BLUE)
    rank = {int(ex): i + 1 for i, ex in enumerate(order)}
    shown = [int(ex) for ex in result.sample_examples if int(ex) in rank]
    ax.scatter([rank[ex] for ex in shown], r[shown], color=_PURPLE, zorder=3, label="plotted below")
    ax.axhline(result.mean, color="k", ls="--", lw=0.8, label="mean")
    ax.set_xlabel("examples, ranked by correlation")
    ax.set_ylabel("correlation")
    ax.set_title("per-example correlation")
    ax.legend(loc="lower left", fontsize="small")


def _summary(ax: Any, result: EvaluationResult, output: str) -> None:
    import textwrap

    lines = [textwrap.fill(result.heading()[0].upper() + result.heading()[1:], 38), "",
             f"output: {output}", f"examples: {result.correlations.size}",
             f"mean correlation: {result.mean:.3f}", f"median correlation: {result.median:.3f}"]
    if result.alpha is not None:
        lines.insert(2, f"alpha (fraction ablated): {result.alpha:g}")
    if result.n_nan:
        lines.append(f"no correlation (NaN, left out): {result.n_nan}")
    ax.axis("off")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize="medium", transform=ax.transAxes)


def _scatter(ax: Any, result: EvaluationResult, j: int, output: str) -> None:
    p, a = result.sample_predicted[:, j], result.sample_actual[:, j]
    ex = int(result.sample_examples[j])
    ax.scatter(p, a, s=8, alpha=0.5, color=_PURPLE)
    lo, hi = float(min(p.min(), a.min())), float(max(p.max(), a.max()))
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(f"{_rank_name(result, ex)}example {ex}: r = {result.correlations[ex]:.3f}")
    ax.set_xlabel(f"predicted {output}")
    ax.set_ylabel(f"actual {output}")
    ax.legend(loc="upper left", fontsize="small")


def _rank_name(result: EvaluationResult, example: int) -> str:
    """``"best: "``, ``"median: "``, ``"worst: "`` or nothing, by the example's correlation rank."""
    best, median, worst = (list(ranked_examples(result.correlations, 3)) + [None] * 3)[:3]
    if example == best:
        return "best: "
    if example == worst or (median is not None and worst is None and example == median):
        return "worst: "
    return "median: " if example == median else ""
