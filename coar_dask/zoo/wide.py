"""A second built-in model, big enough to edit: a wide CNN on scikit-learn's digits.

The digits ResNet (:mod:`coar_dask.zoo.digits`) has 80 components: too few
for an edit to be selective (ablating 1-5 of them flips an example, but also
costs the other examples 3-37 points of accuracy). This model has 1,568: a
small conv stem (32 channels), two wide fully connected layers (1,024 and 512
neurons) and a linear head. It trains in a few seconds on 2 CPU cores, on
the same split as the digits model (1437 train / 360 held-out images, the
held-out images are the examples), and is cached like it.

Components: the stem's Conv2d channels and the two hidden Linear layers'
neurons (``include=["^conv", "^fc[12]$"]``); the head is left out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from coar_dask.zoo.digits import default_cache_dir, fit_classifier, heldout_accuracy, heldout_examples, load_data
from coar_dask.zoo.digits import experiment as digits_experiment

__all__ = ["WideDigitsNet", "train_model", "load_model", "heldout_examples", "heldout_accuracy", "experiment",
           "N_COMPONENTS"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = "v1"
#: Components of the default model: 32 conv channels + 1024 + 512 neurons.
N_COMPONENTS = 32 + 1024 + 512


def _model_class():
    from torch import nn

    class WideDigitsNet(nn.Module):
        """conv (1 -> channels) + ReLU + 2x2 max-pool, fc1 (-> hidden1) + ReLU, fc2 (-> hidden2) + ReLU, head."""

        def __init__(self, channels: int = 32, hidden1: int = 1024, hidden2: int = 512, classes: int = 10):
            super().__init__()
            self.conv = nn.Conv2d(1, channels, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(channels * 16, hidden1)
            self.fc2 = nn.Linear(hidden1, hidden2)
            self.head = nn.Linear(hidden2, classes)

        def forward(self, x):
            x = self.pool(self.relu(self.conv(x))).flatten(1)
            return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))

    return WideDigitsNet


def WideDigitsNet(channels: int = 32, hidden1: int = 1024, hidden2: int = 512, classes: int = 10):  # noqa: N802
    """The wide digits CNN for 1x8x8 inputs (built lazily so importing this module needs no torch)."""
    return _model_class()(channels=channels, hidden1=hidden1, hidden2=hidden2, classes=classes)


def train_model(seed: int = 0, epochs: int = 12) -> Any:
    """Train the wide model (seeded; a few seconds on 2 CPU cores)."""
    import torch

    x_tr, y_tr, _, _ = load_data(seed)
    torch.manual_seed(seed)
    model = fit_classifier(WideDigitsNet(), x_tr, y_tr, seed=seed, epochs=epochs, batch=128, lr=1e-3, max_lr=3e-3)
    logger.info("trained wide digits model: held-out accuracy %.4f", heldout_accuracy(model, seed))
    return model


def _cache_path(cache_dir: str | os.PathLike | None, seed: int, epochs: int) -> Path:
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / f"digits_wide_{_CACHE_VERSION}_s{seed}_e{epochs}.pt"


def load_model(cache_dir: str | os.PathLike | None = None, seed: int = 0, epochs: int = 12) -> Any:
    """The trained wide model: loaded from the cache, or trained and cached (atomically, as
    :func:`coar_dask.zoo.digits.load_model`)."""
    import torch

    path = _cache_path(cache_dir, seed, epochs)
    model = WideDigitsNet()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return model.eval()
    model = train_model(seed=seed, epochs=epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def experiment(cache_dir: str | os.PathLike | None = None, **overrides: Any):
    """The wide model's :class:`~coar_dask.core.experiment.Experiment` (1,568 components, alpha 0.05):
    the digits experiment with this model and its conv channels and hidden neurons as components."""
    fields = dict(
        model="coar_dask.zoo.wide:load_model",
        model_kwargs={"cache_dir": str(cache_dir)} if cache_dir else {},
        include=("^conv$", "^fc1$", "^fc2$"),
        kinds=("conv2d", "linear"),
    )
    return digits_experiment(**{**fields, **overrides})
