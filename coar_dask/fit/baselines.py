"""Baseline attributions to compare COAR against: leave-one-out and gradient x parameter.

Both return :class:`~coar_dask.fit.attributions.Attributions` in the same
mask units as :func:`~coar_dask.fit.fit.fit` (``prediction = mask @ weight +
bias``, mask 1 = kept; a positive weight means keeping the component raises
the output), so :func:`~coar_dask.fit.evaluate.evaluate` scores them on the
same held-out store.

:func:`leave_one_out` (LOO)
    ``weight[j] = f(all kept) - f(all kept but j)``: the output change when
    component ``j`` alone is ablated, and ``bias = f(all kept) - sum_j
    weight[j]`` (so the all-kept mask predicts the unablated output exactly).
    The ``P + 1`` ablated models (one per component, and the unablated one as
    the last row) are rows of a zarr store of their own, built as
    :mod:`~coar_dask.runtime.executor` tasks over blocks of components: an
    interrupted run resumes where it stopped, like a build.
:func:`gradient_x_parameter` (GP)
    The first-order estimate: ablating ``j`` changes the output by about
    ``-(w_j . dOutput/dw_j)`` (summed over the component's weights), so its
    weight in mask units is ``+w_j . dOutput/dw_j``. Computed as the gradient
    of the output with respect to a per-example gate on each unit (a forward
    hook scales the unit's weight contribution by the gate, 1 = kept), which
    is exactly that sum: one backward pass per batch of examples, as tasks.
    Kinds with a forward-hook site (Conv2d channels, Linear neurons, GPT-2
    Conv1D features) are supported.

Neuron conductance (Captum) is not provided: it needs Captum and a baseline
input per layer, and does not give one number per component and example in
mask units without choices the paper leaves open. LOO and GP are the
baselines this package computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from coar_dask.ablation.engine import compute_outputs
from coar_dask.core.components import get_kind
from coar_dask.core.experiment import Experiment, load_experiment, load_state
from coar_dask.core.spec import Spec
from coar_dask.core.store import Store, init_store
from coar_dask.errors import BuildError, ExperimentError, StoreMismatchError
from coar_dask.fit.attributions import SIGN_CONVENTION, Attributions
from coar_dask.runtime.executor import TaskSet, run_tasks

__all__ = ["BASELINES", "leave_one_out", "loo_store_for", "loo_block", "loo_from_outputs",
           "gradient_x_parameter", "gp_batch", "forward_outputs"]

logger = logging.getLogger(__name__)

#: The baselines this package computes, by their short names.
BASELINES = {"loo": "leave-one-out", "gp": "gradient x parameter"}

#: Rows (components) per LOO block when none is given.
DEFAULT_COMPONENTS_PER_BLOCK = 64

Progress = Callable[[int, int], None]

# GP installs hooks on the worker's shared model: one GP batch at a time per process.
_GP_LOCK = threading.Lock()


def forward_outputs(state: Any, start: int, stop: int) -> tuple[Any, Any, Any]:
    """``(model output, output values (B,), labels)`` for examples ``start:stop`` of ``state``.

    Uses :meth:`ExperimentState.batch` and ``forward`` where the state has
    them (inputs may be mappings of tensors), else the tensor inputs.
    """
    if hasattr(state, "batch"):
        batch = state.batch(start, stop)
        out = state.forward(batch.inputs)
        return out, state.output_fn(out, batch), batch.labels
    labels = state.labels[start:stop]
    out = state.model(state.inputs[start:stop])
    return out, state.output_fn(out.float(), labels), labels


def _metadata(method: str, experiment: Experiment, state: Any, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "sign_convention": SIGN_CONVENTION,
        "x_name": experiment.x_name,
        "y_name": experiment.y_name,
        "target_fingerprint": experiment.target_fingerprint,
        "experiment": experiment.to_dict(),
        "example_count": state.n_examples,
        "components": state.components.summary(),
        "seconds": round(float(seconds), 4),
        **extra,
    }


# -- leave-one-out ------------------------------------------------------------


def loo_from_outputs(ablated: np.ndarray, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LOO ``(weight (P, K), bias (K,))`` from ``ablated[j]`` = outputs with ``j`` ablated and the
    unablated outputs ``full``.

    Examples
    --------
    >>> w, b = loo_from_outputs(np.array([[1.0], [3.0]]), np.array([4.0]))
    >>> w.ravel().tolist(), b.tolist()
    ([3.0, 1.0], [0.0])
    """
    ablated = np.asarray(ablated, dtype=np.float64)
    full = np.asarray(full, dtype=np.float64).reshape(-1)
    weight = full[None, :] - ablated
    return weight.astype(np.float32), (full - weight.sum(axis=0)).astype(np.float32)


