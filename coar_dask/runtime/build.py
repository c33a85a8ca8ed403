"""Build a component dataset: plan the pending blocks, then run one task per block.

``plan = plan_build(store, experiment)`` checks that the experiment fits the
store, claims the store for the experiment (atomically: of two builds of
different experiments started together, one is refused before it computes;
see :meth:`coar_dask.core.store.Store.claim`), records the experiment's
fingerprint in the store, and lists the blocks whose ``_completed`` flags are
not all set. The plan is small, frozen
and readable. :func:`run_block` is the task (a module-level function taking
the frozen experiment, so it pickles): it regenerates the block's masks from
``(mask_seed, row)``, computes the outputs, writes the block's chunks and only
then its ``_completed`` chunk. :func:`execute_plan` runs a plan in this process
or on a Dask cluster; :func:`run_build` does both.

Blocks are idempotent: running one twice writes the same bytes, so a block
lost to a killed worker or an interrupted build is simply run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from coar_dask.errors import (BuildError, ExperimentError, SchedulerLostError, StoreError, StoreMismatchError,
                              StoreNotFoundError)
from coar_dask.ablation.engine import compute_outputs, pass_shape_choice
from coar_dask.core.experiment import Experiment, load_experiment, load_state
from coar_dask.core.identity import check_content
from coar_dask.core.masks import sample_masks
from coar_dask.core.store import COMPLETED, Block, Store, open_store
from coar_dask.core.trust import experiment_from_record, remember_given
from coar_dask.runtime.executor import TaskSet, run_tasks
from coar_dask.runtime.gpu import check_gpu_workers, client_experiment, is_cuda
from coar_dask.runtime.worker import apply_malloc_env

__all__ = ["init_experiment_store", "recorded_experiment", "BuildPlan", "BlockResult", "BuildReport", "plan_build", "run_block", "execute_plan", "run_build", "check_experiment_fits",
           "pass_shape_records"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[["BlockResult", int, int], None]

#: Each worker's measured pass shape (:func:`coar_dask.ablation.engine.pass_shape_choice`) is kept in
#: ``_completed/`` under this prefix, one JSON file per worker: inside an array's folder, which zarr never
#: lists, and written by one worker only, so two workers never race on one record.
PASS_SHAPE_PREFIX = "coar_dask.pass_shape."
#: (store folder, store id, experiment fingerprint) whose pass shape this process has recorded.
_RECORDED: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class BuildPlan:
    """The blocks a build still has to compute, and what to compute them with."""

    store_path: str
    experiment: Experiment
    blocks: tuple[Block, ...]
    n_blocks_total: int
    rows_per_chunk: int

    @property
    def n_rows(self) -> int:
        return sum(len(b) for b in self.blocks)

    @property
    def gpu(self) -> bool:
        return is_cuda(self.experiment.device)

    @property
    def token(self) -> str:
        """Short id of (store, experiment), used in task keys."""
        text = f"{os.path.abspath(self.store_path)}|{self.experiment.fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def task_key(self, index: int) -> str:
        """Dask key of block ``index``'s task (shown in the dashboard)."""
        return f"build-block-{index:06d}-{self.token}"

    def __repr__(self) -> str:
        return (
            f"<BuildPlan {self.store_path!r}: {len(self.blocks)} of {self.n_blocks_total} blocks pending "
            f"({self.n_rows} rows, {self.rows_per_chunk} per block), experiment "
            f"{self.experiment.fingerprint[:12]} on {self.experiment.device}>"
        )


@dataclass(frozen=True)
class BlockResult:
    index: int
    rows: int
    seconds: float
    worker: str = ""


@dataclass
class BuildReport:
    """What a build did: blocks and rows computed, wall time, failures."""

    blocks_done: int = 0
    rows_done: int = 0
    seconds: float = 0.0
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows_done / self.seconds if self.seconds > 0 else 0.0


