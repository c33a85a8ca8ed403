"""Fit target slices as separate Dask tasks and assemble them in order.

The K outputs of a store are independent regressions, so they split into
contiguous *target slices* (the seed's ``target_start_ind:target_end_ind``),
each fitted by one task that streams the same train/validation rows. Plan,
then execute: :func:`plan_fit` returns a small frozen :class:`FitPlan`;
:func:`execute_fit` runs it in this process (``client=None``) or as one Dask
task per slice (GPU-annotated, ``resources={"GPU": 1}``, when the device is
CUDA), on any cluster of :func:`coar_dask.runtime.clusters.cluster_client`, and
concatenates the slices in target order. The result equals a single fit of
all targets (the split of rows depends only on the store and the seed).

Progress: tasks running on Dask workers send :class:`~coar_dask.solvers.base.FitProgress`
events (epochs, lambdas, CG iterations) to the client under the topic
:data:`PROGRESS_TOPIC`; the client passes them, and one ``"slices"`` event per
finished slice, to the ``progress`` callback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from coar_dask.core.store import Store, open_store
from coar_dask.errors import RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.fit.core import FitSettings, fit_store
from coar_dask.fit.moments import fit_rows_parallel, rows_parallel_fits
from coar_dask.runtime.executor import TaskSet, run_tasks
from coar_dask.runtime.gpu import check_gpu_workers
from coar_dask.solvers.base import FitProgress

__all__ = [
    "FitPlan",
    "plan_slices",
    "plan_fit",
    "fit_slice",
    "execute_fit",
    "fit_distributed",
    "assemble",
    "PROGRESS_TOPIC",
]

logger = logging.getLogger(__name__)

#: Topic of the worker events that carry a slice's progress to the client.
PROGRESS_TOPIC = "coar-dask-fit-progress"
#: At most one progress event per slice per this many seconds (the last one always goes).
_EVENT_INTERVAL = 0.5


def plan_slices(
    target_range: tuple[int, int], slices: int | Sequence[tuple[int, int]] | None = None, *, max_targets: int | None = None
) -> list[tuple[int, int]]:
    """Split the targets ``[start, stop)`` into contiguous slices.

    Parameters
    ----------
    target_range
        ``(start, stop)`` of all the targets to fit.
    slices
        A number of slices (sizes differ by at most one, larger first, like
        ``numpy.array_split``), or explicit ``(start, stop)`` slices that
        must tile ``target_range`` in order. ``None``: one slice, or as many
        as ``max_targets`` needs.
    max_targets
        Largest slice (e.g. to bound SAGA's ``n x K`` table per task).

    Examples
    --------
    >>> plan_slices((0, 10), 3)
    [(0, 4), (4, 7), (7, 10)]
    >>> plan_slices((100, 110), max_targets=4)
    [(100, 104), (104, 107), (107, 110)]
    """
    start, stop = int(target_range[0]), int(target_range[1])
    if not 0 <= start < stop:
        raise RegressionError(f"target range [{start}, {stop}) is empty or negative.")
    total = stop - start
    if slices is not None and not isinstance(slices, (int, np.integer)):
        out = [(int(a), int(b)) for a, b in slices]
        expected = start
        for a, b in out:
            if a != expected or b <= a:
                raise RegressionError(
                    f"target slices {out} must tile [{start}, {stop}) in order without gaps or overlaps."
                )
            expected = b
        if expected != stop:
            raise RegressionError(f"target slices {out} must end at {stop}.")
        return out
    count = 1 if slices is None else int(slices)
    if max_targets is not None:
        if int(max_targets) < 1:
            raise RegressionError(f"max_targets must be >= 1; found {max_targets}.")
        count = max(count, -(-total // int(max_targets)))
    if count < 1:
        raise RegressionError(f"slices must be >= 1; found {slices}.")
    count = min(count, total)
    base, extra = divmod(total, count)
    out, a = [], start
    for i in range(count):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


@dataclass(frozen=True)
class FitPlan:
    """What to fit: a store, the fit's settings (rows, solver) and the target slices (one task each)."""

    store_path: str
    settings: FitSettings
    slices: tuple[tuple[int, int], ...]

    @property
    def gpu(self) -> bool:
        device = self.settings.device
        return bool(device) and str(device).startswith("cuda")

    @property
    def target_range(self) -> tuple[int, int]:
        return self.slices[0][0], self.slices[-1][1]

    @property
    def token(self) -> str:
        import hashlib
        import json

        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def task_key(self, index: int) -> str:
        return f"coar-fit-{index}-{self.token}"

    def __repr__(self) -> str:
        a, b = self.target_range
        s = self.settings
        opts = ", ".join(f"{k}={v!r}" for k, v in s.solver_options)
        return (
            f"<FitPlan {s.solver}{'(' + opts + ')' if opts else ''} on {self.store_path!r}: targets {a}:{b} "
            f"in {len(self.slices)} slice(s), {s.num_train} train / {s.num_val} val rows "
            f"({'seed ' + str(s.split_seed) if s.row_rule == 'shuffle' else 'first rows'}), "
            f"device {s.device or 'cpu'}>"
        )


def _settings(caller: str, settings: FitSettings | None, fit_kwargs: dict[str, Any]) -> FitSettings:
    """``settings``, or a :class:`FitSettings` from ``fit``'s keywords; not both."""
    if settings is None:
        return FitSettings.create(**fit_kwargs)
    if fit_kwargs:
        raise RegressionError(f"{caller}: pass settings or keywords, not both (got {sorted(fit_kwargs)}).")
    return settings


def plan_fit(
    store: Any,
    settings: FitSettings | None = None,
    *,
    slices: int | Sequence[tuple[int, int]] | None = None,
    max_targets: int | None = None,
    **fit_kwargs: Any,
) -> FitPlan:
    """Plan a fit of ``store`` in target slices (see :func:`plan_slices`); nothing runs yet.

    ``settings`` (a :class:`~coar_dask.fit.core.FitSettings`) or the keywords
    of :meth:`FitSettings.create <coar_dask.fit.core.FitSettings.create>`
    (those of :func:`coar_dask.fit.fit.fit`) say what to fit.
    """
    settings = _settings("plan_fit", settings, fit_kwargs)
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    settings = settings.resolve(store)
    return FitPlan(
        store_path=str(os.path.abspath(store.path)),
        settings=settings,
        slices=tuple(plan_slices(settings.target_slice, slices, max_targets=max_targets)),
    )


class _EventSender:
    """Progress callback of a task on a Dask worker: worker events, at most one per interval."""

    def __init__(self, worker: Any, index: int):
        self.worker, self.index = worker, index
        self.last = 0.0
        self.pending: dict[str, Any] | None = None

    def __call__(self, p: Any) -> None:
        msg = {**asdict(p), "target_slice": list(p.target_slice) if p.target_slice else None, "slice_index": self.index}
        now = time.monotonic()
        if now - self.last >= _EVENT_INTERVAL:
            self.worker.log_event(PROGRESS_TOPIC, msg)
            self.last, self.pending = now, None
        else:
            self.pending = msg

    def flush(self) -> None:
        if self.pending is not None:
            self.worker.log_event(PROGRESS_TOPIC, self.pending)
            self.pending = None


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def fit_slice(plan: FitPlan, index: int, progress: Callable[[Any], None] | None = None) -> Attributions:
    """Fit slice ``index`` of ``plan`` -> :class:`~coar_dask.fit.attributions.Attributions`.

    The task function (module-level, so it pickles). On a Dask worker its
    progress goes to the client as worker events.
    """
    sender = None
    if progress is None:
        worker = _current_worker()
        if worker is not None:
            sender = progress = _EventSender(worker, index)
    try:
        settings = dataclasses.replace(plan.settings, target_slice=plan.slices[index])
        return fit_store(plan.store_path, settings, progress)
    finally:
        if sender is not None:
            sender.flush()


def assemble(plan: FitPlan, parts: Sequence[Any]) -> Any:
    """Concatenate the slices' attributions in target order into one :class:`Attributions`.

    Per-target metadata lists (``val_mse``, ``val_correlation``) are
    concatenated; each slice's scalar metadata is kept under ``slices``.
    """
    if len(parts) != len(plan.slices):
        raise RegressionError(f"expected {len(plan.slices)} slices, got {len(parts)}.")
    for part, sl in zip(parts, plan.slices):
        got = tuple(part.metadata.get("target_slice", ()))
        if got != tuple(sl) or part.n_examples != sl[1] - sl[0]:
            raise RegressionError(f"slice {sl} came back as {got} with {part.n_examples} targets; refit it.")
    first = dict(parts[0].metadata)
    per_target = {key for key, v in first.items() if isinstance(v, list) and len(v) == parts[0].n_examples
                  and key != "target_slice"}
    meta: dict[str, Any] = {key: v for key, v in first.items() if key not in per_target}
    for key in sorted(per_target):
        if all(isinstance(p.metadata.get(key), list) for p in parts):
            meta[key] = [x for p in parts for x in p.metadata[key]]
    meta["target_slice"] = list(plan.target_range)
    meta["slices"] = [
        {k: v for k, v in p.metadata.items() if k not in per_target and isinstance(v, (int, float, str, list))
         and k not in ("sign_convention", "store", "package_version", "spec_sha256", "experiment_fingerprint",
                       "target_fingerprint", "x_name", "y_name", "solver", "split_seed", "row_rule")}
        for p in parts
    ]
    meta["n_slices"] = len(parts)
    return Attributions(
        weight=np.concatenate([p.weight for p in parts], axis=1),
        bias=np.concatenate([p.bias for p in parts]),
        lam=np.concatenate([p.lam for p in parts]),
        metadata=meta,
    )


def _forward(progress: Callable[[Any], None]) -> Callable[[Any], None]:
    def handler(event: Any) -> None:
        _, msg = event
        try:
            sl = msg.get("target_slice")
            progress(FitProgress(stage=msg["stage"], done=int(msg["done"]), total=msg.get("total"),
                                 target_slice=tuple(sl) if sl else None, detail=msg.get("detail", "")))
        except Exception:  # noqa: BLE001 - a progress display must never break the fit
            logger.debug("progress callback failed", exc_info=True)

    return handler


def execute_fit(plan: FitPlan, client: Any | None = None, *, progress: Callable[[Any], None] | None = None,
                retries: int = 1) -> Any:
    """Run ``plan``: in this process (``client=None``) or one Dask task per slice.

    Returns the assembled :class:`~coar_dask.fit.attributions.Attributions`.
    """
    total = len(plan.slices)
    logger.info("%r", plan)
    parts: list[Any] = [None] * total
    # in this process the slices report progress directly; on workers, as events
    extra = (progress,) if client is None else ()
    taskset = TaskSet(fit_slice, [(i, (plan, i, *extra)) for i in range(total)], key=plan.task_key,
                      resources={"GPU": 1} if plan.gpu and client is not None else None, retries=retries)
    if taskset.resources:
        check_gpu_workers(client, "slice", RegressionError, "--device cpu")
    done = 0

    def on_result(i: int, part: Any) -> None:
        nonlocal done
        parts[i] = part
        done += 1
        if progress:
            progress(FitProgress("slices", done, total, plan.target_range, f"{done}/{total} slices"))

    def on_error(i: int, exc: BaseException) -> None:
        raise RegressionError(
            f"fitting target slice {plan.slices[i][0]}:{plan.slices[i][1]} failed on the cluster "
            f"({type(exc).__name__}: {exc})."
        ) from exc

    subscribed = progress is not None and client is not None
    if subscribed:
        client.subscribe_topic(PROGRESS_TOPIC, _forward(progress))
    try:
        run_tasks(taskset, client, on_result=on_result, on_error=on_error if client is not None else None)
    finally:
        if subscribed:
            try:
                client.unsubscribe_topic(PROGRESS_TOPIC)
            except Exception:  # noqa: BLE001 - the client may be closing
                pass
    return assemble(plan, parts)


def fit_distributed(
    store: Any,
    *,
    slices: int | Sequence[tuple[int, int]] | None = None,
    client: Any | None = None,
    progress: Callable[[Any], None] | None = None,
    max_targets: int | None = None,
    settings: FitSettings | None = None,
    parallel: str = "auto",
    **fit_kwargs: Any,
) -> Attributions:
    """Plan and execute a distributed fit (the arguments of :func:`coar_dask.fit.fit.fit`).

    ``parallel``: ``"rows"`` sums the least-squares moments of row groups on
    the workers and solves once (:mod:`coar_dask.fit.moments`); ``"slices"``
    fits target slices as tasks; ``"auto"`` (default) takes rows when there is
    a client, no slices or ``max_targets`` were asked for and the fit is
    ``lstsq``'s Gram path on the CPU (``P x P`` within ``max_gram_bytes``),
    else slices.

    Examples
    --------
    >>> with cluster_client("local", n_workers=2) as client:                  # doctest: +SKIP
    ...     attrs = fit_distributed("store", slices=8, client=client, num_val=500)
    """
    if parallel not in ("auto", "rows", "slices"):
        raise RegressionError(f"parallel={parallel!r}: choose 'auto', 'rows' or 'slices'.")
    settings = _settings("fit_distributed", settings, fit_kwargs)
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    if parallel == "auto":
        wanted = client is not None and slices is None and max_targets is None
        parallel = "rows" if wanted and rows_parallel_fits(store, settings) else "slices"
    if parallel == "rows":
        return fit_rows_parallel(store, settings, client, progress=progress)
    plan = plan_fit(store, settings, slices=slices, max_targets=max_targets)
    return execute_fit(plan, client, progress=progress)

