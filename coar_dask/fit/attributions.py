"""Fitted attributions: weights in mask units, their file format and their sign convention."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from coar_dask.core.store import Store
from coar_dask.errors import RegressionError, StoreMismatchError

__all__ = ["Attributions", "SIGN_CONVENTION", "plain_metadata"]

SIGN_CONVENTION = (
    "weights in mask units: prediction = mask @ weight + bias, mask 1 = kept; "
    "a positive weight means keeping the component raises the output"
)


def plain_metadata(value: Any, where: str = "metadata") -> Any:
    """``value`` as plain Python data that ``torch.load(weights_only=True)`` accepts.

    NumPy scalars become Python numbers, arrays become lists,
    paths become strings and mapping keys strings; anything else raises
    :class:`RegressionError` naming where it was found, so that a file that
    could not be loaded is never written.
    """
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass, yet unpicklable safely
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return plain_metadata(value.tolist(), where)
    if isinstance(value, Mapping):
        return {str(k): plain_metadata(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise RegressionError(
        f"{where} holds a {type(value).__name__}, which an attributions file cannot store safely; "
        f"use numbers, strings, lists or dicts."
    )


@dataclass(frozen=True)
class Attributions:
    """Per-example attributions. ``weight`` (P, K), ``bias`` (K,), ``lam`` (K,).

    Sign convention: weights are in mask units, ``prediction = mask @ weight +
    bias`` with mask 1 = kept; a positive weight means keeping the component
    raises the output.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_examples(self) -> int:
        return int(self.weight.shape[1])

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted outputs ``(n, K)`` for masks ``(n, P)``."""
        return np.asarray(masks, dtype=np.float32) @ self.weight + self.bias

    def save(self, path: str | os.PathLike) -> Path:
        """Save as a torch file with keys ``weight``, ``bias``, ``lam``, ``metadata``
        (the seed's keys), loadable with ``torch.load(path, weights_only=True)``
        (the metadata is stored as plain data: :func:`plain_metadata`)."""
        import torch

        metadata = plain_metadata(dict(self.metadata))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "weight": torch.from_numpy(np.ascontiguousarray(self.weight)),
                "bias": torch.from_numpy(np.ascontiguousarray(self.bias)),
                "lam": torch.from_numpy(np.ascontiguousarray(self.lam)),
                "metadata": metadata,
            },
            tmp,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attributions":
        """Load a file written by :meth:`save` (or the seed's ``{weight, bias, lam}``)."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise RegressionError(f"attributions file {str(path)!r} does not exist.")
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
            # torch's own message spans several lines and suggests weights_only=False,
            # which would run arbitrary code: keep only its first line, and say why.
            text = str(exc).strip()
            if "Weights only load failed" in text:
                reason = "it holds Python objects other than tensors and plain data"
            else:
                reason = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'unreadable'}"
            raise RegressionError(
                f"{str(path)!r} is not an attributions file this package can load safely ({reason}); "
                f"pass a file written by `coar-dask fit`."
            ) from None
        if not isinstance(data, dict) or not {"weight", "bias"} <= set(data):
            raise RegressionError(f"{str(path)!r} has no 'weight' and 'bias'; is it an attributions file?")
        weight = data["weight"].float().numpy()
        lam = data.get("lam")
        return cls(
            weight=weight,
            bias=data["bias"].float().numpy().reshape(-1),
            lam=np.zeros(weight.shape[1], np.float32) if lam is None else lam.float().numpy().reshape(-1),
            metadata=dict(data.get("metadata", {})),
        )

    def check_store(self, store: Store, x_name: str, y_name: str) -> None:
        """Raise if these attributions cannot describe ``store``'s rows."""
        p = int(np.prod(store.spec[x_name].shape))
        k = int(np.prod(store.spec[y_name].shape))
        s0, s1 = self.metadata.get("target_slice", (0, k))
        if p != self.n_components or (s1 - s0) != self.n_examples:
            raise StoreMismatchError(
                f"these attributions are {self.n_components} components x {self.n_examples} "
                f"examples, but store {str(store.path)!r} has {p} components x {k} outputs; "
                f"they come from another experiment."
            )
        fp, mine = store.meta.get("target_fingerprint"), self.metadata.get("target_fingerprint")
        if fp and mine and fp != mine:
            raise StoreMismatchError(
                f"these attributions were fitted for model/examples/components {mine[:12]}…, but store "
                f"{str(store.path)!r} holds rows of {fp[:12]}…; they come from another experiment. "
                f"Evaluate on a store built with the same model, examples and components."
            )