def check_experiment_fits(store: Store, experiment: Experiment, n_components: int, n_examples: int) -> None:
    """Raise a clear error when the store's arrays, seeds or fingerprint don't match."""
    spec = store.spec
    for name in (experiment.x_name, experiment.y_name):
        if name not in spec:
            raise ExperimentError(
                f"the experiment writes array {name!r} but store {str(store.path)!r} has {list(spec.names)}; "
                f"set arrays.x_name / arrays.y_name in the experiment to the store's names."
            )
    x_width = int(np.prod(spec[experiment.x_name].shape))
    if x_width != n_components:
        raise ExperimentError(
            f"the store's mask array {experiment.x_name!r} has {x_width} entries per row but the experiment "
            f"selects {n_components} components; fix the spec's shape or the experiment's components."
        )
    y_width = int(np.prod(spec[experiment.y_name].shape))
    if y_width != n_examples:
        raise ExperimentError(
            f"the store's output array {experiment.y_name!r} has {y_width} entries per row but the experiment "
            f"has {n_examples} examples; fix the spec's shape or the examples."
        )
    for key, wanted in (("mask_seed", experiment.mask_seed), ("alpha", experiment.alpha)):
        have = store.meta.get(key)
        if have is not None and have != wanted:
            raise StoreMismatchError(
                f"store {str(store.path)!r} was initialized with {key}={have!r} but the experiment has "
                f"{key}={wanted!r}; use the store's value or a new store."
            )
    fp = store.experiment_fingerprint
    if fp is not None and fp != experiment.fingerprint:
        raise StoreMismatchError(
            f"store {str(store.path)!r} holds rows of another experiment ({fp[:12]}…, this one is "
            f"{experiment.fingerprint[:12]}…); a build must not mix two experiments. Use a new store, or the "
            f"experiment file the store was built with."
        )


def init_experiment_store(
    path: str | os.PathLike,
    experiment: Experiment | Any,
    rows: int,
    *,
    rows_per_chunk: int | None = None,
    mask_seed: int | None = None,
    alpha: float | None = None,
) -> Store:
    """Create (or reopen) a store for ``rows`` ablated models of ``experiment``; no counting needed.

    The number of components and examples comes from the experiment (its
    factories are called once, here), and the store records the experiment,
    so that ``run_build(store, None)`` and ``coar-dask build STORE`` resume it.
    ``mask_seed`` and ``alpha`` override the experiment's.

    Examples
    --------
    >>> store = init_experiment_store("store", "configs/digits.yaml", rows=600)   # doctest: +SKIP
    >>> run_build(store, None)                                                    # doctest: +SKIP
    """
    from coar_dask.core.spec import Spec
    from coar_dask.core.store import init_store

    exp = load_experiment(experiment)
    remember_given(exp.to_dict())  # the user's own code: the store's record of it may run here later
    changes = {k: v for k, v in (("mask_seed", mask_seed), ("alpha", alpha)) if v is not None}
    exp = exp.replace(**changes) if changes else exp
    state = load_state(client_experiment(exp))  # counts only: on the CPU, whatever the experiment's device
    spec = Spec.for_experiment(int(rows), state.n_components, state.n_examples,
                               x_name=exp.x_name, y_name=exp.y_name, y_dtype=exp.y_dtype)
    return init_store(path, spec, rows_per_chunk=rows_per_chunk, mask_seed=exp.mask_seed, alpha=exp.alpha,
                      extra_meta={"experiment": exp.to_dict()})


def recorded_experiment(store: Store | str | os.PathLike) -> Experiment | None:
    """The experiment ``store`` records (written by :func:`init_experiment_store` or a first build), or
    ``None`` when it records none. Its code must be built-in or agreed to (:mod:`coar_dask.core.trust`):
    the record may come from someone else."""
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    data = store.meta.get("experiment")
    if not data:
        return None
    return experiment_from_record(data, f"the experiment recorded in store {str(store.path)!r}")


def _check_arguments(store: Any, experiment: Any, where: str) -> None:
    """Refuse a store or experiment argument of the wrong type, saying what is expected."""
    if not isinstance(store, (Store, str, os.PathLike)):
        raise StoreError(f"{where} takes the store as a coar_dask.Store or its folder (str or os.PathLike); "
                         f"found {type(store).__name__} {store!r}.")
    if experiment is not None and not isinstance(experiment, (Experiment, Mapping, str, os.PathLike)):
        raise ExperimentError(
            f"{where} takes the experiment as a coar_dask.Experiment, a mapping (the YAML form), the path of an "
            f"experiment YAML file, or None (the one the store records); found {type(experiment).__name__} "
            f"{experiment!r}."
        )


