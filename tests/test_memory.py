"""The memory model (coar_dask.core.memory) and what uses it: lstsq's method choice, the GPU-worker check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coar_dask.core import memory
from coar_dask.errors import BuildError, RegressionError
from coar_dask.runtime.gpu import check_gpu_workers
from coar_dask.solvers import lstsq as lstsq_mod

ROOT = Path(__file__).resolve().parents[1]


class _Rows:
    def __init__(self, X, Y, block=50):
        self.X, self.Y, self.block = X, Y, block
        self.n_rows, self.n_features = X.shape
        self.n_targets = Y.shape[1]

    def blocks(self):
        for s in range(0, self.n_rows, self.block):
            yield self.X[s:s + self.block], self.Y[s:s + self.block]


def _problem(n=300, p=20, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((n, p)) >= 0.1).astype(np.float32)
    return X, (X @ rng.normal(size=(p, k))).astype(np.float32)


def test_gram_check_says_no_for_resnet50_at_16_gb_free(monkeypatch):
    """Issue 23 finding 2: 3 P x P float64 said ResNet-50's Gram (P = 22,720) fits 16 GB free; it needs ~3.8 P^2
    float64 on CUDA before X^T Y (fake torch.cuda: no GPU here; benchmarks/gpu_check.sh measures the real one)."""
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * 10**9, 80 * 10**9))
    cuda = torch.device("cuda")
    assert not lstsq_mod.gram_fits_device(22_720, cuda, grid=False)
    assert lstsq_mod.gram_fits_device(10_000, cuda, grid=False)
    need = memory.fit_bytes("gram", 22_720, 50_000, rows=64).total
    assert 45e9 < need < 70e9  # the measured ~56 GB, not 12.4 GB


def test_cg_memory_counts_its_p_by_k_matrices():
    """Finding 3: CG was counted as 2 P x K float64 (ViT at K 5,000: 3.3 GB); it holds ~11 of them."""
    assert memory.fit_bytes("cg", 82_944, 5_000, rows=64).total > 30e9
    assert memory.slices_needed("cg", 82_944, 5_000, 20e9, rows=64) == 2
    assert memory.slices_needed("cg", 82_944, 5_000, 1e6, rows=64) is None


def test_auto_never_picks_a_method_that_does_not_fit(monkeypatch):
    X, Y = _problem()
    rows = _Rows(X, Y)
    gram = memory.fit_bytes("gram", 20, 3, rows=lstsq_mod.batch_rows_for(20, 3)).total
    cg = memory.fit_bytes("cg", 20, 3, rows=lstsq_mod.batch_rows_for(20, 3)).total
    assert cg < gram
    monkeypatch.setattr(lstsq_mod, "available_host_bytes", lambda: (gram + cg) // 2)
    assert lstsq_mod.lstsq(rows, ridge=1.0).info["method"] == "cg"
    monkeypatch.setattr(lstsq_mod, "available_host_bytes", lambda: gram + 1)
    assert lstsq_mod.lstsq(rows, ridge=1.0).info["method"] == "gram"
    monkeypatch.setattr(lstsq_mod, "available_host_bytes", lambda: cg // 2)
    with pytest.raises(RegressionError, match="neither method fits"):
        lstsq_mod.lstsq(rows, ridge=1.0)


def test_cg_operator_batches_outweigh_the_iterate():
    """Finding 3: 64-row batches for P >= 22k moved the P x K iterate (GBs) per 64 rows."""
    X, Y = _problem()
    assert memory.cg_batch_rows(82_944, 5_000, 64) > 1_000
    assert memory.cg_batch_rows(100, 10, 9_000) == 9_000  # never fewer than the streaming default
    m = lstsq_mod.stream_moments(_Rows(X, Y), lstsq_mod.torch_device("cpu"), gram=False, rows=None, progress=None)
    op = lstsq_mod._NormalOperator(_Rows(X, Y), m, lstsq_mod.torch_device("cpu"), None)
    assert op.rows == memory.cg_batch_rows(20, 3, lstsq_mod.batch_rows_for(20, 3))


class _Client:
    def __init__(self, workers):
        self.workers = workers

    def scheduler_info(self):
        return {"workers": self.workers}


def test_gpu_workers_too_small_for_the_task_are_refused():
    """Dask reports each worker's GPU memory (NVML); faked here (no GPU)."""
    small = {"w": {"resources": {"GPU": 1}, "gpu": {"memory-total": 16 * 10**9}}}
    check_gpu_workers(_Client(small), "slice", RegressionError, "--device cpu", need_bytes=10e9)
    with pytest.raises(RegressionError, match="GPU memory"):
        check_gpu_workers(_Client(small), "slice", RegressionError, "--device cpu", need_bytes=56e9)
    unknown = {"w": {"resources": {"GPU": 1}}}  # no NVML: not checked
    check_gpu_workers(_Client(unknown), "block", BuildError, "x", need_bytes=56e9)


def _measured(case: dict) -> dict:
    """Run one case of benchmarks/memory_model.py in a fresh process: its measured peak and the model's."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_model.py"), "--child", json.dumps(case)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [
    {"stage": "fit", "method": "gram", "P": 1500, "K": 300, "n": 600},
    {"stage": "fit", "method": "cg", "P": 1500, "K": 1000, "n": 600},
])
def test_model_matches_a_measured_peak(case):
    """A fresh process measures the real solver's peak RSS growth (benchmarks/memory_model.py)."""
    result = _measured(case)
    assert abs(result["rel_error"]) <= 0.25, result


def test_build_worker_counts_the_folded_copies_and_batchnorm_outputs():
    """The smallest build case was -31..-41%: a BatchNorm model's runner folds a copy whatever the masks per
    pass, fx's fuse deep-copies the model first (garbage in reference cycles until the cyclic collector runs),
    and in-place passes run the unfolded model, whose BatchNorm outputs are live too. Measured in a fresh
    process on a real ResNet (benchmarks/memory_model.py's build case)."""
    case = {"stage": "build", "method": "worker", "width": 16, "examples": 64, "batch": 64, "masks_per_pass": 1}
    result = _measured(case)
    assert abs(result["rel_error"]) <= 0.25, result
    no_bn = memory.build_worker_bytes(param_bytes=100, example_bytes=4, n_examples=8, examples_per_pass=8,
                                      masks_per_pass=1, activation_elements=1, outputs_per_example=0, batchnorm=False)
    assert no_bn["device"].to_dict()["parts"]["model"] == 100  # LayerNorm models (ViT, GPT-2) fold nothing
