"""Exact ablation semantics: zero a component's weight slice, keep the rest.

The seed's rule: an ablated component's weight slice is zeroed; biases and
normalisation layers keep their values. Two ways apply it here, for every
component kind:

:func:`reference_model`
    The seed's way, kept as the reference: deep-copy the model and zero the
    slices, once per mask.
:func:`ablated`
    Zero the slices in place, run, restore them bitwise (no copy per mask).

Both give bitwise the same outputs on the same batches. The batched path
(:mod:`coar_dask.ablation.batched`) is tested against them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import numpy as np

from coar_dask.core.components import Components

__all__ = ["ablated", "reference_model"]


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
    >>> model = nn.Sequential(nn.Linear(2, 3))  # the root module itself is never a component
    >>> comps = select_components(model, kinds=["linear"])
    >>> with ablated(model, comps, np.array([True, False, True])):
    ...     float(model[0].weight[1].detach().abs().sum())
    0.0
    >>> bool(model[0].weight[1].detach().abs().sum() > 0)  # restored on exit
    True
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
