"""Apply a mask to a model: zero ablated components' weights, then restore them.

The seed's semantics: an ablated component's weight slice is zeroed; biases
and normalisation layers keep their values. The model is changed in place and
restored bitwise afterwards (no deepcopy per mask).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from .components import Components

__all__ = ["ablated", "compute_outputs"]


@contextlib.contextmanager
def ablated(model: Any, components: Components, mask: np.ndarray) -> Iterator[Any]:
    """Context manager: inside it, ``model`` has the components with ``mask == False`` zeroed.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from coar_dask.components import select_components
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


def compute_outputs(state: Any, masks: np.ndarray) -> np.ndarray:
    """Outputs ``(n_masks, K)`` of the ablated model for each mask (True = kept)."""
    import torch

    masks = np.asarray(masks, dtype=bool)
    bs = state.experiment.batch_size
    out = np.empty((masks.shape[0], state.n_examples), dtype=np.float32)
    with torch.inference_mode():
        for i, mask in enumerate(masks):
            with ablated(state.model, state.components, mask):
                for s in range(0, state.n_examples, bs):
                    logits = state.model(state.inputs[s : s + bs])
                    out[i, s : s + bs] = state.output_fn(logits.float(), state.labels[s : s + bs]).cpu().numpy()
    return out
