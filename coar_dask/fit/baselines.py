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

:func:`neuron_conductance` (NC) and :func:`internal_influence` (II)
    The paper's other two baselines, through Captum (``LayerConductance``,
    ``InternalInfluence``; the ``baselines`` extra): for each component
    group's layer, integrated along the straight path from a zero input to
    the example (``steps`` points, :data:`DEFAULT_STEPS`), reduced to one
    number per component in the package's component order: summed over
    positions for Conv2d channels, over every dimension but the last for
    Linear neurons, and over positions of the layer *input* for GPT-2 Conv1D
    rows. Conductance uses the trapezoid rule (its points include both
    ends, so the units' conductances add up to ``output(x) - output(0)``),
    internal influence Gauss-Legendre. Models fed a mapping with ``input_ids`` (a tokenizer's output) are
    integrated in the input-embedding space instead (zero embeddings, through
    ``inputs_embeds``). Costs ``steps`` forward and backward passes per
    component group and batch, as tasks.

Every method's model work runs in tasks (:mod:`~coar_dask.runtime.executor`):
on the workers when a client is given, GPU-annotated when the experiment's
device is CUDA, after checking that the cluster has GPU workers
(:func:`~coar_dask.runtime.gpu.check_gpu_workers`); this process loads the
experiment on the CPU only to count components and examples
(:func:`~coar_dask.runtime.gpu.client_experiment`).
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
from coar_dask.errors import BuildError, ConfigError, ExperimentError, MissingDependencyError, StoreMismatchError
from coar_dask.fit.attributions import SIGN_CONVENTION, Attributions
from coar_dask.runtime.executor import TaskSet, run_tasks
from coar_dask.runtime.gpu import check_gpu_workers, client_experiment, is_cuda

__all__ = ["BASELINES", "HOOK_METHODS", "DEFAULT_STEPS", "leave_one_out", "loo_store_for", "loo_block",
           "loo_from_outputs", "gradient_x_parameter", "gp_batch", "forward_outputs", "neuron_conductance",
           "internal_influence", "captum_batch", "captum_available", "task_resources", "check_hook_kinds"]

logger = logging.getLogger(__name__)

#: The baselines this package computes, by their short names.
BASELINES = {"loo": "leave-one-out", "gp": "gradient x parameter", "nc": "neuron conductance",
             "ii": "internal influence"}
#: The baselines that need a forward-hook site on every component (not leave-one-out).
HOOK_METHODS = ("gp", "nc", "ii")
#: Points of the path integral of neuron conductance and internal influence (Captum's ``n_steps``).
DEFAULT_STEPS = 20

#: Rows (components) per LOO block when none is given.
DEFAULT_COMPONENTS_PER_BLOCK = 64

Progress = Callable[[int, int], None]

# GP and Captum install hooks on the worker's shared model: one such batch at a time per process.
_GP_LOCK = threading.Lock()


def task_resources(experiment: Experiment, client: Any | None, what: str) -> dict[str, float] | None:
    """Dask resources of the tasks of ``experiment`` (``{"GPU": 1}`` when its device is CUDA).

    With a client and a CUDA device, first refuses (:class:`ExperimentError`) a cluster whose workers
    advertise no GPU: the tasks would wait for one forever.
    """
    if not is_cuda(experiment.device):
        return None
    if client is not None:
        check_gpu_workers(client, what, ExperimentError,
                          "`device: cpu` in the experiment (or --cluster none to run in this process)")
    return {"GPU": 1}


def _counts(experiment: Experiment) -> Any:
    """The experiment loaded in this process on the CPU, to count components and examples only."""
    return load_state(client_experiment(experiment))


def check_hook_kinds(components: Any, method: str) -> None:
    """Refuse a hook-based baseline (``gp``, ``nc``, ``ii``) on component kinds without a forward-hook site."""
    for group in components.groups:
        if get_kind(group.kind).site is None:
            raise ExperimentError(
                f"{BASELINES[method]} ({method}) needs a forward-hook form of every component, but kind "
                f"{group.kind!r} (layer {group.module!r}) has none (only in-place zeroing ablates it); compare "
                f"without it: --methods coar,loo (methods=['coar', 'loo'])."
            )


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
    state = _counts(experiment)
    resources = task_resources(experiment, client, "leave-one-out block")
    loo = loo_store_for(store, experiment, state.n_components, state.n_examples,
                        components_per_block=components_per_block)
    pending = loo.pending_blocks()
    token = hashlib.sha256(f"{loo.path}|{experiment.target_fingerprint}".encode()).hexdigest()[:8]
    tasks = TaskSet(fn=loo_block, tasks=[(b.index, (str(loo.path), experiment, b.index)) for b in pending],
                    key=lambda i: f"loo-block-{i:06d}-{token}", resources=resources, retries=2)
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


def _example_tasks(experiment: Experiment, n_examples: int, examples_per_task: int | None) -> list[int]:
    step = examples_per_task if examples_per_task is not None else experiment.batch_size
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ConfigError(f"examples_per_task must be a positive integer; found {examples_per_task!r}.")
    return list(range(0, n_examples, int(step)))


def _per_example_tasks(method: str, experiment: Experiment, client: Any | None, examples_per_task: int | None,
                       fn: Callable[..., Any], extra: tuple[Any, ...] = ()) -> Attributions:
    """Run ``fn(experiment, *extra, start, stop) -> (weight (P, n), outputs (n,))`` over batches of examples
    as tasks and assemble the attributions (bias: the all-kept mask predicts the unablated output)."""
    t0 = time.perf_counter()
    state = _counts(experiment)
    check_hook_kinds(state.components, method)
    K = state.n_examples
    starts = _example_tasks(experiment, K, examples_per_task)
    stops = starts[1:] + [K]
    resources = task_resources(experiment, client, f"{BASELINES[method]} batch")
    token = experiment.target_fingerprint[:8]
    tasks = TaskSet(fn=fn, tasks=[(i, (experiment, *extra, s, e)) for i, (s, e) in enumerate(zip(starts, stops))],
                    key=lambda i: f"{method}-batch-{i:06d}-{token}", resources=resources, retries=2)
    weight = np.zeros((state.n_components, K), dtype=np.float32)
    full = np.zeros(K, dtype=np.float64)

    def on_result(index: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        s = starts[index]
        weight[:, s : s + result[0].shape[1]] = result[0]
        full[s : s + result[0].shape[1]] = result[1]

    run_tasks(tasks, client, on_result=on_result)
    bias = (full - weight.astype(np.float64).sum(axis=0)).astype(np.float32)
    meta = _metadata(method, experiment, state, time.perf_counter() - t0,
                     **({"steps": int(extra[1]), "baseline_input": "zeros"} if extra else {}))
    return Attributions(weight, bias, np.zeros(K, np.float32), meta)


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
    return _per_example_tasks("gp", load_experiment(experiment), client, examples_per_task, gp_batch)


# -- neuron conductance and internal influence (Captum) -----------------------------


# Conductance telescopes over the path's points (gradient x activation difference): the trapezoid rule's
# points include both ends, so the units' conductances sum to output(x) - output(0) (Gauss-Legendre's
# inner points lose the ends' share). Internal influence integrates a gradient: Gauss-Legendre.
_CAPTUM_RULE = {"nc": "riemann_trapezoid", "ii": "gausslegendre"}


def captum_available() -> bool:
    """Whether Captum (neuron conductance, internal influence) can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec("captum") is not None


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise MissingDependencyError(
            "neuron conductance and internal influence need Captum: pip install 'coar_dask[baselines]' "
            "(or pip install captum)."
        ) from None
    return captum.attr


def _path_inputs(state: Any, batch: Any) -> tuple[Any, tuple[Any, ...], Callable[..., Any]]:
    """``(float inputs to integrate from zero, extra forward args, forward(x, *extra) -> outputs (n,))``.

    Tensor inputs are integrated as they are; a mapping with ``input_ids`` is integrated in the model's
    input-embedding space (``inputs_embeds``), the ids kept for the output function.
    """
    from coar_dask.core.outputs import Batch

    inputs = batch.inputs
    if not isinstance(inputs, Mapping):
        if not inputs.is_floating_point():
            raise ExperimentError(f"neuron conductance and internal influence integrate from a zero input, "
                                  f"which needs float inputs; found {inputs.dtype} (pass token ids as a mapping "
                                  f"with 'input_ids' to a model with get_input_embeddings()).")

        def forward(x: Any, labels: Any, index: Any) -> Any:
            return state.output_fn(state.model(x), Batch(x, labels, index)).float()

        return inputs, (batch.labels, batch.index), forward
    embeddings = getattr(state.model, "get_input_embeddings", None)
    if "input_ids" not in inputs or embeddings is None:
        raise ExperimentError(f"neuron conductance and internal influence on mapping inputs need 'input_ids' "
                              f"and a model with get_input_embeddings(); found keys {sorted(inputs)}.")
    keys = sorted(k for k in inputs if k != "input_ids")
    x = embeddings()(inputs["input_ids"]).detach()

    def forward_embeds(e: Any, labels: Any, index: Any, ids: Any, *values: Any) -> Any:
        kw = dict(zip(keys, values))
        out = state.model(inputs_embeds=e, **kw)
        return state.output_fn(out, Batch({"input_ids": ids, **kw}, labels, index)).float()

    return x, (batch.labels, batch.index, inputs["input_ids"], *(inputs[k] for k in keys)), forward_embeds


def _per_unit(attr: Any, feature_dim: int, n_units: int, module: str) -> Any:
    """``(n, units)``: a layer attribution summed over every dimension but the batch and the unit's."""
    if isinstance(attr, (tuple, list)):
        attr = attr[0]
    dim = feature_dim % attr.ndim
    if dim == 0 or attr.shape[dim] != n_units:
        raise ExperimentError(f"layer {module!r} gave attributions of shape {tuple(attr.shape)}, which do not "
                              f"have its {n_units} units in dimension {feature_dim}.")
    moved = attr.movedim(dim, -1)
    return moved.reshape(moved.shape[0], -1, n_units).sum(dim=1)


def captum_batch(experiment: Experiment, method: str, steps: int, start: int, stop: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The task: ``nc`` or ``ii`` weights ``(P, stop - start)`` and unablated outputs of examples ``start:stop``."""
    import torch

    attr = _captum()
    cls = {"nc": attr.LayerConductance, "ii": attr.InternalInfluence}[method]
    state = load_state(experiment)
    batch = state.batch(start, stop)
    parts = []
    with _GP_LOCK, torch.enable_grad():
        x, extra, forward = _path_inputs(state, batch)
        with torch.no_grad():
            values = forward(x, *extra)
        for group in state.components.groups:
            kind = get_kind(group.kind)
            layer = state.model.get_submodule(group.module)
            a = cls(forward, layer).attribute(x, baselines=torch.zeros_like(x), additional_forward_args=extra,
                                              n_steps=int(steps), method=_CAPTUM_RULE[method],
                                              attribute_to_layer_input=kind.site == "input")
            parts.append(_per_unit(a.detach() if hasattr(a, "detach") else a, kind.feature_dim, group.n_units,
                                   group.module).float())
    weight = torch.cat(parts, dim=1).cpu().numpy().T
    return np.ascontiguousarray(weight, dtype=np.float32), values.cpu().numpy().astype(np.float32)


def _captum_method(method: str, experiment: Any, client: Any | None, examples_per_task: int | None,
                   steps: int) -> Attributions:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ConfigError(f"steps must be an integer >= 2 (points of the path integral); found {steps!r}.")
    _captum()  # a missing Captum fails here, before any task
    return _per_example_tasks(method, load_experiment(experiment), client, examples_per_task, captum_batch,
                              (method, int(steps)))


def neuron_conductance(experiment: Experiment | Mapping[str, Any] | str | os.PathLike, *,
                       client: Any | None = None, examples_per_task: int | None = None,
                       steps: int = DEFAULT_STEPS) -> Attributions:
    """Neuron conductance (Captum's ``LayerConductance``) per component and example, as tasks.

    A component's conductance is its share of ``output(example) - output(zero input)`` along the
    straight path between them: positive when the unit carries the output up, so, like the other
    methods, a positive weight means keeping the component raises the output.

    Parameters
    ----------
    experiment
        What to attribute (its alpha and mask seed are not used).
    client
        A Dask client, or ``None`` to run the batches in this process.
    examples_per_task
        Examples per task (default: the experiment's ``batch_size``); each task runs ``steps``
        forward and backward passes of that many examples per component group.
    steps
        Points of the path integral (default :data:`DEFAULT_STEPS`).
    """
    return _captum_method("nc", experiment, client, examples_per_task, steps)


def internal_influence(experiment: Experiment | Mapping[str, Any] | str | os.PathLike, *,
                       client: Any | None = None, examples_per_task: int | None = None,
                       steps: int = DEFAULT_STEPS) -> Attributions:
    """Internal influence (Captum's ``InternalInfluence``): the output's gradient with respect to each
    unit, integrated along the path from a zero input; one number per component and example, as tasks.

    Parameters are those of :func:`neuron_conductance`.
    """
    return _captum_method("ii", experiment, client, examples_per_task, steps)
