"""coar-dask plan: the four paper configs on the meta device, no factory called, no download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coar_dask.core import memory
from coar_dask.errors import ExperimentError
from coar_dask.zoo.plan import plan_experiment
from coar_dask.zoo.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"build_gpu_hours", "disk_bytes", "worker_peak_bytes", "fit_method", "fit_peak_bytes", "attributions_bytes"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_plan_for_each_paper_config(name):
    plan = plan_experiment(ROOT / "configs" / name / "experiment.yaml", 100_000, gpu="a100", time_block=False)
    d = plan.to_dict()
    assert KEYS <= set(d)
    assert plan.components == PRESETS[name].total
    assert plan.build_gpu_hours == pytest.approx(plan.build_flops / (0.4 * 312e12) / 3600)
    # the fit chosen fits the GPU, by the memory model
    assert plan.fit_peak_bytes <= plan.fit_budget_bytes
    assert plan.fit_peak_bytes == memory.slice_bytes(plan.fit_method, plan.components, plan.examples,
                                                     plan.fit_slices, rows=d["fit_rows"], device="cuda").total
    assert plan.attributions_bytes >= 4 * plan.components * plan.examples
    assert plan.disk["masks_ratio"] > 10  # bit-shuffled bool masks at alpha <= 0.05


def test_resnet50_gram_is_not_planned_where_it_does_not_fit():
    """Finding 2: ResNet-50's Gram with K = 50,000 needs ~52 GB; a 16 GB budget must not get it."""
    with pytest.raises(Exception, match="neither method fits"):
        memory.choose_fit_method(22_720, 50_000, 0.9 * 16e9, rows=64, device="cuda")


def test_unknown_experiment_and_gpu_are_refused(tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        plan_experiment(tmp_path / "nope.yaml", 10)
    with pytest.raises(ExperimentError, match="gpu must be"):
        plan_experiment(ROOT / "configs/cifar_resnet/experiment.yaml", 10, gpu="tpu")


def test_cli_plan_json_with_the_timed_block():
    proc = subprocess.run([sys.executable, "-m", "coar_dask.cli", "plan", "--experiment",
                           "configs/cifar_resnet/experiment.yaml", "--rows", "50000", "--gpu", "cpu", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(proc.stdout)
    assert KEYS <= set(d) and d["fit_method"] == "gram"
    assert d["timed_block"]["flops_per_s"] > 0
    assert d["build_gpu_hours"] == pytest.approx(d["build_flops"] / d["timed_block"]["flops_per_s"] / 3600)
