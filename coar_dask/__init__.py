"""coar_dask: COAR component attributions for PyTorch models, at cluster scale."""

from __future__ import annotations

from ._version import __version__
from .errors import CoarError
from .masks import sample_masks
from .spec import Spec, load_spec
from .store import Store, init_store, open_store

__all__ = [
    "__version__",
    "CoarError",
    "Spec",
    "load_spec",
    "Store",
    "init_store",
    "open_store",
    "sample_masks",
]
