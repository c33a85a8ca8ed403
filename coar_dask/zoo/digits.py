"""The built-in example: a small ResNet-style CNN on scikit-learn's digits.

The 8x8 digit images ship with scikit-learn, so this runs anywhere with no
download. The data are split 1437 train / 360 held-out (stratified, seeded);
the model is trained once (a few seconds on a CPU) and cached; the held-out
images are the examples whose margins COAR models. Components: every Conv2d
output channel.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DigitsResNet", "load_data", "train_model", "load_model", "heldout_examples", "experiment", "default_cache_dir"]

logger = logging.getLogger(__name__)

N_HELDOUT = 360
_CACHE_VERSION = "v1"


def default_cache_dir() -> Path:
    """``$COAR_DASK_CACHE`` or ``~/.cache/coar_dask``."""
    return Path(os.environ.get("COAR_DASK_CACHE", Path.home() / ".cache" / "coar_dask"))


def _model_class():
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x)

    class DigitsResNet(nn.Module):
        """conv stem (1 -> width) + BN, ``blocks`` BasicBlocks, global pool, linear head."""

        def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10):
            super().__init__()
            self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            self.layers = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            x = self.layers(self.relu(self.bn1(self.conv1(x))))
            return self.fc(self.pool(x).flatten(1))

    return DigitsResNet


def DigitsResNet(width: int = 16, blocks: int = 2, classes: int = 10):  # noqa: N802 - a class factory
    """A small ResNet for 1x8x8 inputs (built lazily so importing this module needs no torch)."""
    return _model_class()(width=width, blocks=blocks, classes=classes)


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_heldout, y_heldout)``: images as float32 (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=N_HELDOUT, stratify=y, random_state=seed)
    return x_tr, y_tr, x_te, y_te


def fit_classifier(model: Any, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, batch: int, lr: float,
                   max_lr: float) -> Any:
    """Train ``model`` on ``(x, y)`` with AdamW and a one-cycle schedule, seeded; returns it in eval mode."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=epochs * (-(-len(x) // batch)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_model(seed: int = 0, width: int = 16, blocks: int = 2, epochs: int = 30) -> Any:
    """Train the digits model (seeded; a few seconds on a CPU).

    Trained on one thread: the same weights, bitwise, in every process whatever
    its thread count (workers that find no cached model each train one, and a
    store refuses a worker whose model state differs; see
    :mod:`coar_dask.core.identity`)."""
    import torch

    x_tr, y_tr, x_te, y_te = load_data(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sums split across threads round differently
    try:
        torch.manual_seed(seed)
        model = fit_classifier(DigitsResNet(width=width, blocks=blocks), x_tr, y_tr, seed=seed, epochs=epochs,
                               batch=64, lr=3e-3, max_lr=1e-2)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    logger.info("trained digits model: held-out accuracy %.4f", acc)
    return model


def _cache_path(cache_dir: str | os.PathLike | None, seed: int, width: int, blocks: int, epochs: int) -> Path:
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / f"digits_resnet_{_CACHE_VERSION}_s{seed}_w{width}_b{blocks}_e{epochs}.pt"


def load_model(
    cache_dir: str | os.PathLike | None = None, seed: int = 0, width: int = 16, blocks: int = 2, epochs: int = 30
) -> Any:
    """The trained digits model: loaded from the cache, or trained and cached.

    The cache file is written atomically, so concurrent workers at worst
    train twice and never read a partial file.
    """
    import torch

    path = _cache_path(cache_dir, seed, width, blocks, epochs)
    model = DigitsResNet(width=width, blocks=blocks)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return model.eval()
    model = train_model(seed=seed, width=width, blocks=blocks, epochs=epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def model_digest(model: Any) -> str:
    """sha256 of a model's parameters and buffers (to tell two trainings apart)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def heldout_examples(seed: int = 0) -> tuple[Any, Any]:
    """The 360 held-out images and labels, as tensors."""
    import torch

    _, _, x_te, y_te = load_data(seed)
    return torch.from_numpy(x_te), torch.from_numpy(y_te)


def heldout_accuracy(model: Any, seed: int = 0) -> float:
    """Accuracy of ``model`` on the held-out split."""
    import torch

    x, y = heldout_examples(seed)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def experiment(cache_dir: str | os.PathLike | None = None, **overrides: Any):
    """The digits :class:`~coar_dask.core.experiment.Experiment` (alpha 0.05, Conv2d channels)."""
    from coar_dask.core.experiment import Experiment

    model_kwargs = {"cache_dir": str(cache_dir)} if cache_dir else {}
    fields = dict(
        model="coar_dask.zoo.digits:load_model",
        model_kwargs=model_kwargs,
        examples="coar_dask.zoo.digits:heldout_examples",
        include=(),
        kinds=("conv2d",),
        output="margin",
        alpha=0.05,
        mask_seed=0,
        batch_size=360,
        device="cpu",
    )
    fields.update(overrides)
    return Experiment(**fields)
