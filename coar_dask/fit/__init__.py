"""Per-example attributions from a store: row selection, fit, evaluate, and what uses them.

Modules: :mod:`~coar_dask.fit.rows` (row sources over a store, the row
rules), :mod:`~coar_dask.fit.attributions` (the result and its file),
:mod:`~coar_dask.fit.core` (settings and one fit, in this process),
:mod:`~coar_dask.fit.distributed` (target slices as executor tasks),
:mod:`~coar_dask.fit.fit` (the public :func:`~coar_dask.fit.fit.fit`),
:mod:`~coar_dask.fit.evaluate`, :mod:`~coar_dask.fit.baselines` (leave-one-out,
gradient x parameter), :mod:`~coar_dask.fit.compare` (COAR against the
baselines: :func:`coar_dask.fit.compare.compare`) and :mod:`~coar_dask.fit.edit`
(COAR-Edit).

This package re-exports the baselines, COAR-Edit and the plots (``from
coar_dask.fit import sweep_edit``); ``fit``, ``evaluate`` and ``compare`` are
also the names of modules here, so those functions are imported from
:mod:`coar_dask` (``fit``, ``evaluate``) or :mod:`coar_dask.fit.compare`.
Each module is imported when one of its names is first used.
"""

from __future__ import annotations

from coar_dask._exports import lazy_exports

#: Re-exported name -> the module it lives in.
EXPORTS = {
    "leave_one_out": "coar_dask.fit.baselines",
    "gradient_x_parameter": "coar_dask.fit.baselines",
    "edit_scores": "coar_dask.fit.edit",
    "edited": "coar_dask.fit.edit",
    "edit_model": "coar_dask.fit.edit",
    "sweep_edit": "coar_dask.fit.edit",
    "EditCase": "coar_dask.fit.edit",
    "EditSweep": "coar_dask.fit.edit",
    "Comparison": "coar_dask.fit.compare",
    "plot_evaluation": "coar_dask.fit.evaluate",
    "plot_comparison": "coar_dask.fit.compare",
    "plot_edit": "coar_dask.fit.edit",
}

__all__ = list(EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), EXPORTS)