def _loo_masks(rows: np.ndarray, n_components: int) -> np.ndarray:
    """Row ``j < P``: every component kept but ``j``; row ``P``: all kept."""
    masks = np.ones((len(rows), n_components), dtype=bool)
    inside = rows < n_components
    masks[np.flatnonzero(inside), rows[inside]] = False
    return masks


def loo_store_for(path: str | os.PathLike, experiment: Experiment, n_components: int, n_examples: int, *,
                  components_per_block: int | None = None) -> Store:
    """Create (or reopen) the LOO store of ``experiment``: ``P + 1`` rows of float32 outputs.

    Reopening a store made for another model, examples or components raises
    :class:`StoreMismatchError`.
    """
    spec = Spec.for_experiment(n_components + 1, n_components, n_examples, x_name=experiment.x_name,
                               y_name=experiment.y_name, y_dtype="float32")
    store = init_store(path, spec, rows_per_chunk=components_per_block or min(DEFAULT_COMPONENTS_PER_BLOCK,
                                                                                n_components + 1),
                       extra_meta={"baseline": "leave_one_out", "target_fingerprint": experiment.target_fingerprint,
                                   "experiment": experiment.to_dict()})
    recorded = store.meta.get("target_fingerprint")
    if store.meta.get("baseline") != "leave_one_out" or recorded != experiment.target_fingerprint:
        raise StoreMismatchError(
            f"{str(store.path)!r} is not the leave-one-out store of this experiment (it holds "
            f"{store.meta.get('baseline') or 'a build'} rows of {str(recorded)[:12]}…); give another --loo-store path."
        )
    return store


def loo_block(store_path: str, experiment: Experiment, block_index: int) -> int:
    """The task: compute and write LOO block ``block_index`` (its components ablated one at a time)."""
    from coar_dask.core.store import open_store

    store = open_store(store_path)
    block = store.block(block_index)
    state = load_state(experiment)
    masks = _loo_masks(block.rows, state.n_components)
    outputs = compute_outputs(state, masks)
    if not np.isfinite(outputs).all():
        raise BuildError(f"leave-one-out block {block_index} (rows {block.start}-{block.stop - 1}) produced "
                         f"NaN/inf outputs; it is left pending.")
    store.write_block(block_index, {experiment.x_name: masks, experiment.y_name: outputs})
    return len(block)


def _read_outputs(store: Store, y_name: str) -> np.ndarray:
    parts = [data[y_name] for _, data in store.iter_completed([y_name])]
    return np.concatenate(parts).astype(np.float64)


def leave_one_out(experiment: Experiment | Mapping[str, Any] | str | os.PathLike, store: str | os.PathLike, *,
                  client: Any | None = None, components_per_block: int | None = None,
                  progress: Progress | None = None) -> Attributions:
    """Leave-one-out attributions, computed as tasks over blocks of components in a store of their own.

    Parameters
    ----------
    experiment
        What to ablate (its alpha and mask seed are not used).
    store
        Path of the LOO store (created; an interrupted run resumes from its completed blocks).
    client
        A Dask client, or ``None`` to run the blocks in this process.
    components_per_block
        Components per task (default 64).
    progress
        Called with ``(blocks done, blocks to do)``.
    """
    experiment = load_experiment(experiment)
    t0 = time.perf_counter()
    state = load_state(experiment)
    loo = loo_store_for(store, experiment, state.n_components, state.n_examples,
                        components_per_block=components_per_block)
    pending = loo.pending_blocks()
    token = hashlib.sha256(f"{loo.path}|{experiment.target_fingerprint}".encode()).hexdigest()[:8]
    tasks = TaskSet(fn=loo_block, tasks=[(b.index, (str(loo.path), experiment, b.index)) for b in pending],
                    key=lambda i: f"loo-block-{i:06d}-{token}",
                    resources={"GPU": 1} if str(experiment.device).startswith("cuda") else None, retries=2)
    done = [0]

    def on_result(index: int, rows: int) -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(pending))

    run_tasks(tasks, client, on_result=on_result)
    outputs = _read_outputs(loo, experiment.y_name)
    P = state.n_components
    if outputs.shape[0] != P + 1:
        raise BuildError(f"leave-one-out store {str(loo.path)!r} has {outputs.shape[0]} of {P + 1} rows "
                         f"completed; run leave_one_out again to finish it.")
    weight, bias = loo_from_outputs(outputs[:P], outputs[P])
    meta = _metadata("loo", experiment, state, time.perf_counter() - t0, loo_store=str(loo.path),
                     blocks_computed=len(pending))
    return Attributions(weight, bias, np.zeros(state.n_examples, np.float32), meta)


# -- gradient x parameter -----------------------------------------------------


