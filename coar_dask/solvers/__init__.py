"""Streaming linear solvers behind one protocol: exact least squares (Gram /
CG), SAGA and fast_l1.

Modules: :mod:`~coar_dask.solvers.base` (row-source and solver protocols,
results, progress, options fields), :mod:`~coar_dask.solvers.rows`
(batches, read-ahead, epochs), :mod:`~coar_dask.solvers.moments` (the streamed
least-squares sums), :mod:`~coar_dask.solvers.metrics` (validation MSE,
Pearson correlation),
:mod:`~coar_dask.solvers.lstsq`, :mod:`~coar_dask.solvers.saga`,
:mod:`~coar_dask.solvers.fast_l1` and :mod:`~coar_dask.solvers.registry`
(name -> solver and options class).
"""
