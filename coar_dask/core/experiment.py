"""What to ablate and measure: the experiment description, and its worker-side state.

An :class:`Experiment` names a model factory and an examples factory by
import path, selects components, and fixes the output function, alpha and
mask seed. It is small, frozen and picklable: build tasks carry it, and each
worker process loads the model and examples once (:func:`load_state`) and
keeps them on its device across blocks.

What is computed (model, examples, components, output, alpha, mask seed,
array names) enters :attr:`Experiment.fingerprint`, which the store records;
how it runs (batch size, device) does not.

YAML form (see ``configs/digits.yaml``)::

    model:
      factory: coar_dask.zoo.digits:load_model
      kwargs: {}
    examples:
      factory: coar_dask.zoo.digits:heldout_examples
    components:
      include: [conv]
      kinds: [conv2d]
    output: margin
    alpha: 0.05
    mask_seed: 0
    arrays: {x_name: masks, y_name: margins, y_dtype: float16}
    run: {batch_size: 512, device: cpu}
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from coar_dask.config import factory_timeout
from coar_dask.core.components import Components, select_components
from coar_dask.core.examples import (DatasetExamples, DeviceFeeder, TensorExamples, as_inputs, as_labels,
                                     one_line, rows_of, split_examples)
from coar_dask.errors import CoarError, ConfigError, ExperimentError, FactoryError, FactoryTimeoutError, OutputError
from coar_dask.core.masks import check_alpha
from coar_dask.core.outputs import OUTPUTS, Batch, check_values, find_logits, get_output

__all__ = ["Experiment", "ExperimentState", "call_factory", "load_experiment", "load_state", "warm_up",
           "import_object", "is_out_of_memory", "free_device_memory", "one_line"]

logger = logging.getLogger(__name__)

_TOP_KEYS = {"model", "examples", "components", "output", "alpha", "mask_seed", "arrays", "run", "description"}
_FACTORY_KEYS = {"factory", "kwargs"}
_COMPONENT_KEYS = {"include", "exclude", "kinds"}
_ARRAY_KEYS = {"x_name", "y_name", "y_dtype"}
_RUN_KEYS = {"batch_size", "device", "masks_per_pass", "amp", "channels_last"}


def _check_keys(data: Mapping[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in {where}; valid keys are {sorted(valid)}.")


def _digest(data: Mapping[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def import_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` (the only way factories are loaded)."""
    if not isinstance(path, str) or ":" not in path:
        raise ExperimentError(
            f"factory {path!r} must be an import path 'package.module:function', e.g. "
            f"'coar_dask.zoo.digits:load_model'."
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExperimentError(
            f"cannot import module {module_name!r} for factory {path!r} ({exc}); check the name, and make "
            f"the module importable in every process: run from the folder that holds it, add that folder to "
            f"PYTHONPATH, pip install it, or send it to running workers with client.upload_file()."
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExperimentError(f"module {module_name!r} has no attribute {attr!r} (factory {path!r}).")
        obj = getattr(obj, part)
    return obj


def _output_name(output: Any) -> str:
    """A registered output name or an import path; a function becomes its import path."""
    if callable(output):
        module, name = getattr(output, "__module__", None), getattr(output, "__qualname__", "")
        path = f"{module}:{name}"
        if module in (None, "__main__", "__mp_main__") or "<" in name:
            raise ExperimentError(
                f"output function {name or output!r} is defined in {module!r}, where worker processes cannot "
                f"import it; define it at the top level of a module and pass it (or 'module:function')."
            )
        if import_object(path) is not output:
            raise ExperimentError(f"output function {path!r} does not import back as itself; define it at the "
                                  f"top level of its module.")
        return path
    if not isinstance(output, str) or not output:
        raise ExperimentError(f"output must be a registered name or 'package.module:function'; found {output!r}.")
    if ":" not in output:
        get_output(output)
    return output


def resolve_output(output: str) -> Any:
    """The output function named by a registered name or an import path."""
    if ":" not in output:
        return get_output(output)
    fn = import_object(output)
    if not callable(fn):
        raise ExperimentError(f"output {output!r} is a {type(fn).__name__}, not a function fn(out, batch).")
    return fn


def call_factory(kind: str, path: str, kwargs: Mapping[str, Any], timeout: Any = None) -> Any:
    """Import and call an experiment's factory; every failure is one :class:`FactoryError` naming it.

    A factory that raises (on import or when called) or calls ``sys.exit()``
    becomes a :class:`~coar_dask.errors.FactoryError`; one that does not
    return within ``timeout`` (default ``None``: ``dask.config`` key
    ``coar-dask.factory-timeout``, 10 minutes; ``0``: no limit)
    a :class:`~coar_dask.errors.FactoryTimeoutError`. With a limit the
    factory runs in a daemon thread that this (calling) thread waits for; a
    factory still running at the limit is abandoned -- Python cannot stop a
    thread -- and keeps what it holds until the process ends. Errors are
    raised in the calling thread only; Ctrl-C (``KeyboardInterrupt``) is never
    caught.

    Parameters
    ----------
    kind
        ``"model"`` or ``"examples"``: named in the messages.
    path, kwargs
        The factory's import path ``"package.module:function"`` and keyword arguments.
    """
    where = f"{kind} factory {path!r}"
    limit = factory_timeout(timeout)
    if limit is None:
        return _run_factory(path, kwargs, where)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = _run_factory(path, kwargs, where)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"coar-dask {kind} factory", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise FactoryTimeoutError(
            f"{where} did not return within {limit:g} s; make it return sooner (e.g. cache downloads and "
            f"datasets on local disk), or raise the limit with coar-dask.factory-timeout (e.g. "
            f"DASK_COAR_DASK__FACTORY_TIMEOUT=30m; 0: no limit)."
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run_factory(path: str, kwargs: Mapping[str, Any], where: str) -> Any:
    try:
        fn = import_object(path)
        if not callable(fn):
            raise FactoryError(f"{where} is a {type(fn).__name__}, not a function; name a function that returns "
                               f"the {where.split()[0]}.")
        return fn(**kwargs)
    except CoarError:
        raise
    except SystemExit as exc:  # sys.exit() in a factory must not end a worker (or the CLI) with exit 0
        raise FactoryError(f"{where} called sys.exit({exc.code!r}); a factory must return its value or raise "
                           f"an exception, not exit.") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: one line naming it
        module, _, attr = path.partition(":")
        raise FactoryError(
            f"{where} raised {one_line(exc)}; run it alone to see the traceback: python -c "
            f"\"import {module}; {module}.{attr}()\"."
        ) from None


def _names(field_name: str, value: Any) -> tuple[str, ...]:
    """A component selection field as a tuple of strings (one name, or a list of them)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ExperimentError(
        f"{field_name} must be a name or a list of names (module-name patterns, or kinds such as 'conv2d'); "
        f"found {value!r}. For example: {field_name}=['conv'] (YAML: components: {{{field_name}: [conv]}})."
    )


#: ``run.amp`` values: the autocast dtype of the ablated forward passes.
AMP_MODES = ("bf16", "fp16", "off")


def _amp(value: Any) -> str:
    """``run.amp`` normalised: ``bf16``, ``fp16`` or ``off`` (YAML's ``off``/``false`` read as False)."""
    if value is False or value is None:
        return "off"
    if value is True:
        raise ExperimentError(
            "run.amp: true is no longer accepted (it meant float16 on CUDA, bfloat16 on CPU); write amp: bf16 "
            "(bfloat16 autocast: float32's range, recommended on GPUs) or amp: fp16 (float16: overflow risk on "
            "GPT-2/ViT), or amp: off."
        )
    if isinstance(value, str) and value.lower() in AMP_MODES:
        return value.lower()
    raise ExperimentError(f"run.amp must be one of {list(AMP_MODES)}; found {value!r}. For example: "
                          f"run: {{amp: bf16}}.")


def _check_y_dtype(y_dtype: Any) -> None:
    """Outputs are stored as floating point: an integer store wraps them (a margin of -11.66 became 245)."""
    try:
        dtype = np.dtype(y_dtype) if isinstance(y_dtype, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "f":
        raise ExperimentError(
            f"y_dtype must be a floating-point dtype (float16, float32 or float64); found {y_dtype!r}. Outputs "
            f"are real numbers: an integer dtype would wrap them. Set arrays: {{y_dtype: float32}}."
        )


@dataclass(frozen=True)
class Experiment:
    """A frozen description of what to build.

    Parameters
    ----------
    model
        Import path of a function returning the trained ``nn.Module``.
    examples
        Import path of the examples factory. It returns ``(inputs, labels)``,
        ``inputs`` alone, or a map-style ``torch.utils.data.Dataset`` whose
        items are one of those (collated in batches of ``batch_size``).
        ``inputs`` is a tensor (``model(inputs)``) or a mapping of tensors
        sharing their first dimension, e.g. a tokenizer's output
        (``model(**inputs)``). Examples stay in host memory and one batch at
        a time moves to ``device`` (see :func:`load_state`).
    model_kwargs, examples_kwargs
        Keyword arguments of the factories (JSON-able).
    include, exclude, kinds
        Component selection (see :func:`coar_dask.core.components.select_components`).
    output
        The output recorded per example: a registered name (``"margin"``,
        ``"correct_logit"``, ``"lm_margin"``, ``"lm_logprob"``; see
        :mod:`coar_dask.core.outputs`), an import path
        ``"package.module:function"`` of ``fn(out, batch) -> (B,)``, or such a
        function itself (stored as its import path, which every worker imports).
    alpha
        Fraction of components ablated per mask, in (0, 1).
    mask_seed
        Seed of the masks: row ``i``'s mask depends only on it and ``i``.
    x_name, y_name, y_dtype
        Names of the mask and output arrays in the store, and the outputs' dtype.
    batch_size, device
        How to run (not part of the fingerprint).
    masks_per_pass, amp, channels_last
        How to run the ablations (not part of the fingerprint): masks evaluated
        per forward pass (``None``: automatic, ``1``: one at a time; see
        :func:`coar_dask.ablation.engine.compute_outputs`), autocast
        (``"bf16"``: bfloat16, the GPU configs' setting; ``"fp16"``: float16,
        whose range GPT-2 and ViT activations can overflow; ``"off"``:
        float32), and the ``channels_last`` memory format.
    """

    model: str
    examples: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    examples_kwargs: Mapping[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("conv2d", "linear")
    output: str = "margin"
    alpha: float = 0.05
    mask_seed: int = 0
    x_name: str = "masks"
    y_name: str = "margins"
    y_dtype: str = "float16"
    batch_size: int = 512
    device: str = "cpu"
    masks_per_pass: int | None = None
    amp: str = "off"
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "examples"):
            value = getattr(self, name)
            if not isinstance(value, str) or ":" not in value:
                raise ExperimentError(
                    f"experiment.{name} must be an import path 'package.module:function'; found {value!r}."
                )
        for name in ("include", "exclude", "kinds"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "examples_kwargs", dict(self.examples_kwargs))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if isinstance(self.mask_seed, bool) or not isinstance(self.mask_seed, int) or self.mask_seed < 0:
            raise ExperimentError(f"mask_seed must be a non-negative integer; found {self.mask_seed!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ExperimentError(f"batch_size must be a positive integer; found {self.batch_size!r}.")
        mpp = self.masks_per_pass
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, int) or mpp <= 0):
            raise ExperimentError(f"masks_per_pass must be a positive integer or null (automatic); found {mpp!r}.")
        object.__setattr__(self, "amp", _amp(self.amp))
        if not isinstance(self.channels_last, bool):
            raise ExperimentError(f"channels_last must be true or false; found {self.channels_last!r}.")
        object.__setattr__(self, "output", _output_name(self.output))
        _check_y_dtype(self.y_dtype)
        if self.x_name == self.y_name:
            raise ExperimentError("x_name and y_name must differ.")
        if not str(self.device).startswith(("cpu", "cuda")):
            raise ExperimentError(f"device must be 'cpu' or 'cuda[:N]'; found {self.device!r}.")

    # -- identity ---------------------------------------------------------
    def _what(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "examples": self.examples,
            "examples_kwargs": self.examples_kwargs,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "kinds": list(self.kinds),
            "output": self.output,
            "alpha": self.alpha,
            "mask_seed": self.mask_seed,
            "x_name": self.x_name,
            "y_name": self.y_name,
            "y_dtype": self.y_dtype,
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of what is computed (not of how it runs)."""
        return _digest(self._what())

    @property
    def target_fingerprint(self) -> str:
        """sha256 of the model, examples, components and output, without the mask
        sampling (seed, alpha): equal for a build store and its evaluation stores,
        so attributions can be checked against either."""
        what = self._what()
        del what["alpha"], what["mask_seed"]
        return _digest(what)

    def replace(self, **changes: Any) -> "Experiment":
        """A copy with some fields changed (e.g. another mask seed for evaluation)."""
        return dataclasses.replace(self, **changes)

    # -- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The nested YAML form."""
        return {
            "model": {"factory": self.model, "kwargs": dict(self.model_kwargs)},
            "examples": {"factory": self.examples, "kwargs": dict(self.examples_kwargs)},
            "components": {"include": list(self.include), "exclude": list(self.exclude), "kinds": list(self.kinds)},
            "output": self.output,
            "alpha": self.alpha,
            "mask_seed": self.mask_seed,
            "arrays": {"x_name": self.x_name, "y_name": self.y_name, "y_dtype": self.y_dtype},
            "run": {"batch_size": self.batch_size, "device": self.device, "masks_per_pass": self.masks_per_pass,
                    "amp": self.amp, "channels_last": self.channels_last},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "experiment") -> "Experiment":
        """Build from the nested YAML form; unknown keys are an error listing the valid ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a mapping (YAML object); found {type(data).__name__}.")
        _check_keys(data, _TOP_KEYS, source)
        kwargs: dict[str, Any] = {}
        for section, prefix in (("model", "model"), ("examples", "examples")):
            entry = data.get(section)
            if entry is None:
                raise ConfigError(f"{source} is missing '{section}: {{factory: package.module:function}}'.")
            if isinstance(entry, str):
                entry = {"factory": entry}
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{source}: '{section}' must be a mapping with 'factory' and optional 'kwargs'.")
            _check_keys(entry, _FACTORY_KEYS, f"{source}: {section}")
            kwargs[prefix] = entry.get("factory")
            kwargs[f"{prefix}_kwargs"] = dict(entry.get("kwargs") or {})
        comps = data.get("components") or {}
        _check_keys(comps, _COMPONENT_KEYS, f"{source}: components")
        for key in _COMPONENT_KEYS:
            if key in comps and comps[key] is not None:
                kwargs[key] = comps[key]
        arrays = data.get("arrays") or {}
        _check_keys(arrays, _ARRAY_KEYS, f"{source}: arrays")
        kwargs.update(arrays)
        run = data.get("run") or {}
        _check_keys(run, _RUN_KEYS, f"{source}: run")
        kwargs.update(run)
        for key in ("output", "alpha", "mask_seed"):
            if key in data:
                kwargs[key] = data[key]
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Experiment":
        """Load an experiment YAML file (with ``yaml.safe_load``)."""
        from coar_dask._yaml import read_yaml_file

        data = read_yaml_file(path, "experiment file")
        return cls.from_dict(data or {}, source=f"experiment file {str(Path(path))!r}")

    def to_yaml(self, path: str | os.PathLike) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_experiment(source: Experiment | Mapping[str, Any] | str | os.PathLike) -> Experiment:
    """An :class:`Experiment` from itself, a dict, or a YAML path."""
    if isinstance(source, Experiment):
        return source
    if isinstance(source, Mapping):
        return Experiment.from_dict(source)
    return Experiment.from_yaml(source)


class ExperimentState:
    """What a worker holds for an experiment: model, examples, components, output function.

    ``inputs`` is a tensor, a dict of tensors, or a
    :class:`~coar_dask.core.examples.DatasetExamples` (a Dataset read a batch
    at a time); ``labels`` a tensor or ``None`` (a Dataset's labels are read by
    one streamed pass when first asked for). Examples stay in host memory (a
    memory-mapped array stays mapped, a Dataset is never collated whole) and
    :meth:`batch` moves one batch at a time to ``device`` through a
    :class:`~coar_dask.core.examples.DeviceFeeder` (on CUDA: pinned, copied on
    a side stream, the next batch's copy issued before this one is used;
    ``channels_last`` applied on the host, per batch).
    """

    def __init__(self, experiment: Experiment, model: Any, inputs: Any, labels: Any, components: Components,
                 output_fn: Any, device: Any):
        self.experiment, self.model, self.inputs, self._labels = experiment, model, inputs, labels
        self.components, self.output_fn, self.device = components, output_fn, device
        self._source: Any = None
        self._feeder: DeviceFeeder | None = None

    def __repr__(self) -> str:
        return (f"ExperimentState({self.experiment.fingerprint[:12]}, {self.n_examples} examples, "
                f"{self.n_components} components, device={self.device})")

    @property
    def labels(self) -> Any:
        if self._labels is None and isinstance(self.inputs, DatasetExamples):
            return self.inputs.labels
        return self._labels

    @labels.setter
    def labels(self, value: Any) -> None:
        self._labels = value

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_examples(self) -> int:
        return rows_of(self.inputs)

    def source(self) -> Any:
        """Where batches come from: the Dataset reader, or the (current) host tensors."""
        if isinstance(self.inputs, DatasetExamples):
            return self.inputs
        if self._source is None or self._source.token != (id(self.inputs), id(self._labels)):
            self._source = TensorExamples(self.inputs, self._labels)
        return self._source

    def feeder(self) -> DeviceFeeder:
        """The state's :class:`~coar_dask.core.examples.DeviceFeeder` (one per state and device)."""
        if self._feeder is None:
            self._feeder = DeviceFeeder(self.device, channels_last=bool(self.experiment.channels_last))
        return self._feeder

    def batch(self, start: int, stop: int, repeat: int = 1) -> Batch:
        """Examples ``start:stop`` on the device, repeated ``repeat`` times along the batch (mask-major)."""
        import torch

        inputs, labels = self.feeder().get(self.source(), start, stop)
        if repeat > 1:
            inputs, labels = _repeat(inputs, repeat), None if labels is None else _repeat(labels, repeat)
        index = torch.arange(start, stop, device=self.device)
        return Batch(inputs, labels, index.repeat(repeat) if repeat > 1 else index)

    def forward(self, inputs: Any) -> Any:
        """The model on a batch's inputs: ``model(**inputs)`` for a mapping, else ``model(inputs)``."""
        return self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)


def _repeat(x: Any, repeat: int) -> Any:
    """``x`` repeated mask-major along its rows (a 4-D channels_last tensor stays so)."""
    import torch

    if isinstance(x, Mapping):
        return {k: _repeat(v, repeat) for k, v in x.items()}
    out = x.repeat((repeat,) + (1,) * (x.ndim - 1))
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# -- examples: what the examples factory may return ----------------------


def load_examples(experiment: Experiment, device: Any) -> tuple[Any, Any]:
    """Call the examples factory; return ``(inputs, labels)`` in host memory.

    The factory returns ``(inputs, labels)``, ``inputs`` alone (labels
    ``None``), or a map-style ``torch.utils.data.Dataset`` of such items.
    ``inputs`` is a tensor or a mapping of tensors with one row per example.
    Tensors stay in host memory (``device`` is not used; a memory-mapped
    array is not read into memory). A Dataset is never collated whole: it
    comes back as a :class:`~coar_dask.core.examples.DatasetExamples` (labels
    ``None`` here; :attr:`ExperimentState.labels` streams them) that collates
    only the rows a pass asks for, ``len(dataset)`` examples. Batches move one
    at a time (:meth:`ExperimentState.batch`).
    """
    import torch

    where = f"examples factory {experiment.examples!r}"
    raw = call_factory("examples", experiment.examples, experiment.examples_kwargs)
    if isinstance(raw, torch.utils.data.Dataset):
        return DatasetExamples(raw, where), None
    inputs, labels = split_examples(raw, where)
    inputs = as_inputs(inputs, where)
    if rows_of(inputs) == 0:
        raise FactoryError(f"{where} returned 0 examples; return at least one (inputs with one row per example).")
    labels = as_labels(labels, rows_of(inputs), where)
    # Host tensors, never the whole set on the device (ImageNet's 10,000 examples are 30 GB) and never
    # pinned whole (the pinned allocator rounds up): ExperimentState.batch moves one batch at a time.
    return inputs, labels


_STATE_CACHE: dict[tuple[Any, ...], ExperimentState] = {}
_STATE_LOCK = threading.Lock()
#: The first-batch check runs the model and the output on at most this many examples.
FIRST_BATCH = 64


def resolve_device(name: str) -> Any:
    """The torch device ``name`` means in this process.

    A worker started for one GPU sees only that GPU (its own
    ``CUDA_VISIBLE_DEVICES``), as ``cuda:0``: there ``cuda:N`` means that GPU.
    Elsewhere ``cuda:N`` must be one of the GPUs this process sees.
    """
    import torch

    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ExperimentError(f"the experiment asks for device {name!r} but this process sees no CUDA GPU; "
                              f"run it on GPU workers, or set run: {{device: cpu}}.")
    count = torch.cuda.device_count()
    if device.index is None or device.index < count:
        return device
    if count == 1:
        return torch.device("cuda", 0)
    raise ExperimentError(f"the experiment asks for device {name!r} but this process sees {count} GPUs "
                          f"(cuda:0 to cuda:{count - 1}); use one of those, or plain 'cuda'.")


def _make_state(experiment: Experiment) -> ExperimentState:
    import torch

    device = resolve_device(experiment.device)
    model = call_factory("model", experiment.model, experiment.model_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(f"model factory {experiment.model!r} returned {type(model).__name__}, not an nn.Module.")
    inputs, labels = load_examples(experiment, device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    components = select_components(model, include=experiment.include, exclude=experiment.exclude, kinds=experiment.kinds)
    state = ExperimentState(experiment, model, inputs, labels, components, resolve_output(experiment.output), device)
    _check_first_batch(state)
    return state


def _describe(inputs: Any) -> str:
    if isinstance(inputs, DatasetExamples):
        return f"a Dataset of {inputs.n} examples"
    if isinstance(inputs, Mapping):
        return "inputs " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    return f"inputs of shape {tuple(inputs.shape)}"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA out-of-memory error (``torch.cuda.OutOfMemoryError``, or the
    ``RuntimeError`` older PyTorch and cuDNN/cuBLAS raise for it)."""
    if not isinstance(exc, RuntimeError):
        return False
    oom = getattr(getattr(sys.modules.get("torch"), "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return "out of memory" in text and ("CUDA" in text or "CUBLAS" in text or "CUDNN" in text)


def free_device_memory(device: Any) -> None:
    """Return the CUDA caching allocator's free blocks after an out-of-memory error (no-op elsewhere)."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


#: Relative difference between two runs of the same batch above which a model is not deterministic.
#: Nondeterministic GPU kernels (atomics) differ by float rounding (~1e-6); dropout or noise by far more.
NONDETERMINISM_TOLERANCE = 1e-3


def _first_outputs(state: ExperimentState, n: int) -> tuple[Any, Any, int]:
    """``(model output, batch, n)`` on the first ``n`` examples, halving ``n`` on CUDA out-of-memory."""
    while True:
        batch = state.batch(0, n)
        failure = None
        try:
            return state.forward(batch.inputs), batch, n
        except Exception as exc:  # noqa: BLE001 - any failure here means mismatched inputs (or memory)
            failure, oom = one_line(exc), is_out_of_memory(exc)
        if not oom:
            raise ExperimentError(
                f"the model cannot run on the examples ({_describe(state.inputs)}): {failure}. Check that "
                f"the examples factory returns inputs the model expects."
            )
        if n == 1:
            raise ExperimentError(f"the model runs out of memory on one example on {state.device} ({failure}); "
                                  f"use a device with more memory, or a smaller model or smaller examples.")
        logger.warning("out of memory on the first %d examples; retrying with %d (%s)", n, n // 2, failure)
        del batch
        free_device_memory(state.device)
        n //= 2


def _check_deterministic(state: ExperimentState, batch: Batch, values: Any) -> None:
    """The same batch twice must give the same outputs (issue 22: dropout or noise went unnamed)."""
    again = state.output_fn(state.forward(batch.inputs), batch)
    a, b = values.detach().double().cpu(), again.detach().double().cpu()
    scale = max(1.0, float(a.abs().max()))
    diff = float((a - b).abs().max())
    if not diff <= NONDETERMINISM_TOLERANCE * scale:
        raise ExperimentError(
            f"the model is not deterministic: the same {len(batch)} examples gave outputs differing by "
            f"{diff:.3g} in two runs (scale {scale:.3g}); COAR needs the same outputs for the same mask. Look "
            f"for dropout kept on (F.dropout(..., training=True), or a module put back in training mode) or "
            f"random noise in the model's forward."
        )


def _check_one_example(state: ExperimentState) -> None:
    """Passes may hold a single example (the last batch, out-of-memory retries): the model must run one."""
    batch = state.batch(0, 1)
    try:
        check_values(state.output_fn(state.forward(batch.inputs), batch), 1, state.experiment.output)
    except Exception as exc:  # noqa: BLE001 - the user's model (or its output on one row): one line
        if is_out_of_memory(exc):
            raise ExperimentError(f"the model runs out of memory on one example on {state.device} "
                                  f"({one_line(exc)}); use a device with more memory.") from None
        raise ExperimentError(
            f"the model cannot run a batch of one example ({one_line(exc)}); a build runs passes of 1 to "
            f"batch_size examples (the last batch, out-of-memory retries), so make the model accept a batch of "
            f"one (e.g. do not .squeeze() the batch dimension)."
        ) from None


def _check_first_batch(state: ExperimentState) -> None:
    """Run the model and the output on the first batch, so bad input fails before any block is written.

    Also checks that the model is deterministic (the first batch twice) and runs a batch of one example.
    """
    import torch

    name = state.experiment.output
    with torch.no_grad():
        out, batch, n = _first_outputs(state, min(state.experiment.batch_size, state.n_examples, FIRST_BATCH))
        try:
            values = state.output_fn(out, batch)
        except CoarError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user function: report it in one line
            raise OutputError(f"output {name!r} failed on the first batch: {one_line(exc)}.") from None
        check_values(values, n, name)
        _check_deterministic(state, batch, values)
        if n > 1:
            _check_one_example(state)
    if state.labels is not None and state.output_fn in (OUTPUTS.get("margin"), OUTPUTS.get("correct_logit")):
        classes = find_logits(out, name).shape[1]
        if int(state.labels.max()) >= classes or int(state.labels.min()) < 0:
            raise ExperimentError(
                f"labels range {int(state.labels.min())}..{int(state.labels.max())} but the model has "
                f"{classes} classes."
            )


def _state_key(experiment: Experiment) -> tuple[Any, ...]:
    """What a loaded state depends on: the model, examples, components and output, and the run settings.

    Not the mask sampling (seed, alpha) nor the store's array names and dtype: a train store and its
    evaluation stores share one model and one example set per process (issue 23: two 30 GB copies of
    ImageNet's examples per GPU otherwise). Run settings change the loaded state (device, AMP, memory
    format) or how the engine uses it, so they are in the key though not in the fingerprint.
    """
    what = experiment._what()
    for name in ("alpha", "mask_seed", "x_name", "y_name", "y_dtype"):
        del what[name]
    return (_digest(what), str(experiment.device), experiment.masks_per_pass, experiment.amp,
            experiment.channels_last, experiment.batch_size)


def load_state(experiment: Experiment) -> ExperimentState:
    """The experiment's model, examples and components, loaded once per process.

    Keyed by what the state depends on, not by the mask seed: a train store
    and its evaluation stores share one state (``state.experiment`` is the
    first experiment loaded; use the block's own experiment for its masks and
    dtype). The first load calls the factories through :func:`call_factory`: one that
    raises, exits, returns zero examples or runs past
    ``coar-dask.factory-timeout`` (10 minutes by default) fails with a
    one-line :class:`~coar_dask.errors.FactoryError` naming it.
    """
    key = _state_key(experiment)
    with _STATE_LOCK:
        state = _STATE_CACHE.get(key)
        if state is None:
            logger.info("loading experiment %s on %s", experiment.fingerprint[:12], experiment.device)
            state = _make_state(experiment)
            _STATE_CACHE[key] = state
        return state


def warm_up(experiment: Experiment) -> int:
    """Load the experiment's state into this process's cache; return its number of components.

    For ``client.run(warm_up, experiment)``: every Dask worker loads the model
    and examples before a build, so the first blocks (and timings) do not pay
    for it.
    """
    return load_state(experiment).n_components
