"""coar_dask: COAR component attributions for PyTorch models, at cluster scale.

The pipeline, one folder per layer (see ARCHITECTURE.md): :mod:`~coar_dask.core`
(spec, zarr store, masks, experiment) -> :mod:`~coar_dask.runtime` (the build,
on a cluster) -> :mod:`~coar_dask.fit` (regression over :mod:`~coar_dask.solvers`,
evaluation). Importing the package writes no file and imports neither torch
nor distributed: heavy dependencies are imported when first used.
"""

from __future__ import annotations

from coar_dask._version import __version__
from coar_dask.formats.beton import BetonRows, export_beton
from coar_dask.runtime.build import BuildPlan, execute_plan, init_experiment_store, plan_build, run_build
from coar_dask.runtime.clusters import cluster_client
from coar_dask.core.components import Components, select_components
from coar_dask.errors import CoarError
from coar_dask.fit.evaluate import EvaluationResult, evaluate, plot_evaluation
from coar_dask.core.experiment import Experiment, load_experiment
from coar_dask.core.masks import sample_masks
from coar_dask.core.outputs import Batch, register_output
from coar_dask.fit.baselines import gradient_x_parameter, leave_one_out
from coar_dask.fit.compare import compare
from coar_dask.fit.edit import edit_scores, edited, edit_model, sweep_edit
from coar_dask.fit.fit import Attributions, fit
from coar_dask.formats.npy import export_npy, import_npy
from coar_dask.core.spec import Spec, load_spec
from coar_dask.core.store import Store, init_store, open_store

__all__ = [
    "__version__",
    "Attributions",
    "Batch",
    "BetonRows",
    "BuildPlan",
    "CoarError",
    "Components",
    "EvaluationResult",
    "Experiment",
    "Spec",
    "Store",
    "cluster_client",
    "sweep_edit",
    "edit_model",
    "edited",
    "edit_scores",
    "compare",
    "leave_one_out",
    "gradient_x_parameter",
    "init_experiment_store",
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
    "register_output",
    "run_build",
    "sample_masks",
    "select_components",
]
