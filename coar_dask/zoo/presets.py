"""The paper's setups as named presets: a model builder plus a component selection.

======================  ===========================  ==========================================  ======
preset                  model                        components                                  count
======================  ===========================  ==========================================  ======
``cifar_resnet``        seed's CIFAR MiniResNet      every Conv2d named ``*conv*``: out channels  2,304
``imagenet_resnet``     torchvision ``resnet50``     every Conv2d named ``*conv*`` (not          22,720
                                                     ``downsample``): output channels
``imagenet_vit``        torchvision ``vit_b_16``     every Linear but the head (rows) and each   82,944
                                                     attention's ``in_proj_weight`` rows
``gpt2_tinystories``    HF GPT-2 small               ``attn.c_attn``, ``attn.c_proj``,           64,512
                                                     ``mlp.c_fc``, ``mlp.c_proj`` Conv1D input
                                                     rows (the seed's ``weight[idx]``)
======================  ===========================  ==========================================  ======

Each preset is named after its folder in ``configs/``. The earlier names
(``imagenet_resnet50``, ``imagenet_vit_b16``, ``gpt2_small``) still work
(:data:`ALIASES`).

The models come from :mod:`coar_dask.zoo.architectures` (same module names
and shapes as the originals; random weights), built on the ``meta`` device
when only the components are wanted: instant, no memory, no download.

Examples
--------
>>> from coar_dask.zoo.presets import preset_components
>>> len(preset_components("imagenet_resnet"))
22720
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from coar_dask.core.components import Components, select_components
from coar_dask.core.experiment import call_factory, import_object, load_experiment, load_state
from coar_dask.errors import ExperimentError

__all__ = [
    "Preset",
    "PRESETS",
    "ALIASES",
    "get_preset",
    "build_model",
    "preset_components",
    "experiment_components",
    "experiment_counts",
    "seeded_model",
    "random_examples",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A model builder and the component selection of one of the paper's setups.

    Attributes
    ----------
    name, description
        Registry key and one line for listings.
    factory
        Import path ``package.module:function`` of the model builder (usable as
        an experiment's ``model.factory``).
    include, exclude, kinds
        The component selection (see :func:`coar_dask.core.components.select_components`).
    total
        The paper's component count, checked by the tests.
    input_shape
        Shape of one input example (for random inputs in tests and benchmarks).
    """

    name: str
    description: str
    factory: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("conv2d", "linear")
    total: int = 0
    input_shape: tuple[int, ...] = ()
    factory_kwargs: dict[str, Any] = field(default_factory=dict)

    def selection(self) -> dict[str, tuple[str, ...]]:
        """``include``/``exclude``/``kinds`` as keyword arguments (also an experiment's ``components``)."""
        return {"include": self.include, "exclude": self.exclude, "kinds": self.kinds}

    def builder(self) -> Callable[..., Any]:
        return import_object(self.factory)


_ARCH = "coar_dask.zoo.architectures"

#: The presets, by name.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("cifar_resnet", "CIFAR-10 MiniResNet (width 256, 4 blocks): Conv2d output channels",
               f"{_ARCH}:mini_resnet", include=("conv",), kinds=("conv2d",), total=2_304,
               input_shape=(3, 32, 32)),
        Preset("imagenet_resnet", "ImageNet ResNet-50 (torchvision): Conv2d named *conv* output channels",
               f"{_ARCH}:resnet50", include=("conv",), kinds=("conv2d",), total=22_720,
               input_shape=(3, 224, 224)),
        Preset("imagenet_vit", "ImageNet ViT-B/16 (torchvision): Linear rows but the head, "
               "MultiheadAttention in_proj rows", f"{_ARCH}:vit_b_16", exclude=(r"^heads",),
               kinds=("linear", "mha_in_proj"), total=82_944, input_shape=(3, 224, 224)),
        Preset("gpt2_tinystories", "GPT-2 small (HF): c_attn, c_proj, c_fc, mlp.c_proj Conv1D input rows",
               f"{_ARCH}:gpt2_small",
               include=(r"attn\.c_attn$", r"attn\.c_proj$", r"mlp\.c_fc$", r"mlp\.c_proj$"),
               kinds=("conv1d",), total=64_512, input_shape=(16,)),
    )
}


#: Earlier preset names, kept working: alias -> preset name.
ALIASES: dict[str, str] = {
    "imagenet_resnet50": "imagenet_resnet",
    "imagenet_vit_b16": "imagenet_vit",
    "gpt2_small": "gpt2_tinystories",
}


def get_preset(name: str) -> Preset:
    """The preset ``name`` (or one of its :data:`ALIASES`); an unknown name lists the known ones."""
    try:
        return PRESETS[ALIASES.get(name, name)]
    except KeyError:
        raise ExperimentError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.") from None


def build_model(name: str, device: Any = "meta", **kwargs: Any) -> Any:
    """Build a preset's model (random weights) on ``device`` (``"meta"``: shapes only, instant).

    Parameters
    ----------
    name
        A preset name (see :data:`PRESETS`).
    device
        Where parameters are created; ``"meta"`` allocates nothing.
    **kwargs
        Passed to the builder (e.g. ``num_classes``).
    """
    import torch

    preset = get_preset(name)
    with torch.device(device):
        model = preset.builder()(**{**preset.factory_kwargs, **kwargs})
    return model.eval()


def preset_components(name: str) -> Components:
    """The components of a preset, counted on its model built on the meta device."""
    preset = get_preset(name)
    return select_components(build_model(name), **preset.selection())


def experiment_components(source: Any) -> Components:
    """The components an experiment selects: its model factory is called, its examples are not.

    Parameters
    ----------
    source
        An :class:`~coar_dask.core.experiment.Experiment`, a dict, or a YAML path.
    """
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ExperimentError(f"experiment file {str(source)!r} does not exist.")
    experiment = load_experiment(source)
    model = call_factory("model", experiment.model, experiment.model_kwargs)
    return select_components(model, include=experiment.include, exclude=experiment.exclude, kinds=experiment.kinds)


def experiment_counts(source: Any) -> tuple[Components, int]:
    """The components an experiment selects and its number of examples: both factories are called (on
    the CPU) and the model is run on two examples, so a mismatch shows here rather than in a build."""
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise ExperimentError(f"experiment file {str(source)!r} does not exist.")
    state = load_state(load_experiment(source).replace(device="cpu"))
    return state.components, state.n_examples


def seeded_model(factory: str, seed: int = 0, **kwargs: Any) -> Any:
    """A randomly initialised model, the same in every process: ``factory(**kwargs)`` after ``torch.manual_seed(seed)``.

    Usable as an experiment's model factory for benchmarks and tests, e.g.
    ``model: {factory: coar_dask.zoo.presets:seeded_model, kwargs: {factory:
    "coar_dask.zoo.architectures:cifar_resnet18"}}``. ``factory`` may also be a
    preset name.
    """
    import torch

    builder = get_preset(factory).builder() if (factory in PRESETS or factory in ALIASES) else import_object(factory)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = builder(**kwargs)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def random_examples(n: int = 64, shape: tuple[int, ...] | list[int] = (3, 32, 32), classes: int = 10,
                    seed: int = 0) -> tuple[Any, Any]:
    """``n`` standard-normal inputs of ``shape`` and uniform labels in ``[0, classes)`` (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn((int(n), *map(int, shape)), generator=gen)
    labels = torch.randint(0, int(classes), (int(n),), generator=gen)
    return inputs, labels
