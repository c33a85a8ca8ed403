"""coar_dask: COAR component attributions for PyTorch models, at cluster scale.

The pipeline, one folder per layer (see ARCHITECTURE.md): :mod:`~coar_dask.core`
(spec, zarr store, masks, experiment) -> :mod:`~coar_dask.runtime` (the build,
on a cluster) -> :mod:`~coar_dask.fit` (regression over :mod:`~coar_dask.solvers`,
evaluation). This module re-exports that pipeline; the rest lives in its
subpackage: baselines, COAR-Edit, comparisons and plots in :mod:`coar_dask.fit`,
FFCV ``.beton`` and the seed's ``.npy`` layout in :mod:`coar_dask.formats`.
Their old top-level names still work, with a :class:`DeprecationWarning`, until
0.3. Importing the package writes no file and imports neither torch nor
distributed: heavy dependencies are imported when first used.
"""

from __future__ import annotations

from coar_dask._exports import lazy_exports
from coar_dask._version import __version__
from coar_dask.core.components import Components, select_components
from coar_dask.core.experiment import Experiment, load_experiment
from coar_dask.core.masks import sample_masks
from coar_dask.core.outputs import Batch, register_output
from coar_dask.core.spec import Spec, load_spec
from coar_dask.core.store import Store, init_store, open_store
from coar_dask.core.trust import trust_recorded
from coar_dask.errors import CoarError
from coar_dask.fit.evaluate import EvaluationResult, evaluate
from coar_dask.fit.fit import Attributions, fit
from coar_dask.runtime.build import BuildPlan, execute_plan, init_experiment_store, plan_build, run_build
from coar_dask.runtime.clusters import cluster_client

__all__ = [
    "__version__",
    "CoarError",
    # spec and store
    "Spec",
    "load_spec",
    "Store",
    "init_store",
    "open_store",
    # what is ablated and measured
    "Experiment",
    "load_experiment",
    "Components",
    "select_components",
    "Batch",
    "register_output",
    "sample_masks",
    "trust_recorded",
    # build, on a cluster
    "init_experiment_store",
    "BuildPlan",
    "plan_build",
    "execute_plan",
    "run_build",
    "cluster_client",
    # regression and evaluation
    "Attributions",
    "fit",
    "EvaluationResult",
    "evaluate",
]

#: Names this module exported in 0.1 and where each lives now: deprecated aliases, removed in 0.3.
MOVED = {
    "leave_one_out": "coar_dask.fit",
    "gradient_x_parameter": "coar_dask.fit",
    "edit_scores": "coar_dask.fit",
    "edited": "coar_dask.fit",
    "edit_model": "coar_dask.fit",
    "sweep_edit": "coar_dask.fit",
    "plot_evaluation": "coar_dask.fit",
    "compare": "coar_dask.fit.compare",  # coar_dask.fit.compare is the module's own name
    "BetonRows": "coar_dask.formats",
    "export_beton": "coar_dask.formats",
    "export_npy": "coar_dask.formats",
    "import_npy": "coar_dask.formats",
}

__getattr__, __dir__ = lazy_exports(globals(), {}, MOVED)
