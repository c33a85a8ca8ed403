"""The prior attribution a fit shrinks toward (``fit(store, prior="gp"|"loo"|FILE)``, ``--prior``).

Building ablated models is the whole cost of COAR; with rows near the
component count, ridge toward a cheap prior reaches a held-out correlation
least squares needs many more rows for (``benchmarks/sample_efficiency.py``).
The solver side is :mod:`coar_dask.solvers.prior`; this module makes the
:class:`~coar_dask.solvers.prior.Prior` of a store:

``"gp"``
    gradient x parameter of the store's recorded experiment
    (:func:`~coar_dask.fit.baselines.gradient_x_parameter`: one backward pass
    per batch of examples);
``"loo"``
    leave-one-out (``P + 1`` forward passes), in the LOO store beside the
    store (``STORE-loo``, where ``compare`` and ``demo`` keep it: reused,
    resumed);
a file
    attributions saved by :meth:`~coar_dask.fit.attributions.Attributions.save`.

All three are in mask units (a weight is the output change of *keeping* the
component, i.e. minus the change of ablating it), as COAR's; the solver still
fits one scalar per example on the training rows (``prior_scale``), so a
prior off in scale or sign is rescaled rather than trusted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from coar_dask.core.store import Store
from coar_dask.core.trust import experiment_from_record
from coar_dask.errors import ConfigError, RegressionError
from coar_dask.fit.attributions import Attributions
from coar_dask.solvers.prior import Prior

__all__ = ["PRIORS", "make_prior", "loo_store_path"]

logger = logging.getLogger(__name__)

#: The named priors; anything else is read as an attributions file.
PRIORS = ("gp", "loo")


def loo_store_path(store: Store) -> Path:
    """``<store>-loo`` beside the store: where ``compare`` and ``demo`` keep the LOO rows."""
    return store.path.with_name(store.path.name + "-loo")


def make_prior(store: Store, prior: str | os.PathLike, x_name: str, y_name: str, *, client: Any | None = None,
               loo_store: str | os.PathLike | None = None) -> Prior:
    """The :class:`~coar_dask.solvers.prior.Prior` named by ``prior`` for ``store``'s mask array ``x_name``.

    Parameters
    ----------
    store
        The store to fit (its recorded experiment makes ``"gp"`` and ``"loo"``).
    prior
        ``"gp"``, ``"loo"`` or the path of an attributions file.
    x_name, y_name
        The mask and output arrays: the prior must have their component and output counts.
    client
        A Dask client for the GP / LOO tasks (``None``: in this process).
    loo_store
        The LOO store (default :func:`loo_store_path`).

    Raises
    ------
    RegressionError
        When the prior's component count is not the store's, or its file cannot be read.
    """
    P, K = int(np.prod(store.spec[x_name].shape)), int(np.prod(store.spec[y_name].shape))
    name = str(prior)
    if name in PRIORS:
        # the baselines (and the ablation engine under them) load only when a computed prior is asked for:
        # importing coar_dask.fit stays light (tests/test_architecture.py)
        from coar_dask.fit.baselines import gradient_x_parameter, leave_one_out

        experiment = _experiment(store)
        attrs = (gradient_x_parameter(experiment, client=client) if name == "gp" else
                 leave_one_out(experiment, loo_store or loo_store_path(store), client=client))
    else:
        if not Path(name).is_file():
            raise RegressionError(f"--prior {name!r}: not 'gp', 'loo' or an attributions file; give one of them.")
        attrs = Attributions.load(name)
    weight = np.asarray(attrs.weight, dtype=np.float64)
    if weight.shape != (P, K):
        raise RegressionError(f"prior {name!r} has weights of shape {weight.shape}, not ({P}, {K}) for the {P} "
                              f"components of {x_name!r} and {K} outputs of {y_name!r}: give attributions of this "
                              f"store's model and examples.")
    logger.info("prior %s: %d components x %d outputs", name, *weight.shape)
    return Prior(weight, name=name if name in PRIORS else os.path.abspath(name))


def _experiment(store: Store) -> Any:
    recorded = store.meta.get("experiment")
    if not recorded:
        raise ConfigError(f"store {str(store.path)!r} records no experiment to compute a gp / loo prior from; "
                          f"give an attributions file instead (--prior FILE).")
    return experiment_from_record(recorded, f"the experiment recorded in store {str(store.path)!r}")
