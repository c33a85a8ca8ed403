"""Other on-disk formats: FFCV ``.beton`` and the seed's ``.npy`` layout.

:mod:`~coar_dask.formats.beton` writes a store into a ``.beton``
(:mod:`~coar_dask.formats.beton.write`) and reads one back as a row source
(:mod:`~coar_dask.formats.beton.read`); :mod:`~coar_dask.formats.npy` converts
between a store and the seed's directory of ``.npy`` files. Each module is
imported when one of its names is first used (FFCV itself only when a
``.beton`` is written or read).
"""

from __future__ import annotations

from coar_dask._exports import lazy_exports

#: Re-exported name -> the module it lives in.
EXPORTS = {
    "export_beton": "coar_dask.formats.beton",
    "BetonInfo": "coar_dask.formats.beton",
    "BetonRows": "coar_dask.formats.beton",
    "inspect_beton": "coar_dask.formats.beton",
    "export_npy": "coar_dask.formats.npy",
    "import_npy": "coar_dask.formats.npy",
}

__all__ = list(EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), EXPORTS)
