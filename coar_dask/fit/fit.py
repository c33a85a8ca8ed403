"""Fit attributions: stream a store's completed rows into a solver.

The public entry point is :func:`fit`. It returns :class:`Attributions`,
whose ``weight`` is ``(P, K)`` in *mask units*: the predicted output of
example ``k`` for a mask ``m`` (1 = component kept, 0 = ablated) is
``m @ weight[:, k] + bias[k]``. A positive weight means keeping the
component raises the output (ablating it lowers it).

:func:`fit` builds a :class:`~coar_dask.fit.core.FitSettings` and either
fits in this process (:func:`~coar_dask.fit.core.fit_store`) or, when target
slices or a Dask client are asked for, plans and executes a sliced fit
(:mod:`coar_dask.fit.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from coar_dask.core.components import select_components
from coar_dask.core.experiment import Experiment, call_factory
from coar_dask.core.store import Store, open_store
from coar_dask.errors import CoarError
from coar_dask.fit.attributions import SIGN_CONVENTION, Attributions
from coar_dask.fit.core import FitSettings, fit_store
from coar_dask.fit.distributed import fit_distributed
from coar_dask.fit.progress import fit_progress
from coar_dask.fit.rows import StoreRows, infer_names, split_rows
from coar_dask.solvers.base import FitProgress
from coar_dask.solvers.registry import check_solver_options

__all__ = [
    "Attributions",
    "FitSettings",
    "SIGN_CONVENTION",
    "StoreRows",
    "check_solver_options",
    "fit",
    "infer_names",
    "split_rows",
    "experiment_metadata",
]

logger = logging.getLogger(__name__)


def fit(
    store: Store | str | os.PathLike,
    *,
    progress: Callable[[FitProgress], None] | bool | None = None,
    slices: int | Sequence[tuple[int, int]] | None = None,
    client: Any | None = None,
    max_targets: int | None = None,
    settings: FitSettings | None = None,
    **options: Any,
) -> Attributions:
    """Fit per-example attributions on a store's completed rows.

    Parameters
    ----------
    store
        A store or its path.
    progress
        ``True``: a tqdm bar on stderr whose unit follows the stage (rows
        streamed, iterations, epochs, slices; :mod:`coar_dask.fit.progress`).
        A function is called with each :class:`~coar_dask.solvers.base.FitProgress`
        (rows streamed, epochs, lambdas done, slices finished) -- hook your own
        display on it.
    slices, client, max_targets
        Split the targets into ``slices`` contiguous slices (or slices of at
        most ``max_targets``) fitted separately -- as Dask tasks on ``client``
        (GPU-annotated when ``device`` is CUDA), or one after the other in
        this process without a client -- and assembled in order
        (:mod:`coar_dask.fit.distributed`). Same result as one fit.
    settings
        A :class:`~coar_dask.fit.core.FitSettings`; or give its fields as keywords:
    **options
        ``x_name``, ``y_name`` (mask and output arrays, inferred when the
        store has one of each); ``num_train``, ``num_val`` (rows for training
        and validation; ``num_train=None`` uses every non-validation row);
        ``split_seed`` and ``row_rule`` (``"shuffle"``, default: a split of
        the completed rows seeded by ``split_seed``; ``"seed"``: the research
        code's rule, the first ``num_train`` rows then ``num_val``, see
        :mod:`coar_dask.fit.rows`); ``solver`` (``"lstsq"``, default: exact
        least squares / ridge; ``"saga"``: fast_l1's lasso path in torch;
        ``"fast_l1"``: the real package, CUDA only; see
        :mod:`coar_dask.solvers.registry`); ``target_slice`` (``(start,
        stop)``: fit only these output columns); ``device`` (``"cpu"``,
        default, or ``"cuda"``). Every other keyword is an option of the
        solver, e.g. ``ridge=1.0``, ``ridge_grid="auto"``, ``lr=1e-3, k=1,
        batch_size=2500`` (:class:`~coar_dask.solvers.lstsq.LstsqOptions`,
        :class:`~coar_dask.solvers.saga.SagaOptions`).

    Returns
    -------
    Attributions
        ``weight`` (P, K) in mask units, ``bias``, ``lam`` and metadata,
        including the validation MSE and correlation per example when
        ``num_val > 0``.

    Examples
    --------
    >>> attrs = fit("store", num_val=200, progress=True)   # doctest: +SKIP
    >>> attrs.save("attributions.pt")                      # doctest: +SKIP
    """
    if settings is None:
        settings = FitSettings.create(**options)
    elif options:
        raise TypeError(f"fit: pass settings or their fields as keywords, not both (got {sorted(options)}).")
    with fit_progress(progress) as report:
        if slices is not None or client is not None or max_targets is not None:
            attrs = fit_distributed(store, settings=settings, slices=slices, client=client, progress=report,
                                    max_targets=max_targets)
        else:
            attrs = fit_store(store, settings, report)
    extra = experiment_metadata(store if isinstance(store, Store) else open_store(store, read_only=True))
    return dataclasses.replace(attrs, metadata={**attrs.metadata, **extra})


def _components_summary(meta: Mapping[str, Any], experiment: Experiment) -> dict[str, Any] | None:
    """The store's recorded components summary, or one made by calling the model factory (not the examples)."""
    if meta.get("components"):
        return dict(meta["components"])
    try:
        model = call_factory("model", experiment.model, experiment.model_kwargs)
        comps = select_components(model, include=experiment.include, exclude=experiment.exclude,
                                  kinds=experiment.kinds)
    except (CoarError, ImportError, OSError, RuntimeError, TypeError, ValueError) as exc:
        logger.warning("component names unknown: the experiment's model could not be loaded here (%s)", exc)
        return None
    return comps.summary()


def experiment_metadata(store: Store) -> dict[str, Any]:
    """What attributions fitted on ``store`` record about its experiment (plain data).

    ``experiment`` (the description the store was built with), ``example_count``
    and ``components`` (layers and units, which name every component) when the
    store records its experiment; each is ``None`` otherwise (e.g. a store
    imported from the seed's ``.npy`` files).
    """
    meta = store.meta
    recorded = meta.get("experiment")
    if not recorded:
        return {"experiment": None, "example_count": None, "components": None}
    experiment = Experiment.from_dict(recorded, source=f"the experiment recorded in store {str(store.path)!r}")
    summary = _components_summary(meta, experiment)
    n_masks = int(np.prod(store.spec[experiment.x_name].shape))
    if summary is not None and int(summary.get("total", -1)) != n_masks:
        logger.warning("component names unknown: the model has %s components, the store %d",
                       summary.get("total"), n_masks)
        summary = None
    return {
        "experiment": dict(recorded),
        "example_count": int(np.prod(store.spec[experiment.y_name].shape)),
        "components": summary,
    }
