"""coar_dask: COAR component attributions for PyTorch models, at cluster scale.

The pipeline, one module per stage: :mod:`~coar_dask.spec` ->
:mod:`~coar_dask.store` -> :mod:`~coar_dask.build` (on a cluster from
:mod:`~coar_dask.cluster`) -> :mod:`~coar_dask.regression` ->
:mod:`~coar_dask.evaluate`. Heavy dependencies (torch, distributed) are
imported when first used.
"""

from __future__ import annotations

from ._version import __version__
from .beton import BetonRows, export_beton
from .build import BuildPlan, execute_plan, plan_build, run_build
from .cluster import cluster_client
from .components import Components, select_components
from .errors import CoarError
from .evaluate import EvaluationResult, evaluate, plot_evaluation
from .experiment import Experiment, load_experiment
from .masks import sample_masks
from .regression import Attributions, fit
from .seed_io import export_npy, import_npy
from .spec import Spec, load_spec
from .store import Store, init_store, open_store

__all__ = [
    "__version__",
    "Attributions",
    "BetonRows",
    "BuildPlan",
    "CoarError",
    "Components",
    "EvaluationResult",
    "Experiment",
    "Spec",
    "Store",
    "cluster_client",
    "evaluate",
    "execute_plan",
    "export_beton",
    "export_npy",
    "fit",
    "import_npy",
    "init_store",
    "load_experiment",
    "load_spec",
    "open_store",
    "plan_build",
    "plot_evaluation",
    "run_build",
    "sample_masks",
    "select_components",
]
