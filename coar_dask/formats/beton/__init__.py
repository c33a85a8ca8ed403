"""FFCV ``.beton`` files: stream a store into one, and read one back as row blocks.

The research code fits its regressions from an FFCV ``.beton`` with three
fields per row, and this module writes and reads exactly that layout:

======== ============================== =================================
field    FFCV field                     content
======== ============================== =================================
mask     ``NDArrayField(x dtype, (P,))`` the mask row (bool, True = kept)
targets  ``NDArrayField(float32, (K,))`` the outputs of that row
idx      ``IntField``                   the row's index in the store
======== ============================== =================================

so a file written here loads with the seed's loader pipeline
(``NDArrayDecoder``/``IntDecoder``, ``ToTensor``), and a file written by the
seed's ``write_dataset.py`` reads here.

:func:`export_beton` streams a zarr store (or a seed directory of ``.npy``
memory maps) into FFCV's own :class:`~ffcv.writer.DatasetWriter`: each writer
process keeps one row block of the source in memory at a time, never the
whole store. :class:`BetonRows` reads a ``.beton`` back through FFCV's
:class:`~ffcv.loader.Loader` (on the CPU, or with ``ToDevice`` onto a CUDA
GPU) and is a *row source* for :mod:`coar_dask.fit.fit`: it has
``n_rows``, ``n_features``, ``n_targets`` and ``blocks()`` yielding ``(X, Y)``
float32 numpy blocks.

The writing side is :mod:`~coar_dask.formats.beton.write`, the reading side
:mod:`~coar_dask.formats.beton.read`, and what both share (the fields,
:class:`BetonInfo`, the lazy FFCV import) :mod:`~coar_dask.formats.beton.layout`;
this package re-exports their public names.

FFCV is optional (``pip install 'coar_dask[ffcv]'``, after Debian's
``libopencv-dev libturbojpeg0-dev pkg-config``) and imported only when a
function here needs it.
"""

from __future__ import annotations

from coar_dask.errors import BetonError, BetonNotFoundError
from coar_dask.formats.beton.layout import FFCV_INSTALL, FIELD_IDX, FIELD_X, FIELD_Y, BetonInfo, import_ffcv
from coar_dask.formats.beton.read import BetonRows, inspect_beton, make_loader
from coar_dask.formats.beton.write import export_beton

__all__ = [
    "BetonError",
    "BetonNotFoundError",
    "BetonInfo",
    "BetonRows",
    "export_beton",
    "inspect_beton",
    "make_loader",
    "import_ffcv",
    "FIELD_X",
    "FIELD_Y",
    "FIELD_IDX",
    "FFCV_INSTALL",
]
