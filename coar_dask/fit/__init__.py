"""Per-example attributions from a store: row selection, fit, evaluate.

Modules: :mod:`~coar_dask.fit.rows` (row sources over a store, the row
rules), :mod:`~coar_dask.fit.attributions` (the result and its file),
:mod:`~coar_dask.fit.core` (settings and one fit, in this process),
:mod:`~coar_dask.fit.distributed` (target slices as executor tasks),
:mod:`~coar_dask.fit.fit` (the public :func:`~coar_dask.fit.fit.fit`) and
:mod:`~coar_dask.fit.evaluate`.
"""
