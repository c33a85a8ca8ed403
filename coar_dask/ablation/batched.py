"""Several masks per forward pass: forward hooks on a BatchNorm-folded copy.

The examples are repeated ``M`` times along the batch dimension, and forward
hooks give copy ``m`` of the batch the ablations of mask ``m``
(:class:`BatchedAblation`): for an output unit (Conv2d channel, Linear
neuron) whose weights are zeroed, the module's output is exactly its bias
(conv: at every position), so the hook overwrites those entries with the
bias (0 without bias); for an input unit (GPT-2 ``Conv1D`` row), the hook
zeroes that input feature, which is what a zeroed weight row does. Only the
ablated entries are written (a sparse index-put), so a pass costs one
forward pass of ``M x batch`` rows.

The batched path runs on a copy of the model with eval-mode BatchNorm folded
into the Conv2d/Linear before it (:func:`fold_batchnorm`, ``torch.fx``;
skipped when tracing fails): its weights never change, and an ablated unit
of a folded layer outputs the folded bias, which is ``BN(bias)`` -- what the
original model computes with that unit's weights zeroed and BatchNorm kept.
The engine repeats each pass's examples (tensors, or every tensor of a
mapping such as a tokenizer's ``input_ids`` and ``attention_mask``) ``M``
times, mask-major (:meth:`coar_dask.core.experiment.ExperimentState.batch`);
activations of any rank work as long as their first dimension is that batch
(``(M x B, T, C)`` for sequence models).

Equality: the hooks write the ablated activations exactly, but the layers
run on a batch ``M`` times larger (the math libraries may sum in another
order) and with BatchNorm folded: outputs agree with in-place zeroing
(:mod:`coar_dask.ablation.zeroing`) to float32 rounding. The tests bound the
difference by ``1e-5`` of the output scale on CPU float32 for every kind,
with and without bias (``tests/test_ablation.py``).

Kinds without a hook expression (``nn.MultiheadAttention``'s packed
``in_proj_weight``, and ``out_proj`` Linears, which ``MultiheadAttention``
applies without calling their ``forward``) raise :class:`NotBatchableError`
here and use in-place zeroing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from coar_dask.core.components import Components, get_kind
from coar_dask.errors import ExperimentError, NotBatchableError

__all__ = ["BatchedAblation", "fold_batchnorm", "model_version"]

logger = logging.getLogger(__name__)


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
    >>> from coar_dask.ablation.zeroing import ablated
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


def model_version(model: Any) -> int:
    """Sum of the in-place modification counters of a model's tensors (changes when any is written)."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


def fold_batchnorm(model: Any) -> Any:
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
