"""Fit attributions: stream a store's completed rows into a solver.

The public entry point is :func:`fit`. It returns :class:`Attributions`,
whose ``weight`` is ``(P, K)`` in *mask units*: the predicted output of
example ``k`` for a mask ``m`` (1 = component kept, 0 = ablated) is
``m @ weight[:, k] + bias[k]``. A positive weight means keeping the
component raises the output (ablating it lowers it).

One way through: :func:`fit` makes a :class:`~coar_dask.fit.plan.FitSettings`,
resolves it once into a :class:`~coar_dask.fit.plan.FitPlan`
(:func:`~coar_dask.fit.plan.plan_fit`: rows, execution, slices), runs one of
three executions -- in this process (:func:`~coar_dask.fit.core.solve`),
row groups (:func:`~coar_dask.fit.moments.execute_rows`) or target slices
(:func:`~coar_dask.fit.distributed.execute_slices`) -- and assembles the
parts (:func:`~coar_dask.fit.core.assemble`), naming the components from the
store's record. :func:`components_from_model` is the one place that names
them by calling the recorded model factory, and only when asked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

from coar_dask.core.components import select_components
from coar_dask.core.experiment import call_factory
from coar_dask.core.store import Store, open_store
from coar_dask.core.trust import TRUST_HINT, experiment_from_record, untrusted_imports
from coar_dask.errors import CoarError, RegressionError
from coar_dask.fit.attributions import SIGN_CONVENTION, Attributions
from coar_dask.fit.core import FitPart, assemble, check_components, solve
from coar_dask.fit.distributed import execute_slices
from coar_dask.fit.moments import execute_rows
from coar_dask.fit.plan import FitPlan, FitSettings, plan_fit
from coar_dask.fit.prior import make_prior
from coar_dask.fit.progress import fit_progress
from coar_dask.fit.rows import StoreRows, infer_names, split_rows
from coar_dask.solvers.base import FitProgress, ProgressFn
from coar_dask.solvers.registry import check_solver_options

__all__ = [
    "Attributions",
    "FitSettings",
    "SIGN_CONVENTION",
    "StoreRows",
    "check_solver_options",
    "fit",
    "execute",
    "infer_names",
    "split_rows",
    "components_from_model",
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
        :class:`~coar_dask.solvers.saga.SagaOptions`); ``prior="gp"|"loo"|FILE`` shrinks the
        least-squares fit toward that attribution, its penalty chosen on the validation rows
        (``ridge_grid``, ``"auto"`` unless given; :mod:`coar_dask.fit.prior`).

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
    settings = _settings(settings, options)
    if not isinstance(store, (Store, str, os.PathLike)):
        raise RegressionError(f"fit: store must be a Store or the path of one; found a {type(store).__name__}. "
                              f"Pass the store's directory, e.g. fit('path/to/store').")
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    settings = _with_prior(settings, store, client)
    plan = plan_fit(store, settings, slices=slices, max_targets=max_targets, client=client)
    with fit_progress(progress) as report:
        parts = execute(plan, client, report, store=store)
    return assemble(plan, parts, store)


def _with_prior(settings: FitSettings, store: Store, client: Any | None) -> FitSettings:
    """``settings`` with a prior named by a string (``"gp"``, ``"loo"``, a file) made for ``store``."""
    named = settings.options.get("prior")
    if not isinstance(named, (str, os.PathLike)):
        return settings
    x_name, y_name = infer_names(store, settings.x_name, settings.y_name)
    prior = make_prior(store, named, x_name, y_name, client=client)
    options = {**settings.options, "prior": prior}
    if options.get("ridge_grid") is None and not options.get("ridge"):
        options["ridge_grid"] = "auto"  # lam 0 would be least squares: choose it on validation rows
        logger.info("prior %s: choosing the penalty per example on validation rows (ridge_grid='auto')", named)
    return dataclasses.replace(settings, solver_options=tuple(sorted(options.items())))


def _settings(settings: FitSettings | None, options: dict[str, Any]) -> FitSettings:
    if settings is None:
        return FitSettings.create(**options)
    if options:
        raise RegressionError(f"fit: pass settings or their fields as keywords, not both (got {sorted(options)}).")
    return settings


def execute(plan: FitPlan, client: Any | None = None, progress: ProgressFn | None = None, *,
            store: Store | None = None) -> list[FitPart]:
    """Run ``plan`` by its execution -> the solved parts, in target order, for
    :func:`~coar_dask.fit.core.assemble`."""
    if plan.execution == "rows":
        return [execute_rows(plan, client, progress=progress, store=store)]
    if plan.execution == "slices":
        return execute_slices(plan, client, progress=progress)
    logger.info("%r", plan)
    return [solve(plan, plan.target_range, progress, store=store)]


def components_from_model(store: Store | str | os.PathLike) -> dict[str, Any] | None:
    """The components summary of ``store``'s recorded experiment, made by importing and calling its
    recorded model factory (not the examples) -- for stores built before builds recorded the summary.

    This runs code named in the store's record: the one function that does, called only on request
    (:func:`fit` never calls it), and only when it is built-in or agreed to (:mod:`coar_dask.core.trust`). Returns ``None`` (and logs why) when the model cannot be made.

    Examples
    --------
    >>> attrs = fit("old-store")                                                      # doctest: +SKIP
    >>> named = dataclasses.replace(attrs, metadata={**attrs.metadata,
    ...                             "components": components_from_model("old-store")})  # doctest: +SKIP
    """
    if not isinstance(store, Store):
        store = open_store(store, read_only=True)
    recorded = store.meta.get("experiment")
    if not recorded:
        return None
    # code the user has not agreed to is refused, not imported
    experiment = experiment_from_record(recorded, f"the experiment recorded in store {str(store.path)!r}")
    try:
        model = call_factory("model", experiment.model, experiment.model_kwargs)
        comps = select_components(model, include=experiment.include, exclude=experiment.exclude,
                                  kinds=experiment.kinds)
    except (CoarError, ImportError, OSError, RuntimeError, TypeError, ValueError) as exc:
        logger.warning("component names unknown: the experiment's model could not be loaded here (%s)", exc)
        return None
    return check_components(comps.summary(), store, experiment.x_name)
