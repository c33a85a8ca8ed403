"""What the ``.beton`` files here hold, and FFCV imported lazily: shared by
:mod:`~coar_dask.formats.beton.write` and :mod:`~coar_dask.formats.beton.read`.

======== ============================== =================================
field    FFCV field                     content
======== ============================== =================================
mask     ``NDArrayField(x dtype, (P,))`` the mask row (bool, True = kept)
targets  ``NDArrayField(float32, (K,))`` the outputs of that row
idx      ``IntField``                   the row's index in the store
======== ============================== =================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from coar_dask.errors import MissingDependencyError, missing_dependency

__all__ = ["BetonInfo", "import_ffcv", "FIELD_X", "FIELD_Y", "FIELD_IDX", "FFCV_INSTALL", "BLOCK_BYTES"]

#: The seed's field names.
FIELD_X, FIELD_Y, FIELD_IDX = "mask", "targets", "idx"

#: How to install FFCV, quoted in the error raised when it is missing.
FFCV_INSTALL = (
    "FFCV compiles from source against OpenCV and libjpeg-turbo: on Debian/Ubuntu run "
    "`apt-get install -y libopencv-dev libturbojpeg0-dev pkg-config`, then "
    "`pip install 'coar_dask[ffcv]'` (= ffcv==1.0.2 pillow numba opencv-python setuptools)."
)
#: Target size of one block read from an ``.npy`` source, and of one loader batch.
BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BetonInfo:
    """What a ``.beton`` holds: rows, mask width, target width and its fields."""

    path: Path
    n_rows: int
    n_features: int
    n_targets: int
    x_dtype: str
    fields: tuple[str, ...]
    #: Rows written that were never completed (``ignore_completed``: zeros, as in the seed).
    n_incomplete: int = 0

    @property
    def nbytes(self) -> int:
        """Size of the file in bytes."""
        return self.path.stat().st_size


# --------------------------------------------------------------------------
# Lazy import of FFCV
# --------------------------------------------------------------------------
_FFCV: SimpleNamespace | None = None


def import_ffcv(purpose: str = "Reading and writing .beton files") -> SimpleNamespace:
    """Import the parts of FFCV used here, once; raise a helpful error if it is missing.

    Importing FFCV sets torch's (and numba's) thread count to 1 for the whole
    process; the previous torch thread count is restored here.

    Returns
    -------
    types.SimpleNamespace
        ``DatasetWriter``, ``NDArrayField``, ``IntField``, ``NDArrayDecoder``,
        ``IntDecoder``, ``Loader``, ``OrderOption``, ``ToTensor``,
        ``ToDevice``, ``Squeeze``, ``Reader``, ``ALLOC_TABLE_TYPE``, ``HeaderType``.

    Raises
    ------
    MissingDependencyError
        When FFCV (or one of its undeclared dependencies) cannot be imported.
    """
    global _FFCV
    if _FFCV is not None:
        return _FFCV
    import torch

    threads = torch.get_num_threads()
    try:
        from ffcv.fields import IntField, NDArrayField
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor
        from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
        from ffcv.writer import DatasetWriter
    except ImportError as exc:
        base = missing_dependency("ffcv", "ffcv", purpose)
        raise MissingDependencyError(
            f"{base} {FFCV_INSTALL} (The import failed with: {exc})"
        ) from exc
    finally:
        torch.set_num_threads(threads)
    _FFCV = SimpleNamespace(
        DatasetWriter=DatasetWriter,
        NDArrayField=NDArrayField,
        IntField=IntField,
        NDArrayDecoder=NDArrayDecoder,
        IntDecoder=IntDecoder,
        Loader=Loader,
        OrderOption=OrderOption,
        ToTensor=ToTensor,
        ToDevice=ToDevice,
        Squeeze=Squeeze,
        Reader=Reader,
        ALLOC_TABLE_TYPE=ALLOC_TABLE_TYPE,
        HeaderType=HeaderType,
    )
    return _FFCV