def _gate_shape(t: Any, dim: int, n: int, n_units: int, module: str) -> list[int]:
    if t.shape[0] != n:
        raise ExperimentError(f"layer {module!r} saw a tensor of shape {tuple(t.shape)} whose first dimension "
                              f"is not the batch ({n}); gradient x parameter needs batch-first activations.")
    shape = [1] * t.ndim
    shape[0], shape[dim if dim >= 0 else t.ndim + dim] = n, n_units
    return shape


@contextlib.contextmanager
def _gates(state: Any, n: int) -> Iterator[list[Any]]:
    """Per-example gates (ones, requiring grad) on every component; hooks scale each unit's weight term."""
    import torch

    gates, handles = [], []
    try:
        for group in state.components.groups:
            kind = get_kind(group.kind)
            if kind.site is None:
                raise ExperimentError(f"gradient x parameter needs a forward-hook form of component kind "
                                      f"{group.kind!r} (layer {group.module!r}); use leave-one-out for it.")
            module = state.model.get_submodule(group.module)
            gate = torch.ones(n, group.n_units, device=state.device, requires_grad=True)
            gates.append(gate)
            bias = getattr(module, kind.bias, None) if kind.bias else None
            handles.append(_hook(module, kind, gate, bias, n, group.module))
        yield gates
    finally:
        for h in handles:
            h.remove()


def _hook(module: Any, kind: Any, gate: Any, bias: Any, n: int, name: str) -> Any:
    if kind.site == "output":
        def out_hook(mod: Any, args: Any, out: Any) -> Any:
            g = gate.reshape(_gate_shape(out, kind.feature_dim, n, gate.shape[1], name))
            if bias is None:
                return out * g
            b = bias.reshape([-1 if i == (kind.feature_dim % out.ndim) else 1 for i in range(out.ndim)])
            return b + g * (out - b)  # the unit's weight term scaled by the gate, the bias kept

        return module.register_forward_hook(out_hook)

    def in_hook(mod: Any, args: Any) -> Any:
        x = args[0]
        g = gate.reshape(_gate_shape(x, kind.feature_dim, n, gate.shape[1], name))
        return (x * g,) + tuple(args[1:])

    return module.register_forward_pre_hook(in_hook)


def gp_batch(experiment: Experiment, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The task: GP weights ``(P, stop - start)`` and unablated outputs of examples ``start:stop``."""
    import torch

    state = load_state(experiment)
    n = stop - start
    with _GP_LOCK, torch.enable_grad(), _gates(state, n) as gates:
        _, values, _ = forward_outputs(state, start, stop)
        values = values.float()
        if not values.requires_grad:
            raise ExperimentError("the output does not depend on any selected component; check the experiment's "
                                  "components.")
        grads = torch.autograd.grad(values.sum(), gates, allow_unused=True)
    missing = [g.module for g, d in zip(state.components.groups, grads) if d is None]
    if missing:
        raise ExperimentError(f"layers {missing[:5]} were not called through their forward; gradient x "
                              f"parameter cannot gate them (use leave-one-out).")
    weight = torch.cat(grads, dim=1).detach().cpu().numpy().T
    return np.ascontiguousarray(weight, dtype=np.float32), values.detach().cpu().numpy().astype(np.float32)


def gradient_x_parameter(experiment: Experiment | Mapping[str, Any] | str | os.PathLike, *,
                         client: Any | None = None, examples_per_task: int | None = None) -> Attributions:
    """Gradient x parameter attributions: one backward pass per batch of examples, as tasks.

    Parameters
    ----------
    experiment
        What to attribute (its alpha and mask seed are not used).
    client
        A Dask client, or ``None`` to run the batches in this process.
    examples_per_task
        Examples per task and backward pass (default: the experiment's ``batch_size``).
    """
    experiment = load_experiment(experiment)
    t0 = time.perf_counter()
    state = load_state(experiment)
    K, step = state.n_examples, int(examples_per_task or experiment.batch_size)
    if step < 1:
        raise ExperimentError(f"examples_per_task must be a positive integer; found {examples_per_task!r}.")
    starts = list(range(0, K, step))
    token = experiment.target_fingerprint[:8]
    tasks = TaskSet(fn=gp_batch, tasks=[(i, (experiment, s, min(s + step, K))) for i, s in enumerate(starts)],
                    key=lambda i: f"gp-batch-{i:06d}-{token}",
                    resources={"GPU": 1} if str(experiment.device).startswith("cuda") else None, retries=2)
    weight = np.zeros((state.n_components, K), dtype=np.float32)
    full = np.zeros(K, dtype=np.float64)

    def on_result(index: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        s = starts[index]
        weight[:, s : s + result[0].shape[1]] = result[0]
        full[s : s + result[0].shape[1]] = result[1]

    run_tasks(tasks, client, on_result=on_result)
    bias = (full - weight.astype(np.float64).sum(axis=0)).astype(np.float32)
    meta = _metadata("gp", experiment, state, time.perf_counter() - t0)
    return Attributions(weight, bias, np.zeros(K, np.float32), meta)
