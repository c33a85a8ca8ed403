"""COAR-Edit: ablate the few components whose attributions separate target examples from reference ones.

As in the COAR repository's ``coar/edit/coar_edit.py``: each component gets a
Welch t-statistic of its attributions over the target examples against the
reference examples (:func:`edit_scores`),
``(mean_T - mean_R) / sqrt(s_T^2 / n_T + s_R^2 / n_R)`` with population
standard deviations (a single target has ``s_T = 0``). Attributions are in
mask units (a positive weight: keeping the component raises the output), so
ablating the ``k`` components with the *largest* scores lowers the targets'
outputs more than the references' (``direction="lower"``), and the ``k``
smallest raise them (``"raise"``) (:func:`choose_components`).

An edit is applied with :func:`edited` (a context manager: the model is
restored bitwise on exit) or :func:`edit_model` (an edited copy).
:func:`sweep_edit` runs the edit for each ``k`` as one task
(:mod:`~coar_dask.runtime.executor`, in this process or on Dask) and, in the
same tasks, two controls: the same ``k`` drawn at random (several draws),
and the same ``k`` chosen from the targets' own attributions without the
reference set (``target_only``), so that the table shows what the t-test buys.

A target *flips* when its correctness changes (``lower``: a correctly
classified target becomes wrong; ``raise``: a wrong one becomes right); a
set of targets flips when more than half of them do. The model must return
class logits ``(B, C)`` (a tensor, a tuple starting with one, ``.logits``
or a mapping's ``"logits"``) and the examples must have labels.

Judged on examples never used for scoring: a case's ``reference`` examples
choose the components, and its ``held_out`` examples (by default every
other example) measure what the edit costs elsewhere
(``median_held_out_accuracy_at_flip`` in :meth:`EditSweep.summary`); for a
class-level edit, ``held_out_target`` members of the class, also unused for
scoring, show whether the edit generalises to unseen members. Each sweep
also records the change of the targets' output that the attributions predict
for ablating the top ``k`` (``-sum`` of their weights) next to the actual
change (:func:`plot_edit`'s third panel).

The model work (the unedited predictions and every ``k``) runs as tasks: on
the workers when a client is given, GPU-annotated for a CUDA experiment after
checking that the cluster has GPU workers; this process never loads the model
on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from coar_dask.ablation.zeroing import ablated, reference_model
from coar_dask.core.components import Components
from coar_dask.core.experiment import Experiment, load_experiment, load_state
from coar_dask.core.outputs import find_logits
from coar_dask.core.output_paths import write_atomically
from coar_dask.errors import ConfigError, ExperimentError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.baselines import forward_outputs, task_resources
from coar_dask.fit.evaluate import plot_path
from coar_dask.runtime.executor import TaskSet, run_tasks

__all__ = ["DIRECTIONS", "EDIT_METHODS", "EditCase", "EditSweep", "edit_scores", "target_only_scores",
           "choose_components", "edit_mask", "edited", "edit_model", "sweep_edit", "edit_k_task",
           "parse_targets", "parse_reference", "parse_held_out", "split_targets", "parse_ks", "base_predictions",
           "plot_edit", "edit_figure"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("lower", "raise")
#: COAR-Edit and its two controls, in table order.
EDIT_METHODS = ("coar", "random", "target_only")


# -- scores and selection -------------------------------------------------------------


def _columns(attributions: Attributions, examples: Sequence[int], what: str) -> np.ndarray:
    if not isinstance(attributions, Attributions):
        raise ConfigError(
            f"editing needs Attributions (from fit, or Attributions.load(path)); found "
            f"{type(attributions).__name__}{tuple(getattr(attributions, 'shape', ())) or ''}; wrap a weight array "
            f"(components x examples) as Attributions(weight, bias, lam), e.g. Attributions(w, np.zeros(K), "
            f"np.zeros(K))."
        )
    idx = np.asarray(examples, dtype=np.int64).reshape(-1) - attributions.first_example
    if idx.size == 0:
        raise ConfigError(f"the {what} set is empty; give at least one example.")
    if idx.min() < 0 or idx.max() >= attributions.n_examples:
        first = attributions.first_example
        raise ConfigError(f"{what} examples must lie in {first}..{first + attributions.n_examples - 1} (the "
                          f"attributions' examples); found {int(idx.min()) + first}..{int(idx.max()) + first}.")
    return np.asarray(attributions.weight[:, idx], dtype=np.float64)


def edit_scores(attributions: Attributions, target: Sequence[int], reference: Sequence[int]) -> np.ndarray:
    """Welch t-statistic ``(P,)`` of each component's attributions, target against reference.

    Population standard deviations (``ddof=0``); where both are 0 the score
    is ``+-inf`` by the sign of the mean difference (0 when the means agree).

    Examples
    --------
    >>> a = Attributions(np.array([[1.0, 0.0, 0.2], [0.0, 0.5, 0.5]]), np.zeros(3), np.zeros(3))
    >>> edit_scores(a, [0], [1, 2]).round(3).tolist()
    [12.728, -inf]

    Component 0: ``(1 - 0.1) / sqrt(0 / 1 + 0.01 / 2)`` (the references' population variance of
    ``[0, 0.2]`` is 0.01); component 1: both variances 0 and the targets lower, so ``-inf``.
    """
    wt, wr = _columns(attributions, target, "target"), _columns(attributions, reference, "reference")
    diff = wt.mean(axis=1) - wr.mean(axis=1)
    den = np.sqrt(wt.var(axis=1) / wt.shape[1] + wr.var(axis=1) / wr.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(den > 0, diff / np.where(den > 0, den, 1.0), np.sign(diff) * np.inf)
    return np.where((den == 0) & (diff == 0), 0.0, t)


def target_only_scores(attributions: Attributions, target: Sequence[int]) -> np.ndarray:
    """The control without a reference set: each component's mean attribution over the targets."""
    return _columns(attributions, target, "target").mean(axis=1)