def plan_build(store: Store | str | os.PathLike, experiment: Experiment | Any) -> BuildPlan:
    """Check the experiment against the store and list the pending blocks.

    Loads the experiment once in this process, on the CPU whatever its
    device (to count components and examples; see
    :func:`coar_dask.runtime.gpu.client_experiment`), and records the experiment fingerprint, mask seed and alpha in
    the store on first use. ``experiment=None`` takes the one the store
    records (:func:`recorded_experiment`).
    """
    _check_arguments(store, experiment, "plan_build")
    if not isinstance(store, Store):
        store = open_store(store)
    if experiment is None:
        experiment = recorded_experiment(store)
        if experiment is None:
            raise ExperimentError(f"store {str(store.path)!r} records no experiment; pass the experiment "
                                  f"(a YAML path or a coar_dask.Experiment) to build it.")
    experiment = load_experiment(experiment)
    state = load_state(client_experiment(experiment))
    check_experiment_fits(store, experiment, state.n_components, state.n_examples)
    # First writer wins, atomically; the attributes below cannot be compared-and-set.
    store.claim({
        "experiment_fingerprint": experiment.fingerprint,
        "mask_seed": experiment.mask_seed,
        "alpha": experiment.alpha,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    check_content(store, state, experiment)  # what the factories returned here: recorded first, else checked
    store.write_coordinates(state.components.summary(), state.labels)  # xarray's layer, unit, name, label
    if store.experiment_fingerprint is None:
        store.update_meta(
            experiment_fingerprint=experiment.fingerprint,
            target_fingerprint=experiment.target_fingerprint,
            mask_seed=experiment.mask_seed,
            alpha=experiment.alpha,
            experiment=experiment.to_dict(),
            components=state.components.summary(),  # names the components: fit needs no model for them
        )
    return BuildPlan(
        store_path=str(store.path),
        experiment=experiment,
        blocks=tuple(store.pending_blocks()),
        n_blocks_total=store.n_blocks,
        rows_per_chunk=store.rows_per_chunk,
    )


def _open_on_worker(store_path: str, experiment: Experiment) -> Store:
    """The store, as this worker sees it; refuses a store claimed by another experiment."""
    try:
        store = open_store(store_path)
    except StoreNotFoundError:
        raise BuildError(
            f"this worker ({socket.gethostname()}) does not see the store folder {store_path!r} that the client "
            f"found: the client and every worker need one shared filesystem. Put the store on a folder they all "
            f"mount at the same path."
        ) from None
    claim = store.read_claim()
    owner = claim["experiment_fingerprint"] if claim else store.experiment_fingerprint
    if owner is not None and owner != experiment.fingerprint:
        raise BuildError(
            f"store {store_path!r} belongs to another experiment ({owner[:12]}…, this task's is "
            f"{experiment.fingerprint[:12]}…); the block is not written. Plan the build again with the store's "
            f"experiment, or use a new store."
        )
    return store


def _stored_outputs(store: Store, experiment: Experiment, block: Block, outputs: np.ndarray) -> np.ndarray:
    """``outputs`` cast to the store's dtype, refused when NaN/inf before or after the cast.

    Checked after the cast: a margin above 65,504 is finite in float32 and inf
    in a float16 store."""
    dtype = store.spec[experiment.y_name].np_dtype
    with np.errstate(over="ignore"):  # reported below, with the dtype to use
        stored = np.asarray(outputs).astype(dtype, copy=False)
    if np.isfinite(stored).all():
        return stored
    where = f"block {block.index} (rows {block.start}-{block.stop - 1})"
    raw_bad = ~np.isfinite(outputs)
    bad = np.flatnonzero((raw_bad if raw_bad.any() else ~np.isfinite(stored)).any(axis=0))
    examples = f"examples {bad[:10].tolist()}{'…' if bad.size > 10 else ''}"
    if raw_bad.any():
        raise BuildError(f"{where} produced NaN/inf outputs for {examples}; it is left pending.")
    big = float(np.abs(np.asarray(outputs, dtype=np.float64)).max())
    raise BuildError(
        f"{where}: outputs of {examples} reach {big:.6g}, beyond the largest {dtype.name} "
        f"({float(np.finfo(dtype).max):.6g}), and would be stored as inf; it is left pending. Store them as "
        f"float32: set arrays: {{y_dtype: float32}} in the experiment and build into a new store."
    )


def run_block(store_path: str, experiment: Experiment, block_index: int) -> BlockResult:
    """Compute and write one block (the Dask task). Idempotent."""
    t0 = time.perf_counter()
    apply_malloc_env()  # once per worker process, before its first ablated pass (workers without the preload)
    store = _open_on_worker(store_path, experiment)
    block = store.block(block_index)
    state = load_state(experiment)
    check_content(store, state, experiment)  # once per worker process: its model and examples are the recorded ones
    masks = sample_masks(experiment.mask_seed, block.rows, state.n_components, experiment.alpha)
    dtype = store.spec[experiment.y_name].np_dtype  # float64 stores get float64 outputs (issue 22 item 4)
    outputs = _stored_outputs(store, experiment, block, compute_outputs(state, masks, dtype=dtype))
    store.write_block(block_index, {experiment.x_name: masks, experiment.y_name: outputs})
    worker = ""
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        pass
    _record_pass_shape(store, state, experiment, block_index, worker)
    return BlockResult(block_index, len(block), time.perf_counter() - t0, worker)


def _record_pass_shape(store: Store, state: Any, experiment: Experiment, block_index: int, worker: str) -> None:
    """Write this worker's measured pass shape into the store once (a failure to write is only logged)."""
    key = (str(store.path), str(store.store_id), experiment.fingerprint)  # a store made again at the path: again
    choice = pass_shape_choice(state)
    if choice is None or key in _RECORDED:
        return
    name = worker or f"{socket.gethostname()}-{os.getpid()}"
    record = {**choice, "worker": name, "host": socket.gethostname(), "pid": os.getpid(), "block": block_index,
              "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = store.path / COMPLETED / f"{PASS_SHAPE_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not record the measured pass shape in %s: %s", path, exc)
        return
    _RECORDED.add(key)


def pass_shape_records(store: Store | str | os.PathLike) -> list[dict[str, Any]]:
    """The pass shape each worker measured and chose for this store, with its timings, by worker.

    One dict per worker that built a block on auto: ``masks_per_pass``, ``examples_per_pass``, ``device``,
    ``rates`` (models/s per shape measured), ``measured_rows``, ``worker``, ``host``, ``block``. A record
    that cannot be read is left out, with a warning.
    """
    folder = (store.path if isinstance(store, Store) else Path(store)) / COMPLETED
    records = []
    for path in sorted(folder.glob(f"{PASS_SHAPE_PREFIX}*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("pass shape record %s cannot be read (%s); left out", path, exc)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _taskset(plan: BuildPlan, retries: int) -> TaskSet:
    return TaskSet(
        fn=run_block,
        tasks=[(block.index, (plan.store_path, plan.experiment, block.index)) for block in plan.blocks],
        key=plan.task_key,
        resources={"GPU": 1} if plan.gpu else None,
        retries=retries,
    )


def _execute(plan: BuildPlan, client: Any | None, progress: ProgressFn | None, report: BuildReport,
             retries: int) -> None:
    total = len(plan.blocks)

    def on_result(index: int, result: BlockResult) -> None:
        report.blocks_done += 1
        report.rows_done += result.rows
        if progress:
            progress(result, report.blocks_done, total)

    def on_error(index: int, exc: BaseException) -> None:
        # a failed block stays pending; the others carry on
        report.failed[index] = str(exc) if client is None else f"{type(exc).__name__}: {exc}"
        logger.error("block %d failed: %s", index, exc)

    if plan.gpu and client is not None:  # else the GPU tasks would wait forever for GPU workers
        check_gpu_workers(client, "block", BuildError, "run: {device: cpu} in the experiment")
    try:
        run_tasks(_taskset(plan, retries), client, on_result=on_result, on_error=on_error,
                  local_errors=(BuildError,))
    except SchedulerLostError as exc:
        raise BuildError(f"{exc}; the {report.blocks_done} block(s) completed in this session are kept (as are "
                         f"earlier ones). Resume with `coar-dask build {plan.store_path}` (pending blocks "
                         f"only).") from None


def execute_plan(
    plan: BuildPlan,
    client: Any | None = None,
    *,
    progress: ProgressFn | None = None,
    retries: int = 2,
    raise_on_failure: bool = True,
) -> BuildReport:
    """Run a plan: in this process (``client=None``) or as Dask tasks on ``client``.

    Failed blocks stay pending; they are reported (and raised as
    :class:`BuildError` unless ``raise_on_failure=False``) after every other
    block has run.
    """
    report = BuildReport()
    t0 = time.perf_counter()
    if plan.blocks:
        _execute(plan, client, progress, report, retries)
    report.seconds = time.perf_counter() - t0
    if report.failed and raise_on_failure:
        lines = "\n".join(f"  block {i}: {msg}" for i, msg in sorted(report.failed.items())[:10])
        raise BuildError(
            f"{len(report.failed)} block(s) failed and remain pending (rerun the build to retry them):\n{lines}"
        )
    return report


def run_build(
    store: Store | str | os.PathLike,
    experiment: Experiment | Any,
    *,
    client: Any | None = None,
    progress: ProgressFn | bool | None = None,
    retries: int = 2,
) -> BuildReport:
    """Plan and execute a build. ``client=None`` runs in this process.

    ``experiment=None`` builds the experiment the store records.
    ``progress=True`` shows a progress bar (tqdm, blocks); a function is
    called as ``progress(result, done, total)`` after each block.

    Examples
    --------
    >>> from coar_dask import cluster_client                    # doctest: +SKIP
    >>> with cluster_client("local", n_workers=2) as client:   # doctest: +SKIP
    ...     report = run_build("store", "configs/digits.yaml", client=client)
    """
    _check_arguments(store, experiment, "run_build")
    plan = plan_build(store, experiment)
    logger.info("%r", plan)
    if progress is not True:
        return execute_plan(plan, client, progress=progress or None, retries=retries)
    from tqdm.auto import tqdm

    with tqdm(total=len(plan.blocks), desc="build", unit="block") as bar:
        return execute_plan(plan, client, progress=lambda result, done, total: bar.update(1), retries=retries)
