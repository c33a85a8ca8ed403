"""Compute the ablated model's outputs for a block of masks: pass shape, runners, :func:`compute_outputs`.

Two paths compute the same outputs (the seed's semantics: an ablated
component's weight slice is zeroed; biases and normalisation layers keep
their values):

- in-place zeroing (:func:`coar_dask.ablation.zeroing.ablated`), one mask per
  pass, for every component kind;
- several masks per pass (:class:`coar_dask.ablation.batched.BatchedAblation`),
  forward hooks on a BatchNorm-folded copy.

This module picks the pass shape (masks and examples per forward pass): by
measuring the :func:`candidate_shapes` on a process's first large enough
block, whose rows they compute, and keeping the fastest for that process and
device (:func:`pass_shape_choice`); :func:`auto_pass_shape` before that. It keeps, per process and experiment state, a
runner: the batched form (or why there is none), the one-time check of the
first batched pass against in-place zeroing (at ``1e-4`` of the scale), and
the experiment's settings (autocast, channels_last). A model that does not
fit the hooks' assumptions (hooked modules not called, a batch dimension
that is not first, rows of a batch that interact) falls back to in-place
zeroing with a warning.

Masks per pass pay when one mask's examples are too few to fill a pass (the
digits model: 360 8x8 images); with thousands of large examples per mask
(ViT-B/16's 5,000 images) a pass is already full and ``M = 1``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import Any, Callable, Mapping

import numpy as np

from coar_dask.ablation.batched import BatchedAblation, fold_batchnorm, model_version
from coar_dask.ablation.zeroing import ablated
from coar_dask.core.experiment import free_device_memory, is_out_of_memory, one_line
from coar_dask.errors import BuildError, ExperimentError, NotBatchableError, OutputError

__all__ = [
    "compute_outputs",
    "output_buffer_dtype",
    "verify_tolerance",
    "VERIFY_TOLERANCE",
    "auto_masks_per_pass",
    "auto_pass_shape",
    "AUTO_MAX_ROWS",
    "AUTO_TARGET_ELEMENTS",
    "AUTO_MIN_ROWS",
    "MEASURE_MIN_MASKS",
    "candidate_shapes",
    "pass_shape_choice",
]

logger = logging.getLogger(__name__)

#: Auto masks per pass: batch masks until the largest hooked activation of a
#: pass holds about this many elements. Batching pays where per-operation
#: overhead dominates, i.e. for small activations; past this size a pass is
#: compute-bound and larger passes only spill caches. On CPU the bound is
#: 512 K floats (2 MB, about one core's L2 cache): on the digits model, two
#: processes at once ran 360-row passes (2 masks x 180 examples) at a median
#: 296 models/s against 278 for 720-row passes (2 x 360), 8 interleaved
#: rounds; one process alone, 151 against 155, within the noise. Concurrent
#: workers share the L3 cache, so smaller passes scale better (BENCHMARKS.md).
AUTO_TARGET_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 24}
#: ... and never more than this many rows (masks x examples) in one pass.
AUTO_MAX_ROWS = 8192
#: Auto splits one mask's examples into smaller passes (to fit two masks in a
#: pass) only while a pass keeps at least this many rows.
AUTO_MIN_ROWS = 256
#: Auto measures the candidate pass shapes (:func:`candidate_shapes`) on a process's first block of at least
#: this many masks and keeps the fastest; smaller blocks use the static rule (:func:`auto_pass_shape`) and
#: leave the measuring to a later block. The static rule was right on one machine and wrong on another
#: (issue 25: two masks per pass ran at 1.17x one mask in place on one 2-core machine, 0.82x on another).
MEASURE_MIN_MASKS = 16
#: Rounds of each candidate shape measured; its time per mask is the fastest round's (the first round of
#: a shape pays its warm-up, and the first batched one the one-time check against in-place zeroing).
MEASURE_ROUNDS = 2


# ------------------------------------------------------------------ pass shape


def auto_masks_per_pass(n_examples_per_pass: int, elements_per_example: int, n_masks: int,
                        *, target_elements: int = AUTO_TARGET_ELEMENTS["cpu"], max_rows: int = AUTO_MAX_ROWS) -> int:
    """Masks per forward pass: as many as keep the largest activation near ``target_elements``.

    Parameters
    ----------
    n_examples_per_pass
        Examples of one mask in a pass (``min(batch_size, n_examples)``).
    elements_per_example
        Elements of the largest hooked activation for one example.
    n_masks
        Masks to compute (never more per pass).
    target_elements, max_rows
        Bounds of one pass (see :data:`AUTO_TARGET_ELEMENTS`, :data:`AUTO_MAX_ROWS`).

    Examples
    --------
    >>> auto_masks_per_pass(180, 16 * 8 * 8, 100)    # 180 8x8 maps of 16 channels
    2
    >>> auto_masks_per_pass(40, 16 * 8 * 8, 100)     # ... only 40 of them
    12
    >>> auto_masks_per_pass(512, 64 * 32 * 32, 100)  # CIFAR ResNet-18: a pass is already full
    1
    """
    per_mask = max(1, n_examples_per_pass) * max(1, elements_per_example)
    m = min(target_elements // per_mask, max_rows // max(1, n_examples_per_pass), n_masks)
    return int(max(1, m))


def auto_pass_shape(n_examples_per_pass: int, elements_per_example: int, n_masks: int,
                    *, target_elements: int = AUTO_TARGET_ELEMENTS["cpu"], max_rows: int = AUTO_MAX_ROWS,
                    min_rows: int = AUTO_MIN_ROWS) -> tuple[int, int]:
    """Masks and examples per forward pass: ``(masks, examples)``.

    As :func:`auto_masks_per_pass`, but where one mask's examples already
    fill more than half a pass, they are split into equal smaller passes that
    hold two masks each, as long as a pass keeps ``min_rows`` rows: two
    masks of 180 examples run on a BatchNorm-folded copy, where one mask of
    360 would fall back to in-place zeroing. ``masks == 1`` means in-place
    zeroing over the examples in passes of ``n_examples_per_pass``.

    Examples
    --------
    >>> auto_pass_shape(360, 16 * 8 * 8, 100)    # digits: 360 8x8 maps of 16 channels
    (2, 180)
    >>> auto_pass_shape(40, 16 * 8 * 8, 100)     # ... only 40 of them
    (12, 40)
    >>> auto_pass_shape(512, 64 * 32 * 32, 100)  # CIFAR ResNet-18: too few rows to split
    (1, 512)
    """
    n = max(1, n_examples_per_pass)
    m = auto_masks_per_pass(n, elements_per_example, n_masks, target_elements=target_elements, max_rows=max_rows)
    if m > 1 or n_masks < 2:
        return m, n
    # Smallest number of parts whose passes hold two masks within both bounds.
    limit = min(target_elements // (2 * max(1, elements_per_example)), max_rows // 2)
    if limit < 1:
        return 1, n
    parts = -(-n // limit)
    examples = -(-n // parts)
    if parts < 2 or 2 * examples < min_rows:
        return 1, n
    return auto_masks_per_pass(examples, elements_per_example, n_masks, target_elements=target_elements,
                               max_rows=max_rows), examples


def candidate_shapes(n_examples_per_pass: int, n_masks: int, *, max_rows: int = AUTO_MAX_ROWS,
                     min_rows: int = AUTO_MIN_ROWS) -> list[tuple[int, int]]:
    """The pass shapes ``(masks, examples)`` auto measures, in the order it measures them.

    One mask in place first, then 2, 4, 8 ... masks per pass of all the examples (while a pass holds at
    most ``max_rows`` rows and at most ``n_masks // 8`` masks, so that the measuring fits in a block),
    then two masks on passes of half the examples (where such a pass keeps ``min_rows`` rows).

    Examples
    --------
    >>> candidate_shapes(360, 100)
    [(1, 360), (2, 360), (4, 360), (8, 360), (2, 180)]
    >>> candidate_shapes(512, 100, max_rows=1024)
    [(1, 512), (2, 512), (2, 256)]
    """
    n = max(1, int(n_examples_per_pass))
    shapes = [(1, n)]
    m = 2
    while m <= max(2, n_masks // 8) and m * n <= max_rows:
        shapes.append((m, n))
        m *= 2
    half = -(-n // 2)
    if half < n and 2 * half >= min_rows:
        shapes.append((2, half))
    return shapes


# ----------------------------------------------------------- per-state runner


class _Runner:
    """What a process keeps per experiment state: the batched form (or why not), checks, settings."""

    def __init__(self, state: Any):
        self.lock = threading.Lock()
        self.batched: BatchedAblation | None = None
        self.reason = ""
        self.verified = False
        self.elements_per_example: int | None = None
        experiment = state.experiment
        self.amp = getattr(experiment, "amp", "off")
        self.channels_last = bool(getattr(experiment, "channels_last", False))
        self._rep_cache: dict[tuple[int, int, int], tuple[Any, Any]] = {}
        #: (masks, examples) per pass that memory allowed, once a pass ran out of CUDA memory.
        self.pass_limit: tuple[int, int] | None = None
        #: The pass shape auto measured as fastest on this process's device, and the timings (see
        #: :func:`pass_shape_choice`); ``None`` until a block of ``MEASURE_MIN_MASKS`` masks ran on auto.
        self.choice: dict[str, Any] | None = None
        self.folded = False
        self.prepare(state)
        try:
            self.batched = BatchedAblation(state.model, state.components)
        except NotBatchableError as exc:
            self.reason = str(exc)
            logger.info("masks per pass unavailable: %s", exc)
            return
        self._fold(state)

    def _fold(self, state: Any) -> None:
        """Use a BatchNorm-folded copy of the model for the batched path, if folding applies."""
        self._source_version = model_version(state.model)
        folded = fold_batchnorm(state.model)
        if folded is not None:
            try:
                self.batched = BatchedAblation(folded, state.components)
                self.folded = True
            except NotBatchableError as exc:  # pragma: no cover - same modules, same kinds
                logger.debug("folded model not batchable: %s", exc)

    def refresh(self, state: Any) -> None:
        """Fold again if the model's parameters changed in place since the copy was made."""
        if self.folded and self.batched is not None and model_version(state.model) != self._source_version:
            logger.debug("model changed since BatchNorm folding; folding again")
            self._fold(state)

    def shrink(self, state: Any, m_count: int, examples: int, failure: str) -> tuple[int, int]:
        """Halve a pass that ran out of CUDA memory (masks first, then examples); kept for later blocks."""
        if m_count == 1 and examples == 1:
            raise BuildError(
                f"CUDA out of memory even at one mask and one example per pass on {state.device} ({failure}); "
                f"the block is left pending. Free the GPU (another process may hold its memory) or use one "
                f"with more memory."
            )
        smaller = (m_count // 2, examples) if m_count > 1 else (1, max(1, examples // 2))
        logger.warning("CUDA out of memory at %d masks x %d examples per pass; retrying the block with the pass "
                       "halved to %d x %d (%s)", m_count, examples, *smaller, failure)
        self.pass_limit = smaller
        self._rep_cache.clear()
        return smaller

    def prepare(self, state: Any) -> None:
        import torch

        if self.channels_last:  # the model once; each batch is converted on the host before its copy
            state.model.to(memory_format=torch.channels_last)  # (core.examples.DeviceFeeder), never the set
        self.channels_last = False  # done once

    def autocast(self, state: Any) -> Any:
        import torch

        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(state.device).type,
                              dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def probe(self, state: Any) -> int:
        """Elements per example of the largest hooked activation (one tiny forward pass)."""
        import torch

        if self.elements_per_example is None:
            sizes = []
            handles = [s.module.register_forward_hook(lambda m, a, o: sizes.append(o.numel()))
                       for s in self.batched.sites] if self.batched else []
            try:
                with torch.inference_mode(), self.autocast(state):
                    _forward(self.batched.model if self.batched else state.model, state.batch(0, 1).inputs)
            finally:
                for h in handles:
                    h.remove()
            self.elements_per_example = max(sizes, default=1)
        return self.elements_per_example

    def repeated(self, state: Any, start: int, stop: int, m_count: int) -> Any:
        """Examples ``start:stop`` repeated ``m_count`` times (a :class:`~coar_dask.core.outputs.Batch`)."""
        key = (start, stop, m_count)
        hit = self._rep_cache.get(key)
        if hit is not None:
            return hit
        batch = state.batch(start, stop, m_count)
        tensors = batch.inputs.values() if isinstance(batch.inputs, Mapping) else [batch.inputs]
        if sum(t.numel() * t.element_size() for t in tensors) <= 64 << 20:  # keep small repeated inputs
            if len(self._rep_cache) > 8:
                self._rep_cache.clear()
            self._rep_cache[key] = batch
        return batch


_RUNNERS: dict[int, _Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def _device_type(state: Any) -> str:
    import torch

    return torch.device(state.device).type


def _runner(state: Any) -> _Runner:
    key = id(state)
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _RUNNERS[key] = _Runner(state)
            weakref.finalize(state, _RUNNERS.pop, key, None)
        return runner


def pass_shape_choice(state: Any) -> dict[str, Any] | None:
    """The pass shape auto chose for ``state`` in this process by measuring, or ``None`` (not measured yet).

    A dict: ``masks_per_pass``, ``examples_per_pass``, ``device``, ``rates`` (models/s of each shape
    measured, keyed ``"MxE"``, ``1x...`` being in-place zeroing) and ``measured_rows`` (rows of the block
    that computed them; they are its outputs). A shape that ran out of CUDA memory later is halved
    (:meth:`_Runner.shrink`) whatever the choice says.
    """
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(id(state))
    return dict(runner.choice) if runner is not None and runner.choice is not None else None


def _forward(model: Any, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _values(state: Any, out: Any, batch: Any, error: type = OutputError) -> Any:
    """The output function on one pass, ``(rows,)``, float32 or float64 (as the output returns it: a
    float64 model's outputs keep their digits); another shape raises ``error``."""
    values = state.output_fn(out, batch)
    if tuple(getattr(values, "shape", ())) != (len(batch),):
        raise error(
            f"output {state.experiment.output!r} returned shape {tuple(getattr(values, 'shape', ()))} for a pass "
            f"of {len(batch)} rows; it must return one value per row."
        )
    return values if values.dtype.itemsize == 8 and values.is_floating_point() else values.float()


def _inplace_outputs(state: Any, masks: np.ndarray, out: np.ndarray, runner: _Runner, bs: int) -> None:
    import torch

    n = state.n_examples
    unchanged = runner.folded and model_version(state.model) == runner._source_version
    with torch.inference_mode(), runner.autocast(state):
        for i, mask in enumerate(masks):
            with ablated(state.model, state.components, mask):
                for s in range(0, n, bs):
                    batch = state.batch(s, min(s + bs, n))
                    out[i, s : s + bs] = _values(state, _forward(state.model, batch.inputs), batch).cpu().numpy()
    if unchanged:  # ablated() restored every value bitwise: the folded copy is still current
        runner._source_version = model_version(state.model)


def _batched_outputs(state: Any, masks: np.ndarray, out: np.ndarray, runner: _Runner, m_per_pass: int,
                     examples_per_pass: int) -> None:
    import torch

    batched = runner.batched
    bs = min(examples_per_pass, state.n_examples)
    with torch.inference_mode(), runner.autocast(state), batched.hooks():
        for i in range(0, masks.shape[0], m_per_pass):
            chunk = masks[i : i + m_per_pass]
            m_count = chunk.shape[0]
            for s in range(0, state.n_examples, bs):
                stop = min(s + bs, state.n_examples)
                batch = runner.repeated(state, s, stop, m_count)
                batched.set_masks(chunk, stop - s, state.device)
                model_out = _forward(batched.model, batch.inputs)
                batched.check_calls()
                values = _values(state, model_out, batch, NotBatchableError).reshape(m_count, stop - s)
                out[i : i + m_count, s:stop] = values.cpu().numpy()


#: Largest difference, relative to the output scale, allowed between the batched path and in-place
#: zeroing: float32 (1e-4), TF32 convolutions and matmuls on Ampere/Hopper GPUs (2e-2: ten mantissa
#: bits; simulated on CPU, TF32 rounding moved a ResNet's outputs by 1.3e-2), autocast float16
#: (5e-2, ten mantissa bits) and bfloat16 (1e-1: seven mantissa bits, four times float16's rounding).
VERIFY_TOLERANCE = {"float32": 1e-4, "tf32": 2e-2, "fp16": 5e-2, "bf16": 1e-1}


def verify_tolerance(amp: str | bool, tf32: bool) -> float:
    """The relative tolerance of the one-time check of the batched path (see :data:`VERIFY_TOLERANCE`).

    ``amp`` is ``run.amp`` (``"bf16"``, ``"fp16"``, ``"off"``); ``True`` means ``"fp16"``, ``False`` ``"off"``.
    """
    mode = "fp16" if amp is True else "off" if amp is False else amp
    if mode in ("bf16", "fp16"):
        return VERIFY_TOLERANCE[mode]
    return VERIFY_TOLERANCE["tf32" if tf32 else "float32"]


def _tf32_active(device: Any) -> bool:
    """Whether this CUDA device computes float32 convolutions or matmuls in TF32 (PyTorch's default for cuDNN)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def _verify(state: Any, masks: np.ndarray, batched_out: np.ndarray, runner: _Runner, bs: int) -> None:
    """Check the first batched mask of this process against in-place zeroing (once)."""
    ref = np.empty((1, state.n_examples), dtype=batched_out.dtype)
    _inplace_outputs(state, masks[:1], ref, runner, bs)
    scale = max(1.0, float(np.abs(ref).max()))
    tol = verify_tolerance(runner.amp, _tf32_active(state.device)) * scale
    err = float(np.abs(batched_out[:1] - ref).max())
    if not err <= tol:
        raise NotBatchableError(
            f"masks per pass disagree with in-place zeroing by {err:.3g} (tolerance {tol:.3g}): the model "
            f"mixes rows of a batch or reshapes the batch dimension; using in-place zeroing."
        )
    runner.verified = True
    logger.debug("batched ablation verified (max difference %.3g)", err)


def output_buffer_dtype(dtype: Any) -> np.dtype:
    """The dtype :func:`compute_outputs` returns for a store of ``dtype``: float64 for float64, else float32.

    float16 stores get float32 outputs, so that the build can tell an output beyond float16's range from
    a NaN; an integer dtype is refused (it would wrap the outputs).
    """
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ExperimentError(f"outputs are stored as floating point (float16, float32 or float64); the store's "
                              f"output dtype is {dt.name}. Build into a store with a floating output dtype.")
    return np.dtype(np.float64) if dt.itemsize > 4 else np.dtype(np.float32)


def compute_outputs(state: Any, masks: np.ndarray, *, masks_per_pass: int | None = None,
                    dtype: Any = np.float32, timer: Callable[[], float] | None = None) -> np.ndarray:
    """Outputs ``(n_masks, K)`` of the ablated model for each mask (True = kept).

    Parameters
    ----------
    state
        An :class:`~coar_dask.core.experiment.ExperimentState` (model, examples,
        components, output function, device).
    masks
        Bool ``(n_masks, P)``.
    masks_per_pass
        Masks evaluated per forward pass. ``None``: the experiment's
        ``masks_per_pass`` if it sets one, else automatic: on this process's
        first block of at least :data:`MEASURE_MIN_MASKS` masks, the
        :func:`candidate_shapes` are timed on the block's own rows (those rows
        are its outputs) and the fastest is kept for the state's later blocks
        (:func:`pass_shape_choice`); before that, :func:`auto_pass_shape`.
        ``1`` uses in-place zeroing. Models or kinds that forward hooks cannot
        express always use in-place zeroing.
    dtype
        The store's output dtype: the result is float64 for float64 (the
        output function's float64 values are kept), float32 otherwise (see
        :func:`output_buffer_dtype`).
    timer
        The clock auto measures pass shapes with (default :func:`time.perf_counter`).

    Returns
    -------
    numpy.ndarray
        ``(n_masks, K)``, float32 or float64.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ExperimentError(f"masks must be 2-D (n_masks, n_components); got shape {masks.shape}.")
    out = np.empty((masks.shape[0], state.n_examples), dtype=output_buffer_dtype(dtype))
    if masks.shape[0] == 0:
        return out
    runner = _runner(state)
    with runner.lock:  # hooks and in-place zeroing both change the shared model
        measure = _should_measure(state, runner, masks, masks_per_pass)
        done = _measure(state, masks, out, runner, timer or time.perf_counter) if measure else 0
        _compute_all(state, masks[done:], out[done:], runner, masks_per_pass)
    return out


def _compute_all(state: Any, masks: np.ndarray, out: np.ndarray, runner: _Runner,
                 masks_per_pass: int | None) -> None:
    """Every mask's outputs into ``out`` in the chosen pass shape, halving it when CUDA memory runs out."""
    if not masks.shape[0]:
        return
    failure = None
    try:
        m_per_pass, examples_per_pass = _pass_shape(state, runner, masks, masks_per_pass)
    except Exception as exc:  # noqa: BLE001 - the probe runs one example: out of memory there is final
        if not is_out_of_memory(exc):
            raise
        failure = one_line(exc, limit=200)
    if failure is not None:
        runner.shrink(state, 1, 1, failure)
    while True:
        try:
            _compute(state, masks, out, runner, m_per_pass, examples_per_pass)
            return
        except Exception as exc:  # noqa: BLE001 - only CUDA out-of-memory is handled; the rest re-raised
            if not is_out_of_memory(exc):
                raise
            failure = one_line(exc, limit=200)
        # Outside the except block: the traceback's frames (and their device tensors) are released.
        m_per_pass, examples_per_pass = runner.shrink(state, m_per_pass, examples_per_pass, failure)
        free_device_memory(state.device)


def _pass_shape(state: Any, runner: _Runner, masks: np.ndarray, masks_per_pass: int | None) -> tuple[int, int]:
    """Masks and examples per pass: given, the experiment's, or automatic; within what memory allowed."""
    m_per_pass = masks_per_pass if masks_per_pass is not None else getattr(state.experiment, "masks_per_pass", None)
    examples_per_pass = min(state.experiment.batch_size, state.n_examples)
    if m_per_pass is None and runner.batched is not None and runner.choice is not None:
        m_per_pass, examples_per_pass = runner.choice["masks_per_pass"], runner.choice["examples_per_pass"]
    elif m_per_pass is None and runner.batched is not None:
        target = AUTO_TARGET_ELEMENTS.get(_device_type(state), AUTO_TARGET_ELEMENTS["cpu"])
        m_per_pass, examples_per_pass = auto_pass_shape(examples_per_pass, runner.probe(state), masks.shape[0],
                                                        target_elements=target, min_rows=AUTO_MIN_ROWS)
    m_per_pass = 1 if m_per_pass is None else int(m_per_pass)
    if m_per_pass < 1:
        raise ExperimentError(f"masks_per_pass must be a positive integer; found {m_per_pass}.")
    m_per_pass = min(m_per_pass, masks.shape[0])
    if runner.pass_limit is not None:
        m_per_pass, examples_per_pass = min(m_per_pass, runner.pass_limit[0]), min(examples_per_pass,
                                                                                   runner.pass_limit[1])
    return m_per_pass, examples_per_pass


def _compute(state: Any, masks: np.ndarray, out: np.ndarray, runner: _Runner, m_per_pass: int,
             examples_per_pass: int) -> None:
    """Every mask's outputs into ``out``: masks per pass where possible, else in-place zeroing."""
    if m_per_pass > 1 and runner.batched is not None:
        runner.refresh(state)
        try:
            _batched_outputs(state, masks, out, runner, m_per_pass, examples_per_pass)
            if not runner.verified:
                _verify(state, masks, out, runner, examples_per_pass)
            return
        except NotBatchableError as exc:
            logger.warning("%s", exc)
            runner.batched, runner.reason = None, str(exc)
    _inplace_outputs(state, masks, out, runner, examples_per_pass)


def pass_shape_setting() -> str:
    """``coar-dask.pass-shape``: ``"rule"`` (the default: a fixed rule, bitwise-reproducible outputs) or
    ``"measure"`` (time the candidate shapes on a worker's first block and keep the fastest)."""
    import dask.config

    value = dask.config.get("coar-dask.pass-shape", "rule")
    if value not in ("rule", "measure"):
        raise ExperimentError(f"coar-dask.pass-shape must be 'rule' or 'measure'; found {value!r}. Set it in "
                              "~/.config/dask/coar_dask.yaml or DASK_COAR_DASK__PASS_SHAPE.")
    return value


def _should_measure(state: Any, runner: _Runner, masks: np.ndarray, masks_per_pass: int | None) -> bool:
    """Auto without a choice yet, on a block large enough, with a batched form and memory not yet short."""
    explicit = masks_per_pass if masks_per_pass is not None else getattr(state.experiment, "masks_per_pass", None)
    return (explicit is None and pass_shape_setting() == "measure" and runner.choice is None and runner.batched is not None and runner.pass_limit is None
            and masks.shape[0] >= MEASURE_MIN_MASKS)


def _measure(state: Any, masks: np.ndarray, out: np.ndarray, runner: _Runner, timer: Callable[[], float]) -> int:
    """Time the candidate shapes on the block's first rows (their outputs kept); returns the rows done.

    Masks per pass grow while they get faster; the measuring uses at most half the block. The rows
    each shape computes are outputs like any other (the first batched pass is checked against
    in-place zeroing as always). Out of CUDA memory, the measuring stops at the shapes that fit.
    """
    n_examples = min(state.experiment.batch_size, state.n_examples)
    rates: dict[str, float] = {}
    best: tuple[float, tuple[int, int]] | None = None
    done, budget, failure = 0, masks.shape[0] // 2, None
    for m, e in candidate_shapes(n_examples, masks.shape[0]):
        if done + MEASURE_ROUNDS * m > budget:
            break
        if best is not None and e == n_examples and m > 1 and best[1][0] < m // 2:
            continue  # masks per pass stopped getting faster: larger ones are not measured
        per_mask = float("inf")
        try:
            for _ in range(MEASURE_ROUNDS):
                t0 = timer()
                _compute(state, masks[done : done + m], out[done : done + m], runner, m, e)
                per_mask = min(per_mask, (timer() - t0) / m)
                done += m
        except Exception as exc:  # noqa: BLE001 - only CUDA out-of-memory is handled; the rest re-raised
            if not is_out_of_memory(exc):
                raise
            failure = one_line(exc, limit=200)
            break
        if runner.batched is None and m > 1:  # the batched path fell back: in place it is
            best = None
            break
        rates[f"{m}x{e}"] = 1.0 / per_mask if per_mask > 0 else float("inf")
        if best is None or per_mask < best[0]:
            best = (per_mask, (m, e))
    if failure is not None:
        logger.warning("CUDA out of memory while measuring pass shapes (%s); keeping the shapes that fit", failure)
        free_device_memory(state.device)
    shape = best[1] if best is not None else (1, n_examples)
    runner.choice = {"masks_per_pass": shape[0], "examples_per_pass": shape[1], "device": str(state.device),
                     "rates": rates, "measured_rows": done}
    logger.info("pass shape measured on %s: %d masks x %d examples per pass (models/s: %s)", state.device,
                shape[0], shape[1], ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    return done
