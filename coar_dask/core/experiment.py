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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from coar_dask.core.components import Components, select_components
from coar_dask.errors import ConfigError, ExperimentError
from coar_dask.core.masks import check_alpha
from coar_dask.core.outputs import get_output

__all__ = ["Experiment", "ExperimentState", "load_experiment", "load_state", "warm_up", "import_object"]

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


@dataclass(frozen=True)
class Experiment:
    """A frozen description of what to build.

    Parameters
    ----------
    model
        Import path of a function returning the trained ``nn.Module``.
    examples
        Import path of a function returning ``(inputs, labels)`` tensors.
    model_kwargs, examples_kwargs
        Keyword arguments of the factories (JSON-able).
    include, exclude, kinds
        Component selection (see :func:`coar_dask.core.components.select_components`).
    output
        Output function name (``"margin"``).
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
        :func:`coar_dask.ablation.engine.compute_outputs`), autocast (float16 on CUDA,
        bfloat16 on CPU), and the ``channels_last`` memory format.
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
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "examples"):
            value = getattr(self, name)
            if not isinstance(value, str) or ":" not in value:
                raise ExperimentError(
                    f"experiment.{name} must be an import path 'package.module:function'; found {value!r}."
                )
        for name in ("include", "exclude", "kinds"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
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
        for name in ("amp", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ExperimentError(f"{name} must be true or false; found {getattr(self, name)!r}.")
        get_output(self.output)
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


@dataclass
class ExperimentState:
    """What a worker holds for an experiment: model, examples, components on a device."""

    experiment: Experiment
    model: Any
    inputs: Any
    labels: Any
    components: Components
    output_fn: Any
    device: Any

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_examples(self) -> int:
        return int(self.labels.shape[0])


_STATE_CACHE: dict[tuple[Any, ...], ExperimentState] = {}
_STATE_LOCK = threading.Lock()


def _make_state(experiment: Experiment) -> ExperimentState:
    import torch

    device = torch.device(experiment.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExperimentError("the experiment asks for device 'cuda' but this process sees no CUDA GPU.")
    model = import_object(experiment.model)(**experiment.model_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ExperimentError(f"model factory {experiment.model!r} returned {type(model).__name__}, not an nn.Module.")
    examples = import_object(experiment.examples)(**experiment.examples_kwargs)
    try:
        inputs, labels = examples
    except (TypeError, ValueError):
        raise ExperimentError(
            f"examples factory {experiment.examples!r} must return (inputs, labels); got {type(examples).__name__}."
        ) from None
    inputs = torch.as_tensor(inputs)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if inputs.shape[0] != labels.shape[0]:
        raise ExperimentError(
            f"examples factory returned {inputs.shape[0]} inputs but {labels.shape[0]} labels."
        )
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    components = select_components(model, include=experiment.include, exclude=experiment.exclude, kinds=experiment.kinds)
    state = ExperimentState(experiment, model, inputs.to(device), labels.to(device), components,
                            get_output(experiment.output), device)
    _check_forward(state)
    return state


def _check_forward(state: ExperimentState) -> None:
    """Run one small batch so a model/examples mismatch fails early and clearly."""
    import torch

    with torch.no_grad():
        try:
            logits = state.model(state.inputs[:2])
        except Exception as exc:  # noqa: BLE001 - any failure here means mismatched inputs
            raise ExperimentError(
                f"the model cannot run on the examples (inputs of shape {tuple(state.inputs.shape)}): "
                f"{type(exc).__name__}: {exc}. Check that the examples factory returns inputs the model expects."
            ) from None
    if logits.ndim != 2:
        raise ExperimentError(f"the model must return logits of shape (batch, classes); got {tuple(logits.shape)}.")
    if int(state.labels.max()) >= logits.shape[1] or int(state.labels.min()) < 0:
        raise ExperimentError(
            f"labels range {int(state.labels.min())}..{int(state.labels.max())} but the model has "
            f"{logits.shape[1]} classes."
        )


def load_state(experiment: Experiment) -> ExperimentState:
    """The experiment's model, examples and components, loaded once per process."""
    # Run settings change the loaded state (device, AMP, memory format) or how it is
    # used, so they belong in the key even though they are not in the fingerprint.
    key = (experiment.fingerprint, str(experiment.device), experiment.masks_per_pass, experiment.amp,
           experiment.channels_last, experiment.batch_size)
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
