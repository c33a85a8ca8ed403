"""Apply masks to a model and compute the ablated model's outputs.

The seed's semantics: an ablated component's weight slice is zeroed; biases
and normalisation layers keep their values. Three ways compute the same
outputs:

``reference_model``
    The seed's way, kept as the reference: deep-copy the model and zero the
    slices, once per mask.
:func:`ablated`
    Zero the slices in place, run, restore them bitwise (no copy per mask).
    Works for every component kind.
:class:`BatchedAblation`
    Several masks per forward pass. The examples are repeated ``M`` times
    along the batch dimension, and forward hooks give copy ``m`` of the batch
    the ablations of mask ``m``: for an output unit (Conv2d channel, Linear
    neuron) whose weights are zeroed, the module's output is exactly its bias
    (conv: at every position), so the hook overwrites those entries with the
    bias (0 without bias); for an input unit (GPT-2 ``Conv1D`` row), the hook
    zeroes that input feature, which is what a zeroed weight row does. Only
    the ablated entries are written (a sparse index-put), so a pass costs one
    forward pass of ``M x batch`` rows.

The batched path runs on a copy of the model with eval-mode BatchNorm folded
into the Conv2d/Linear before it (``torch.fx``; skipped when tracing fails):
its weights never change, and an ablated unit of a folded layer outputs the
folded bias, which is ``BN(bias)`` -- what the original model computes with
that unit's weights zeroed and BatchNorm kept.

Equality: in-place zeroing gives bitwise the same outputs as the deep copy
(same batches). The batched path writes the ablated activations exactly, but
runs the layers on a batch ``M`` times larger (the math libraries may sum in
another order) and with BatchNorm folded: outputs agree to float32 rounding.
The tests bound the difference by ``1e-5`` of the output scale on CPU float32
for every kind, with and without bias (``tests/test_ablation.py``). The first
batched pass of every process is also checked against in-place zeroing (at
``1e-4`` of the scale), and a model that does not fit the hooks' assumptions
(hooked modules not called, a batch dimension that is not first, rows of a
batch that interact) falls back to in-place zeroing with a warning.

Kinds without a hook expression (``nn.MultiheadAttention``'s packed
``in_proj_weight``, and ``out_proj`` Linears, which ``MultiheadAttention``
applies without calling their ``forward``) use in-place zeroing. Masks per
pass pay when one mask's examples are too few to fill a pass (the digits
model: 360 8x8 images); with thousands of large examples per mask (ViT-B/16's
5,000 images) a pass is already full and ``M = 1`` (see
:func:`auto_pass_shape`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from coar_dask.core.components import Components, get_kind
from coar_dask.errors import ExperimentError, NotBatchableError

__all__ = [
    "ablated",
    "reference_model",
    "BatchedAblation",
    "NotBatchableError",
    "compute_outputs",
    "auto_masks_per_pass",
    "AUTO_MAX_ROWS",
    "AUTO_TARGET_ELEMENTS",
    "AUTO_MIN_ROWS",
    "auto_pass_shape",
    "apply_malloc_env",
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


# --------------------------------------------------------------- in place


@contextlib.contextmanager
def ablated(model: Any, components: Components, mask: np.ndarray) -> Iterator[Any]:
    """Context manager: inside it, ``model`` has the components with ``mask == False`` zeroed.

    The zeroed slices are saved and copied back on exit, so the model is
    restored bitwise (also when the body raises).

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from coar_dask.core.components import select_components
    >>> model = nn.Linear(2, 3)
    >>> comps = select_components(model, kinds=["linear"])
    >>> with ablated(model, comps, np.array([True, False, True])):
    ...     float(model.weight[1].abs().sum())
    0.0
    """
    import torch

    saved = []
    try:
        with torch.no_grad():
            for group, units in components.ablated_units(mask):
                param = getattr(model.get_submodule(group.module), group.param)
                idx = torch.as_tensor(units, device=param.device)
                saved.append((param, group.axis, idx, param.index_select(group.axis, idx).clone()))
                param.index_fill_(group.axis, idx, 0)
        yield model
    finally:
        with torch.no_grad():
            for param, axis, idx, values in reversed(saved):
                param.index_copy_(axis, idx, values)


def reference_model(model: Any, components: Components, mask: np.ndarray) -> Any:
    """The seed's way: a deep copy of ``model`` with the ablated slices zeroed (``param[idx] = 0``).

    Slow (a full copy per mask); kept as the reference the fast paths are
    tested against, and as benchmark (a).
    """
    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        for group, units in components.ablated_units(mask):
            param = getattr(model.get_submodule(group.module), group.param)
            index = [slice(None)] * param.ndim
            index[group.axis] = torch.as_tensor(units, device=param.device)
            param[tuple(index)] = 0
    return model


# ----------------------------------------------------------------- batched


@dataclass
class _Site:
    """One selected module and how a hook ablates its units."""

    group: int
    module: Any
    site: str
    feature_dim: int
    bias: Any
    lo: int
    hi: int


class BatchedAblation:
    """Evaluate several masks in one forward pass with forward hooks.

    Parameters
    ----------
    model
        The model (eval mode: rows of a batch must not interact, as they do in
        BatchNorm's training mode).
    components
        Its selected components; every kind must have a hook site (see
        :class:`~coar_dask.core.components.ComponentKind`), else
        :class:`NotBatchableError`.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from coar_dask.core.components import select_components
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> comps = select_components(model)
    >>> masks = np.array([[True] * 6, [False] + [True] * 5])
    >>> x = torch.randn(5, 3)
    >>> logits = BatchedAblation(model, comps).forward(x, masks)   # (2 * 5, 2)
    >>> with ablated(model, comps, masks[1]):
    ...     bool(torch.allclose(logits[5:], model(x), atol=1e-6))
    True
    """

    def __init__(self, model: Any, components: Components):
        from torch import nn

        self.model = model
        self.components = components
        self.sites: list[_Site] = []
        parents = dict(model.named_modules())
        for i, group in enumerate(components.groups):
            kind = get_kind(group.kind)
            if kind.site is None:
                raise NotBatchableError(
                    f"component kind {group.kind!r} (layer {group.module!r}) has no forward-hook form; "
                    f"it is ablated by in-place zeroing."
                )
            parent = parents.get(group.module.rpartition(".")[0]) if "." in group.module else None
            if isinstance(parent, nn.MultiheadAttention):
                raise NotBatchableError(
                    f"layer {group.module!r} belongs to a MultiheadAttention, which uses its weights without "
                    f"calling its forward; it is ablated by in-place zeroing."
                )
            module = model.get_submodule(group.module)
            bias = getattr(module, kind.bias, None) if kind.bias else None
            lo, hi = int(components.offsets[i]), int(components.offsets[i + 1])
            self.sites.append(_Site(i, module, kind.site, kind.feature_dim, bias, lo, hi))
        self._pass: dict[int, tuple[Any, Any, Any]] = {}
        self._rows = (0, 0)
        self._calls: dict[int, int] = {}

    # -- hooks -------------------------------------------------------------
    def _index(self, t: Any, site: _Site, pairs: tuple[Any, Any, Any]) -> tuple[Any, tuple, Any]:
        m_count, batch = self._rows
        if t.shape[0] != m_count * batch:
            raise NotBatchableError(
                f"layer {self.components.groups[site.group].module!r} saw a tensor of shape {tuple(t.shape)} "
                f"whose first dimension is not the batch ({m_count} masks x {batch} examples); the batched "
                f"path needs batch-first activations."
            )
        v = t.unflatten(0, (m_count, batch))
        dim = site.feature_dim + 1 if site.feature_dim >= 0 else v.ndim + site.feature_dim
        if dim < 2:
            raise NotBatchableError(f"feature dimension {site.feature_dim} of layer "
                                    f"{self.components.groups[site.group].module!r} is the batch dimension.")
        m_idx, u_idx, values = pairs
        index: list[Any] = [slice(None)] * v.ndim
        index[0], index[dim] = m_idx, u_idx
        if values is not None:
            values = values.to(v.dtype).reshape((-1,) + (1,) * (v.ndim - 2))
        return v, tuple(index), values

    def _output_hook(self, site: _Site):
        def hook(module: Any, args: Any, out: Any) -> Any:
            self._calls[site.group] = self._calls.get(site.group, 0) + 1
            pairs = self._pass.get(site.group)
            if pairs is None:
                return None
            v, index, values = self._index(out, site, pairs)
            # Weight zeroed, bias kept: the unit outputs exactly its bias.
            v[index] = values if values is not None else 0
            return out

        return hook

    def _input_hook(self, site: _Site):
        def hook(module: Any, args: Any) -> Any:
            self._calls[site.group] = self._calls.get(site.group, 0) + 1
            pairs = self._pass.get(site.group)
            if pairs is None:
                return None
            x = args[0].clone()  # the input may be used elsewhere: never write into it
            v, index, _ = self._index(x, site, pairs)
            v[index] = 0
            return (x,) + tuple(args[1:])

        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator["BatchedAblation"]:
        """Install the hooks for the duration of the block (they do nothing until :meth:`set_masks`)."""
        handles = []
        try:
            for site in self.sites:
                if site.site == "output":
                    handles.append(site.module.register_forward_hook(self._output_hook(site)))
                else:
                    handles.append(site.module.register_forward_pre_hook(self._input_hook(site)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self._pass = {}

    def set_masks(self, masks: np.ndarray, batch: int, device: Any = None) -> None:
        """Prepare the ablations of ``masks`` ``(M, P)`` for forward passes on ``M x batch`` rows."""
        import torch

        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != len(self.components):
            raise ExperimentError(f"masks must have shape (M, {len(self.components)}); got {masks.shape}.")
        self._rows = (masks.shape[0], int(batch))
        self._pass = {}
        self._calls = {}
        for site in self.sites:
            m_idx, u_idx = np.nonzero(~masks[:, site.lo : site.hi])
            if m_idx.size == 0:
                continue
            dev = device if device is not None else _device_of(site.module)
            m_t = torch.as_tensor(m_idx, device=dev)
            u_t = torch.as_tensor(u_idx, device=dev)
            values = site.bias.detach()[u_t] if site.bias is not None else None
            self._pass[site.group] = (m_t, u_t, values)

    def check_calls(self) -> None:
        """Raise :class:`NotBatchableError` if a hook with ablations to apply was not called."""
        missed = [self.components.groups[g].module for g in self._pass if not self._calls.get(g)]
        if missed:
            raise NotBatchableError(
                f"layers {missed[:5]} were not called through their forward during the pass (their "
                f"ablations were not applied); they need in-place zeroing."
            )

    def forward(self, x: Any, masks: np.ndarray) -> Any:
        """Logits ``(M * B, ...)`` of ``M`` ablated models on ``x`` ``(B, ...)``, mask-major."""
        m_count = int(np.asarray(masks).shape[0])
        rep = x.repeat((m_count,) + (1,) * (x.ndim - 1))
        with self.hooks():
            self.set_masks(masks, x.shape[0], x.device)
            logits = self.model(rep)
            self.check_calls()
        return logits


def _device_of(module: Any) -> Any:
    for p in module.parameters(recurse=False):
        return p.device
    return None


def _in_dask_worker() -> bool:
    import sys

    if "distributed" not in sys.modules:  # never imported: not a worker (and the core stays Dask-free)
        return False
    try:
        sys.modules["distributed"].get_worker()
    except (ValueError, AttributeError):
        return False
    return True


# ----------------------------------------------------------- per-state runner


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


# ------------------------------------------------------------------- malloc

_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3,
            "MALLOC_MMAP_MAX_": -4, "MALLOC_ARENA_MAX": -8}
_MALLOC_APPLIED: dict[str, int] | None = None


def apply_malloc_env(*, only_in_dask_worker: bool = True) -> dict[str, int]:
    """Apply the ``MALLOC_*`` environment variables of this process with ``mallopt`` (glibc; once).

    glibc reads ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``... only when a process starts. A Dask nanny sets the
    ``env`` of its worker *after* starting it (only
    ``distributed.nanny.pre-spawn-environ`` is set before, and it holds dask's
    own ``MALLOC_TRIM_THRESHOLD_=65536``), so settings passed as worker
    ``env`` (``coar_dask.runtime.cluster.WORKER_ENV``) would be ignored. This applies
    them at run time, before the first ablated forward pass. Why it matters:
    with dask's setting, every activation above 128 KiB is a fresh ``mmap``
    whose pages fault in and are zeroed on every forward pass; on the digits
    model that triples the CPU time per model (BENCHMARKS.md). Does nothing
    without glibc.

    Parameters
    ----------
    only_in_dask_worker
        Act only inside a Dask worker (default). Elsewhere the variables may be
        left over from a nanny that started workers from this process (it
        writes dask's ``MALLOC_TRIM_THRESHOLD_=65536`` into its own
        environment), which must not be applied.

    Returns
    -------
    dict
        The settings applied (``{env name: value}``).
    """
    if only_in_dask_worker and not _in_dask_worker():
        return {}
    global _MALLOC_APPLIED
    if _MALLOC_APPLIED is not None:
        return _MALLOC_APPLIED
    import ctypes
    import os
    import sys

    applied: dict[str, int] = {}
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
        for name, param in _MALLOPT.items():
            value = os.environ.get(name)
            if mallopt is None or value is None:
                continue
            try:
                number = int(value)
            except ValueError:
                logger.warning("ignoring %s=%r: not an integer", name, value)
                continue
            if mallopt(ctypes.c_int(param), ctypes.c_int(number)) == 1:
                applied[name] = number
            else:
                logger.warning("mallopt refused %s=%d", name, number)
    if applied:
        logger.info("malloc settings applied: %s", applied)
    _MALLOC_APPLIED = applied
    return applied


class _Runner:
    """What a process keeps per experiment state: the batched form (or why not), checks, settings."""

    def __init__(self, state: Any):
        self.lock = threading.Lock()
        self.batched: BatchedAblation | None = None
        self.reason = ""
        self.verified = False
        self.elements_per_example: int | None = None
        experiment = state.experiment
        self.amp = bool(getattr(experiment, "amp", False))
        self.channels_last = bool(getattr(experiment, "channels_last", False))
        self._rep_cache: dict[tuple[int, int, int], tuple[Any, Any]] = {}
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
        self._source_version = _version(state.model)
        folded = _fold_batchnorm(state.model)
        if folded is not None:
            try:
                self.batched = BatchedAblation(folded, state.components)
                self.folded = True
            except NotBatchableError as exc:  # pragma: no cover - same modules, same kinds
                logger.debug("folded model not batchable: %s", exc)

    def refresh(self, state: Any) -> None:
        """Fold again if the model's parameters changed in place since the copy was made."""
        if self.folded and self.batched is not None and _version(state.model) != self._source_version:
            logger.debug("model changed since BatchNorm folding; folding again")
            self._fold(state)

    def prepare(self, state: Any) -> None:
        import torch

        if self.channels_last and state.inputs.ndim == 4:
            state.model.to(memory_format=torch.channels_last)
            state.inputs = state.inputs.contiguous(memory_format=torch.channels_last)
        self.channels_last = False  # done once

    def autocast(self, state: Any) -> Any:
        import torch

        if not self.amp:
            return contextlib.nullcontext()
        device_type = torch.device(state.device).type
        return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)

    def probe(self, state: Any) -> int:
        """Elements per example of the largest hooked activation (one tiny forward pass)."""
        import torch

        if self.elements_per_example is None:
            sizes = []
            handles = [s.module.register_forward_hook(lambda m, a, o: sizes.append(o.numel()))
                       for s in self.batched.sites] if self.batched else []
            try:
                with torch.inference_mode(), self.autocast(state):
                    (self.batched.model if self.batched else state.model)(state.inputs[:1])
            finally:
                for h in handles:
                    h.remove()
            self.elements_per_example = max(sizes, default=1)
        return self.elements_per_example

    def repeated(self, state: Any, start: int, stop: int, m_count: int) -> tuple[Any, Any]:
        key = (start, stop, m_count)
        hit = self._rep_cache.get(key)
        if hit is not None:
            return hit
        x = state.inputs[start:stop]
        x = x.repeat((m_count,) + (1,) * (x.ndim - 1))
        if x.ndim == 4 and state.inputs.is_contiguous(memory_format=_channels_last()) \
                and not state.inputs.is_contiguous():
            x = x.contiguous(memory_format=_channels_last())
        y = state.labels[start:stop].repeat(m_count)
        if x.numel() * x.element_size() <= 64 << 20:  # keep small repeated inputs across blocks
            if len(self._rep_cache) > 8:
                self._rep_cache.clear()
            self._rep_cache[key] = (x, y)
        return x, y