def _check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}; found {direction!r}.")
    return direction


def choose_components(scores: np.ndarray, k: int, direction: str = "lower") -> np.ndarray:
    """The ``k`` components to ablate: the largest scores to ``lower`` the targets' outputs, the
    smallest to ``raise`` them (ties: lower index first). A NaN score (an unfitted component) is never
    chosen, so fewer than ``k`` come back when fewer are fitted."""
    _check_direction(direction)
    scores = np.asarray(scores, dtype=np.float64)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= scores.size:
        raise ConfigError(f"k must be an integer in 0..{scores.size}; found {k!r}.")
    order = np.argsort(-scores if direction == "lower" else scores, kind="stable")
    return order[~np.isnan(scores[order])][:k]


def edit_mask(n_components: int, indices: Sequence[int]) -> np.ndarray:
    """The mask of an edit: every component kept (True) but ``indices``."""
    mask = np.ones(n_components, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = False
    return mask


@contextlib.contextmanager
def edited(model: Any, components: Components, indices: Sequence[int]) -> Iterator[Any]:
    """Context manager: inside it, ``model`` has components ``indices`` ablated (weights zeroed);
    on exit every value is restored bitwise, also when the body raises."""
    with ablated(model, components, edit_mask(len(components), indices)) as m:
        yield m


def edit_model(model: Any, components: Components, indices: Sequence[int]) -> Any:
    """A copy of ``model`` with components ``indices`` ablated (``model`` is left as it is)."""
    return reference_model(model, components, edit_mask(len(components), indices))


# -- the per-k task ----------------------------------------------------------------------


def _logits(out: Any) -> Any:
    out = find_logits(out, "editing")  # a tensor, a tuple's first tensor, .logits or a mapping's "logits"
    if out.ndim != 2:
        raise ExperimentError(f"editing needs class logits (batch, classes); the model returned {tuple(out.shape)}.")
    return out


def _correct_and_outputs(state: Any) -> tuple[np.ndarray, np.ndarray]:
    bs = state.experiment.batch_size
    correct, values = [], []
    for s in range(0, state.n_examples, bs):
        out, v, labels = forward_outputs(state, s, min(s + bs, state.n_examples))
        if labels is None:
            raise ExperimentError("editing needs labels; the examples factory returned inputs alone.")
        correct.append((_logits(out).argmax(dim=1) == labels).cpu().numpy())
        values.append(v.float().cpu().numpy())
    return np.concatenate(correct), np.concatenate(values)


def edit_k_task(experiment: Experiment, k: int, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The task of one ``k``: for each row of ``orders`` (component indices, best first), ablate its
    first ``k`` and return ``(correct (M, K) bool, outputs (M, K) float32)`` on every example."""
    import torch

    state = load_state(experiment)
    orders = np.asarray(orders, dtype=np.int64).reshape(len(orders), -1)
    correct = np.zeros((len(orders), state.n_examples), dtype=bool)
    values = np.zeros((len(orders), state.n_examples), dtype=np.float32)
    with torch.inference_mode():
        for i, order in enumerate(orders):
            with edited(state.model, state.components, order[:k]):
                correct[i], values[i] = _correct_and_outputs(state)
    return correct, values


def base_predictions(experiment: Experiment | Mapping[str, Any] | str | os.PathLike, *,
                     client: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(correct (K,) bool, outputs (K,))`` of the unedited model on every example, as one task
    (on ``client``'s workers, or in this process when ``client`` is None)."""
    experiment = load_experiment(experiment)
    resources = task_resources(experiment, client, "edit task")
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    tasks = TaskSet(fn=edit_k_task, tasks=[(0, (experiment, 0, np.zeros((1, 0), dtype=np.int64)))],
                    key=lambda i: f"edit-base-{experiment.target_fingerprint[:8]}", resources=resources, retries=2)
    run_tasks(tasks, client, on_result=lambda i, r: found.__setitem__(i, r))
    correct, values = found[0]
    return correct[0], values[0]


# -- the sweep -------------------------------------------------------------------------


@dataclass(frozen=True)
class EditCase:
    """One edit: the targets to change and the references to keep (both used to choose the
    components), and examples never used for choosing them, to judge the edit on.

    ``held_out``: examples whose accuracy shows the edit's cost elsewhere (e.g. every example that is
    neither a target nor a reference); ``held_out_target``: further examples of the targets' group
    (unseen members of a class) whose accuracy shows whether the edit generalises. The four sets are
    disjoint.
    """

    target: tuple[int, ...]
    reference: tuple[int, ...]
    held_out: tuple[int, ...] = ()
    held_out_target: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        names = ("target", "reference", "held_out", "held_out_target")
        for name in names:
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if not self.target or not self.reference:
            raise ConfigError("an edit needs at least one target and one reference example.")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = set(getattr(self, a)) & set(getattr(self, b))
                if both:
                    raise ConfigError(f"examples {sorted(both)[:10]} are in both the {a} and the {b} sets of an "
                                      f"edit; the sets must be disjoint.")


@dataclass
class EditSweep:
    """What :func:`sweep_edit` measured, per case, method, draw and ``k``.

    ``flipped[m]``, ``reference_accuracy[m]``, ``held_out_accuracy[m]``,
    ``held_out_target_accuracy[m]``, ``target_output[m]`` and
    ``predicted_change[m]`` have shape ``(cases, draws, len(ks))`` (one draw
    for ``coar`` and ``target_only``): the fraction of the case's targets
    whose correctness changed, the accuracy on its references, on its
    held-out examples and on its held-out targets (NaN for a case without
    them), its targets' mean output, and the change of that output the
    attributions predict for the ablation (``-`` the sum of the ablated
    components' weights). ``chosen[m]`` holds the component order of each
    case and draw.
    """

    ks: np.ndarray
    cases: list[EditCase]
    direction: str
    n_components: int
    flipped: dict[str, np.ndarray]
    reference_accuracy: dict[str, np.ndarray]
    target_output: dict[str, np.ndarray]
    base_reference_accuracy: np.ndarray
    base_target_output: np.ndarray
    chosen: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    held_out_accuracy: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    held_out_target_accuracy: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    predicted_change: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    base_held_out_accuracy: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    base_held_out_target_accuracy: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def _first_flip(self, method: str) -> np.ndarray:
        """``(cases, draws)``: index into ``ks`` of the first flip, or -1."""
        hit = self.flipped[method] > 0.5
        return np.where(hit.any(axis=2), hit.argmax(axis=2), -1)

    def k_flip(self, method: str) -> np.ndarray:
        """``(cases,)``: the smallest ``k`` that flips each case (median over draws); ``inf`` if none does."""
        first = self._first_flip(method)
        k = np.where(first >= 0, self.ks[np.maximum(first, 0)], np.inf).astype(np.float64)
        return np.median(k, axis=1)

    def _at_flip(self, values: np.ndarray, method: str) -> np.ndarray:
        first = self._first_flip(method)
        acc = np.take_along_axis(values, np.maximum(first, 0)[..., None], axis=2)[..., 0]
        acc = np.where(first >= 0, acc, np.nan)
        with np.errstate(invalid="ignore"), _quiet():
            return np.nanmean(acc, axis=1)

    def reference_accuracy_at_flip(self, method: str) -> np.ndarray:
        """``(cases,)``: the references' accuracy at each draw's flip, averaged over the draws that flip
        (NaN where none does)."""
        return self._at_flip(self.reference_accuracy[method], method)

    def held_out_accuracy_at_flip(self, method: str) -> np.ndarray:
        """``(cases,)``: like :meth:`reference_accuracy_at_flip`, on the held-out examples (never used to
        choose the components)."""
        return self._at_flip(self.held_out_accuracy[method], method)

    def held_out_target_accuracy_at_flip(self, method: str) -> np.ndarray:
        """``(cases,)``: the held-out targets' accuracy at the flip (NaN for cases without them)."""
        return self._at_flip(self.held_out_target_accuracy[method], method)

    def summary(self) -> dict[str, Any]:
        """The ``edit.json`` form: per case ``k_flip`` (None: no flip within the sweep) and the accuracy
        of the references, of the held-out examples and of the held-out targets (None where the case has
        none) at the flip, for each method; their medians over cases (a case that never flips counts as
        k = infinity, reported as None); the unedited accuracies; and per ``k`` the mean over cases of
        COAR-Edit's flips, held-out accuracies and predicted and actual change of the targets' output."""
        k = {m: self.k_flip(m) for m in EDIT_METHODS}
        acc = {m: self.reference_accuracy_at_flip(m) for m in EDIT_METHODS}
        held = {m: self.held_out_accuracy_at_flip(m) for m in EDIT_METHODS}
        held_t = {m: self.held_out_target_accuracy_at_flip(m) for m in EDIT_METHODS}
        targets = []
        for c, case in enumerate(self.cases):
            entry: dict[str, Any] = {"index": case.target[0] if len(case.target) == 1 else list(case.target),
                                     "n_held_out": len(case.held_out),
                                     "n_held_out_target": len(case.held_out_target)}
            for m in EDIT_METHODS:
                entry[m] = {"k_flip": _plain(k[m][c]), "reference_accuracy": _plain(acc[m][c]),
                            "held_out_accuracy": _plain(held[m][c]),
                            "held_out_target_accuracy": _plain(held_t[m][c])}
            targets.append(entry)
        return {
            "n_components": self.n_components,
            "direction": self.direction,
            "ks": [int(v) for v in self.ks],
            "targets": targets,
            "median_k_flip": {m: _plain(np.median(k[m])) for m in EDIT_METHODS},
            "median_reference_accuracy_at_flip": {m: _plain(_nanmedian(acc[m])) for m in EDIT_METHODS},
            "median_held_out_accuracy_at_flip": {m: _plain(_nanmedian(held[m])) for m in EDIT_METHODS},
            "median_held_out_target_accuracy_at_flip": {m: _plain(_nanmedian(held_t[m])) for m in EDIT_METHODS},
            "unedited": {"reference_accuracy": _plain(_nanmedian(self.base_reference_accuracy)),
                         "held_out_accuracy": _plain(_nanmedian(self.base_held_out_accuracy)),
                         "held_out_target_accuracy": _plain(_nanmedian(self.base_held_out_target_accuracy))},
            "coar_by_k": self.by_k("coar"),
        }

    def by_k(self, method: str) -> dict[str, list[float | int | None]]:
        """Per ``k``, the mean over cases and draws of ``method``'s measures (None where undefined)."""
        def mean(values: np.ndarray) -> list[float | int | None]:
            with _quiet():
                return [_plain(v) for v in np.nanmean(values, axis=(0, 1))]

        actual = self.target_output[method] - self.base_target_output[:, None, None]
        return {"flipped": mean((self.flipped[method] > 0.5).astype(float)),
                "held_out_accuracy": mean(self.held_out_accuracy[method]),
                "held_out_target_accuracy": mean(self.held_out_target_accuracy[method]),
                "predicted_change": mean(self.predicted_change[method]), "actual_change": mean(actual)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _nanmedian(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def _plain(value: float) -> float | int | None:
    """JSON-able: None for inf/NaN, int for whole numbers of components."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() and abs(value) >= 1 else round(value, 6)


def _orders(attributions: Attributions, cases: Sequence[EditCase], direction: str, draws: int,
            kmax: int, seed: int) -> dict[str, np.ndarray]:
    """Component orders ``(cases, draws, kmax)`` of each method."""
    P = attributions.n_components
    rng = np.random.default_rng(seed)
    coar = [choose_components(edit_scores(attributions, c.target, c.reference), kmax, direction) for c in cases]
    own = [choose_components(target_only_scores(attributions, c.target), kmax, direction) for c in cases]
    rand = [[rng.permutation(P)[:kmax] for _ in range(draws)] for _ in cases]
    return {"coar": np.array(coar)[:, None], "random": np.array(rand).reshape(len(cases), draws, kmax),
            "target_only": np.array(own)[:, None]}


def _predicted_change(attributions: Attributions, cases: Sequence[EditCase], orders: dict[str, np.ndarray],
                      ks: np.ndarray) -> dict[str, np.ndarray]:
    """``(cases, draws, len(ks))`` per method: the targets' mean output change the attributions predict
    for ablating each order's first ``k`` (mask units: ``-`` the sum of their weights)."""
    out = {}
    for method, o in orders.items():
        change = np.zeros(o.shape[:2] + (len(ks),))
        for c, case in enumerate(cases):
            w = _columns(attributions, case.target, "target").mean(axis=1)
            change[c] = -np.cumsum(w[o[c]], axis=-1)[:, ks - 1]
        out[method] = change
    return out


def sweep_edit(
    experiment: Experiment | Mapping[str, Any] | str | os.PathLike,
    attributions: Attributions | str | os.PathLike,
    cases: Sequence[EditCase],
    ks: Sequence[int],
    *,
    direction: str = "lower",
    client: Any | None = None,
    random_draws: int = 5,
    seed: int = 0,
) -> EditSweep:
    """Edit for each ``k`` (one task per ``k``) with COAR-Edit and its controls; measure every case.

    Parameters
    ----------
    experiment
        The model and examples the attributions describe.
    attributions
        :class:`Attributions` (or a saved file) of every example the cases name.
    cases
        :class:`EditCase` s: edited independently (each has its own components).
    ks
        Numbers of components to ablate (each one task).
    direction
        ``"lower"`` the targets' outputs, or ``"raise"`` them.
    client
        A Dask client (the tasks run on its workers, GPU workers for a CUDA experiment), or ``None``
        to run them in this process.
    random_draws, seed
        Draws of the random control, and their seed.
    """
    experiment = load_experiment(experiment)
    if not isinstance(attributions, Attributions):
        attributions = Attributions.load(attributions)
    _check_direction(direction)
    ks = np.array(sorted({int(k) for k in ks}), dtype=np.int64)
    if not cases or ks.size == 0 or ks[0] < 1 or ks[-1] > attributions.n_components:
        raise ConfigError(f"sweep_edit needs cases and ks in 1..{attributions.n_components}.")
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 1:
        raise ConfigError(f"random_draws must be a positive integer; found {random_draws!r}.")
    orders = _orders(attributions, cases, direction, random_draws, int(ks[-1]), seed)
    flat = np.concatenate([o.reshape(-1, o.shape[-1]) for o in orders.values()])
    resources = task_resources(experiment, client, "edit task")  # refused here, before any task, without GPUs
    base_correct, base_values = base_predictions(experiment, client=client)
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    token = experiment.target_fingerprint[:8]
    tasks = TaskSet(fn=edit_k_task, tasks=[(i, (experiment, int(k), flat)) for i, k in enumerate(ks)],
                    key=lambda i: f"edit-k-{int(ks[i]):05d}-{token}-{seed}", resources=resources, retries=2)
    run_tasks(tasks, client, on_result=lambda i, r: results.__setitem__(i, r))
    sweep = _assemble(ks, list(cases), direction, attributions.n_components, orders, results, base_correct,
                      base_values)
    sweep.predicted_change.update(_predicted_change(attributions, cases, orders, ks))
    return sweep


def _mean_over(values: np.ndarray, rows: list[int]) -> np.ndarray:
    """Mean over ``rows`` of ``values`` (first axis), NaN when ``rows`` is empty."""
    if not rows:
        return np.full(values.shape[1:], np.nan)
    return values[rows].mean(axis=0)


def _assemble(ks: np.ndarray, cases: list[EditCase], direction: str, n_components: int,
              orders: dict[str, np.ndarray], results: dict[int, tuple[np.ndarray, np.ndarray]],
              base_correct: np.ndarray, base_values: np.ndarray) -> EditSweep:
    correct = np.stack([results[i][0] for i in range(len(ks))], axis=-1)   # (rows, K, nk)
    values = np.stack([results[i][1] for i in range(len(ks))], axis=-1)
    names = ("flipped", "reference", "held_out", "held_out_target", "output")
    measured: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    row = 0
    for method, o in orders.items():
        n_cases, draws = o.shape[:2]
        m = {n: np.zeros((n_cases, draws, len(ks))) for n in names}
        for c, case in enumerate(cases):
            t = list(case.target)
            for d in range(draws):
                m["flipped"][c, d] = (correct[row][t] != base_correct[t][:, None]).mean(axis=0)
                m["reference"][c, d] = _mean_over(correct[row], list(case.reference))
                m["held_out"][c, d] = _mean_over(correct[row], list(case.held_out))
                m["held_out_target"][c, d] = _mean_over(correct[row], list(case.held_out_target))
                m["output"][c, d] = values[row][t].mean(axis=0)
                row += 1
        for n in names:
            measured[n][method] = m[n]

    def base(which: str) -> np.ndarray:
        return np.array([_mean_over(base_correct.astype(float), list(getattr(c, which))) for c in cases])

    base_out = np.array([base_values[list(c.target)].mean() for c in cases])
    return EditSweep(ks, cases, direction, n_components, measured["flipped"], measured["reference"],
                     measured["output"], base("reference"), base_out, dict(orders),
                     held_out_accuracy=measured["held_out"], held_out_target_accuracy=measured["held_out_target"],
                     base_held_out_accuracy=base("held_out"), base_held_out_target_accuracy=base("held_out_target"))


# -- targets and references from text ----------------------------------------------------


def parse_ks(text: str) -> list[int]:
    """``"1:20"`` (1 to 20), ``"1:20:2"`` (step 2) or ``"1,2,5,10"``."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            start, stop, step = (parts + [1])[:3] if len(parts) in (2, 3) else (0, 0, 0)
            ks = list(range(start, stop + 1, step)) if step > 0 else []
        else:
            ks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k must look like 1:20, 1:20:2 or 1,2,5 with k >= 1; got {text!r}.")
    return ks


def parse_targets(text: str, labels: np.ndarray, correct: np.ndarray) -> list[int]:
    """Target examples from ``"12,40"``, ``"class:3"`` (every example labelled 3) or
    ``"misclassified"`` (every example the unedited model gets wrong)."""
    text = text.strip()
    if text == "misclassified":
        found = np.flatnonzero(~np.asarray(correct, dtype=bool))
    elif text.startswith("class:"):
        try:
            found = np.flatnonzero(np.asarray(labels) == int(text[6:]))
        except ValueError:
            raise ConfigError(f"--target class:C needs an integer class; got {text!r}.") from None
    else:
        try:
            found = np.array([int(p) for p in text.split(",") if p.strip()], dtype=np.int64)
        except ValueError:
            raise ConfigError(f"--target must be indices like 12,40, class:3 or misclassified; got {text!r}.") from None
        if found.size and (found.min() < 0 or found.max() >= len(labels)):
            raise ConfigError(f"--target indices must lie in 0..{len(labels) - 1}; got {text!r}.")
    if found.size == 0:
        raise ConfigError(f"--target {text!r} selects no example; choose another target.")
    return [int(i) for i in found]


def parse_reference(text: str, n_examples: int, targets: Sequence[int], seed: int = 0) -> list[int]:
    """Reference examples from ``"random:50"`` (50 drawn among the non-targets, seeded), ``"rest"``
    (every non-target) or ``"1,2,3"``."""
    others = np.setdiff1d(np.arange(n_examples), np.asarray(targets, dtype=np.int64))
    text = text.strip()
    if text == "rest":
        chosen = others
    elif text.startswith("random:"):
        try:
            n = int(text[7:])
        except ValueError:
            n = 0
        if not 1 <= n <= others.size:
            raise ConfigError(f"--reference random:N needs 1 <= N <= {others.size} (the non-targets); got {text!r}.")
        chosen = np.sort(np.random.default_rng(seed).choice(others, size=n, replace=False))
    else:
        try:
            chosen = np.array([int(p) for p in text.split(",") if p.strip()], dtype=np.int64)
        except ValueError:
            raise ConfigError(f"--reference must be random:N, rest or indices like 1,2,3; got {text!r}.") from None
    return [int(i) for i in chosen]


def parse_held_out(text: str, n_examples: int, used: Sequence[int], seed: int = 0) -> list[int]:
    """Held-out examples (never used to choose components) from ``"rest"`` (every example not in
    ``used``), ``"none"``, ``"random:N"`` (N of those, seeded) or ``"1,2,3"``."""
    text = text.strip()
    if text == "none":
        return []
    chosen = parse_reference(text, n_examples, used, seed=seed)
    if set(chosen) & set(int(i) for i in used):
        raise ConfigError(f"--held-out {text!r} names examples used for scoring (targets or references); "
                          f"held-out examples must be others.")
    return chosen


def split_targets(targets: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(scored, held out)``: ``fraction`` of ``targets`` (seeded; at least one left to score) held out
    from scoring, to judge whether the edit generalises to unseen members of the group.

    Examples
    --------
    >>> split_targets([4, 5, 6, 7], 0.5)[0].__len__(), split_targets([4, 5, 6, 7], 0.0)
    (2, ([4, 5, 6, 7], []))
    """
    if isinstance(fraction, bool) or not 0 <= float(fraction) < 1:
        raise ConfigError(f"the held-out fraction of the targets must lie in [0, 1); found {fraction!r}.")
    targets = [int(t) for t in targets]
    n_held = min(int(round(len(targets) * float(fraction))), len(targets) - 1)
    if n_held <= 0:
        return targets, []
    held = set(np.random.default_rng(seed).choice(targets, size=n_held, replace=False).tolist())
    return [t for t in targets if t not in held], [t for t in targets if t in held]


def plot_edit(sweep: EditSweep, path: str | os.PathLike, title: str = "COAR-Edit", *,
              overwrite: bool = False) -> "os.PathLike":
    """Write :func:`edit_figure` as a PNG (or PDF, by the suffix); an existing file only with ``overwrite``."""
    fig = edit_figure(sweep, title)
    path = plot_path(path)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix[1:].lower()),
                            overwrite=overwrite)


def edit_figure(sweep: EditSweep, title: str = "COAR-Edit") -> Any:
    """A figure of three panels against ``k``: the fraction of cases flipped; the accuracy of the
    references and of the held-out examples (never used to choose components; dotted: held-out
    targets); and, for the top ``k``, the change of the targets' output the attributions predict
    (dashed) next to the actual change. COAR-Edit and both controls, averaged over cases and draws.

    Draws on its own :class:`matplotlib.figure.Figure` with an Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    colors = {"coar": "#4477aa", "random": "#bbbbbb", "target_only": "#ee6677"}
    names = {"coar": "COAR-Edit", "random": "random k", "target_only": "target only"}
    by_k = {m: sweep.by_k(m) for m in EDIT_METHODS}

    def line(values: list[Any]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    for m in EDIT_METHODS:
        style = dict(marker="o", ms=3, color=colors[m])
        left.plot(sweep.ks, line(by_k[m]["flipped"]), label=names[m], **style)
        middle.plot(sweep.ks, line(by_k[m]["held_out_accuracy"]), label=f"{names[m]}, held-out", **style)
        held_t = line(by_k[m]["held_out_target_accuracy"])
        if np.isfinite(held_t).any():
            middle.plot(sweep.ks, held_t, ls=":", label=f"{names[m]}, held-out targets", **style)
        right.plot(sweep.ks, line(by_k[m]["actual_change"]), label=f"{names[m]}, actual", **style)
        right.plot(sweep.ks, line(by_k[m]["predicted_change"]), ls="--", color=colors[m], label=f"{names[m]}, predicted")
    middle.axhline(_nanmedian(sweep.base_held_out_accuracy), color="k", lw=0.6, ls="--", label="unedited")
    right.axhline(0, color="k", lw=0.6)
    left.set_ylabel("fraction of edits that flip the target")
    middle.set_ylabel("accuracy on examples not used for scoring")
    right.set_ylabel("change of the targets' output")
    for ax, where in ((left, "upper left"), (middle, "lower left"), (right, "lower left")):
        ax.set_xlabel("components ablated (top k)")
        ax.legend(loc=where, fontsize="x-small")
    fig.suptitle(f"{title}: {len(sweep.cases)} edit(s), {sweep.direction}, {sweep.n_components} components")
    fig.tight_layout()
    return fig