def _version(model: Any) -> int:
    """Sum of the in-place modification counters of a model's tensors (changes when any is written)."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


def _fold_batchnorm(model: Any) -> Any:
    """A copy of ``model`` with eval-mode BatchNorm folded into the Conv2d/Linear before it, or ``None``.

    Only for the batched path, whose hooks never change weights: an ablated
    unit of the folded layer outputs the folded bias, ``BN(bias)``, which is
    what the original outputs when the unit's weights are zeroed (BN kept);
    kept units differ by float rounding. Uses ``torch.fx`` (tracing may fail:
    then ``None``, and the model is used as it is). Saves one pass over every
    folded activation (about 10% of the digits model's time).
    """
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats
               for m in model.modules()):
        return None
    import warnings

    try:
        with warnings.catch_warnings():  # torch.fx imports deprecated torch.jit pieces
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

            folded = fuse(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: keep the model as it is
        logger.debug("BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return None
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.eval()


def _channels_last() -> Any:
    import torch

    return torch.channels_last


_RUNNERS: dict[int, _Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def _device_type(state: Any) -> str:
    import torch

    return torch.device(state.device).type


def _runner(state: Any) -> _Runner:
    apply_malloc_env()
    key = id(state)
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _RUNNERS[key] = _Runner(state)
            weakref.finalize(state, _RUNNERS.pop, key, None)
        return runner


def _inplace_outputs(state: Any, masks: np.ndarray, out: np.ndarray, runner: _Runner) -> None:
    import torch

    bs = state.experiment.batch_size
    unchanged = runner.folded and _version(state.model) == runner._source_version
    with torch.inference_mode(), runner.autocast(state):
        for i, mask in enumerate(masks):
            with ablated(state.model, state.components, mask):
                for s in range(0, state.n_examples, bs):
                    logits = state.model(state.inputs[s : s + bs])
                    out[i, s : s + bs] = state.output_fn(logits.float(), state.labels[s : s + bs]).cpu().numpy()
    if unchanged:  # ablated() restored every value bitwise: the folded copy is still current
        runner._source_version = _version(state.model)


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
                x, y = runner.repeated(state, s, stop, m_count)
                batched.set_masks(chunk, stop - s, state.device)
                logits = batched.model(x)
                batched.check_calls()
                values = state.output_fn(logits.float(), y).reshape(m_count, stop - s)
                out[i : i + m_count, s:stop] = values.cpu().numpy()


def _verify(state: Any, masks: np.ndarray, batched_out: np.ndarray, runner: _Runner) -> None:
    """Check the first batched mask of this process against in-place zeroing (once)."""
    ref = np.empty((1, state.n_examples), dtype=np.float32)
    _inplace_outputs(state, masks[:1], ref, runner)
    scale = max(1.0, float(np.abs(ref).max()))
    tol = (5e-2 if runner.amp else 1e-4) * scale
    err = float(np.abs(batched_out[:1] - ref).max())
    if not err <= tol:
        raise NotBatchableError(
            f"masks per pass disagree with in-place zeroing by {err:.3g} (tolerance {tol:.3g}): the model "
            f"mixes rows of a batch or reshapes the batch dimension; using in-place zeroing."
        )
    runner.verified = True
    logger.debug("batched ablation verified (max difference %.3g)", err)


def compute_outputs(state: Any, masks: np.ndarray, *, masks_per_pass: int | None = None) -> np.ndarray:
    """Outputs ``(n_masks, K)`` float32 of the ablated model for each mask (True = kept).

    Parameters
    ----------
    state
        An :class:`~coar_dask.core.experiment.ExperimentState` (model, examples,
        components, output function, device).
    masks
        Bool ``(n_masks, P)``.
    masks_per_pass
        Masks evaluated per forward pass. ``None``: the experiment's
        ``masks_per_pass`` if it sets one, else automatic
        (:func:`auto_masks_per_pass`). ``1`` uses in-place zeroing. Models or
        kinds that forward hooks cannot express always use in-place zeroing.

    Returns
    -------
    numpy.ndarray
        float32 ``(n_masks, K)``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ExperimentError(f"masks must be 2-D (n_masks, n_components); got shape {masks.shape}.")
    out = np.empty((masks.shape[0], state.n_examples), dtype=np.float32)
    if masks.shape[0] == 0:
        return out
    runner = _runner(state)
    with runner.lock:  # hooks and in-place zeroing both change the shared model
        m_per_pass = masks_per_pass if masks_per_pass is not None else getattr(state.experiment, "masks_per_pass", None)
        examples_per_pass = min(state.experiment.batch_size, state.n_examples)
        if m_per_pass is None and runner.batched is not None:
            target = AUTO_TARGET_ELEMENTS.get(_device_type(state), AUTO_TARGET_ELEMENTS["cpu"])
            m_per_pass, examples_per_pass = auto_pass_shape(examples_per_pass, runner.probe(state), masks.shape[0],
                                                            target_elements=target, min_rows=AUTO_MIN_ROWS)
        m_per_pass = 1 if m_per_pass is None else int(m_per_pass)
        if m_per_pass < 1:
            raise ExperimentError(f"masks_per_pass must be a positive integer; found {m_per_pass}.")
        m_per_pass = min(m_per_pass, masks.shape[0])
        if m_per_pass > 1 and runner.batched is not None:
            runner.refresh(state)
            try:
                _batched_outputs(state, masks, out, runner, m_per_pass, examples_per_pass)
                if not runner.verified:
                    _verify(state, masks, out, runner)
                return out
            except NotBatchableError as exc:
                logger.warning("%s", exc)
                runner.batched, runner.reason = None, str(exc)
        _inplace_outputs(state, masks, out, runner)
    return out
