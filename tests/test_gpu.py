"""The GPU path (issue 18): what a CPU-only machine can check, and ``gpu``-marked tests for a GPU.

On a CPU-only machine CUDA is mocked where the logic allows: the client
must never touch CUDA (``torch.cuda.is_available`` raises if it is asked),
a CUDA build on CPU workers is refused before anything is submitted, and
float16 overflow is caught after the cast. The ``gpu``-marked tests
(``benchmarks/gpu_check.sh`` runs them) compare CUDA against CPU results.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_model  # noqa: E402

from coar_dask.core.experiment import Experiment  # noqa: E402
from coar_dask.core.store import open_store  # noqa: E402
from coar_dask.errors import BuildError  # noqa: E402
from coar_dask.runtime import build as B  # noqa: E402
from coar_dask.runtime.gpu import check_gpu_workers, client_experiment  # noqa: E402

has_cuda = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _cuda_experiment(**changes) -> Experiment:
    return Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=5,
                      device="cuda", **changes)


@pytest.fixture
def no_cuda_in_client(monkeypatch):
    """Asking torch about CUDA in this process is the bug: fail loudly if anything does."""

    def touched(*args, **kwargs):
        raise AssertionError("the client touched CUDA")

    for name in ("is_available", "device_count", "init", "mem_get_info", "set_device"):
        monkeypatch.setattr(torch.cuda, name, touched)


# ----------------------------------------------------------------------------- 1: the client stays on the CPU
def test_client_experiment_is_the_same_experiment_on_the_cpu():
    exp = _cuda_experiment()
    assert client_experiment(exp).device == "cpu"
    assert client_experiment(exp).fingerprint == exp.fingerprint
    cpu = exp.replace(device="cpu")
    assert client_experiment(cpu) is cpu


def test_init_and_plan_of_a_cuda_experiment_never_touch_cuda(tmp_path, no_cuda_in_client):
    """Issue 18.1: a SLURM login node without a GPU plans a device: cuda build."""
    exp = _cuda_experiment()
    store = B.init_experiment_store(tmp_path / "s", exp, rows=20, rows_per_chunk=10)
    assert B.recorded_experiment(store).device == "cuda"
    plan = B.plan_build(store, None)
    assert plan.gpu and plan.experiment.device == "cuda" and len(plan.blocks) == 2
    assert open_store(tmp_path / "s").experiment_fingerprint == exp.fingerprint


# ----------------------------------------------------------------------------- 2: GPU tasks need GPU workers
class _Client:
    """A client whose scheduler knows ``workers``; submitting anything is the bug (it would wait forever)."""

    def __init__(self, workers):
        self.workers = workers

    def scheduler_info(self):
        return {"workers": self.workers}

    def submit(self, *args, **kwargs):
        raise AssertionError("a GPU task was submitted to a cluster without GPU workers")


def test_cuda_build_on_cpu_workers_is_refused_before_submitting(tmp_path, no_cuda_in_client):
    store = B.init_experiment_store(tmp_path / "s", _cuda_experiment(), rows=10, rows_per_chunk=10)
    plan = B.plan_build(store, None)
    client = _Client({"tcp://a:1": {"resources": {}}, "tcp://b:2": {"resources": {"MEM": 1}}})
    with pytest.raises(BuildError, match="none of the cluster's 2 worker") as err:
        B.execute_plan(plan, client)
    message = str(err.value)
    assert "--gpus-per-job 1" in message and "--gpus auto" in message and "--resources GPU=1" in message
    assert "device: cpu" in message and "\n" not in message
    assert open_store(tmp_path / "s").pending_blocks()  # nothing was written


def test_gpu_worker_check_lets_gpu_workers_and_empty_adaptive_clusters_through():
    check_gpu_workers(_Client({"w": {"resources": {"GPU": 1}}, "c": {"resources": {}}}), "block", BuildError, "x")
    check_gpu_workers(_Client({}), "block", BuildError, "x")  # adaptive SLURM from 0: its jobs bring GPUs
    with pytest.raises(BuildError, match="each slice"):
        check_gpu_workers(_Client({"w": {}}), "slice", BuildError, "--device cpu")


def _cli(coar_dask_cli, cwd: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*coar_dask_cli, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(has_cuda, reason="the acceptance is about a machine without a GPU")
def test_cli_on_a_cpu_machine_inits_a_cuda_experiment_and_refuses_its_build_on_cpu_workers(tmp_path, coar_dask_cli):
    """Issue 18's acceptance: init and cluster --dry-run succeed; build on a LocalCluster of CPU workers
    exits 2 within 60 s naming the missing GPU workers."""
    _cuda_experiment().to_yaml(tmp_path / "exp.yaml")
    init = _cli(coar_dask_cli, tmp_path, "init", "--store", "s", "--experiment", "exp.yaml", "--rows", "100")
    assert init.returncode == 0, init.stderr
    t0 = time.monotonic()
    build = _cli(coar_dask_cli, tmp_path, "build", "--store", "s", "--cluster", "local", "--workers", "1",
                 timeout=90)
    assert build.returncode == 2, build.stderr
    assert time.monotonic() - t0 < 60
    assert "advertises a GPU" in build.stderr and "--gpus-per-job 1" in build.stderr
    assert open_store(tmp_path / "s").status()["completed_rows"] == 0
    pytest.importorskip("dask_jobqueue")
    dry = _cli(coar_dask_cli, tmp_path, "cluster", "--dry-run", "--cores", "4", "--memory", "16GB",
               "--gpus-per-job", "1", "--jobs", "2")
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --gres=gpu:1" in dry.stdout and "GPU=1" in dry.stdout


# ----------------------------------------------------------------------------- 9: float16 overflow
class _Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def huge_logits_model():
    """The tiny model with logits ~1e5: margins finite in float32, inf in float16."""
    return torch.nn.Sequential(tiny_model(), _Scale(1e6)).eval()


def test_float16_overflow_is_caught_after_the_cast_and_names_float32(tmp_path):
    """Issue 18.9: a margin above 65,504 became inf in the float16 store with no error."""
    exp = Experiment(model="test_gpu:huge_logits_model", examples="conftest:tiny_examples", alpha=0.2,
                     batch_size=5)
    store = B.init_experiment_store(tmp_path / "s", exp, rows=10, rows_per_chunk=10)
    plan = B.plan_build(store, exp)
    with pytest.raises(BuildError, match=r"beyond the largest float16 \(65504\).*y_dtype: float32") as err:
        B.run_block(plan.store_path, exp, 0)
    assert "\n" not in str(err.value)
    assert [b.index for b in open_store(tmp_path / "s").pending_blocks()] == [0]
    wide = exp.replace(y_dtype="float32")
    store32 = B.init_experiment_store(tmp_path / "s32", wide, rows=10, rows_per_chunk=10)
    B.run_build(store32, wide)
    values = np.asarray(open_store(tmp_path / "s32").array("margins")[:])
    assert np.isfinite(values).all() and np.abs(values).max() > 65504


# ----------------------------------------------------------------------------- on a GPU (gpu_check.sh)
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")


def _built(tmp_path, name: str, exp: Experiment) -> np.ndarray:
    store = B.init_experiment_store(tmp_path / name, exp, rows=40, rows_per_chunk=20)
    B.run_build(store, exp)
    return np.asarray(open_store(tmp_path / name).array(exp.y_name)[:], dtype=np.float32)


#: |CUDA - CPU| of the tiny model's margins, relative to their scale: float32 (TF32 off in the batched
#: path's check) and autocast (AMP) with a float16 store: float16 keeps 10 mantissa bits, bfloat16 7.
FP32_TOL, AMP_TOL = 1e-3, {"fp16": 2e-2, "bf16": 8e-2}


@gpu
@needs_cuda
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_build_equals_the_cpu_build(tmp_path, amp):
    """A build with device cuda (with and without AMP) equals the CPU build within the stated tolerance,
    and takes the batched path (the per-process check did not fall back)."""
    from coar_dask.ablation import engine

    cpu_exp = Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=5)
    cuda_exp = cpu_exp.replace(device="cuda", amp=amp)
    cpu = _built(tmp_path, "cpu", cpu_exp)
    cuda = _built(tmp_path, "cuda", cuda_exp)
    scale = float(np.abs(cpu).max())
    assert float(np.abs(cuda - cpu).max()) <= (AMP_TOL[amp] if amp != "off" else FP32_TOL) * scale
    from coar_dask.core.experiment import load_state

    runner = engine._runner(load_state(cuda_exp))
    assert runner.batched is not None and runner.verified, f"the batched path fell back: {runner.reason}"


def _planted(seed=0, n=1200, p=64, k=8):
    rng = np.random.default_rng(seed)
    X = (rng.random((n, p)) >= 0.1).astype(np.float32)
    W = rng.normal(size=(p, k))
    Y = (X @ W + 3.0 + 0.01 * rng.normal(size=(n, k))).astype(np.float32)
    return X, Y


class _Rows:
    def __init__(self, X, Y, block=100):
        self.X, self.Y, self.block = X, Y, block
        self.n_rows, self.n_features = X.shape
        self.n_targets = Y.shape[1]

    def blocks(self):
        for a in range(0, self.n_rows, self.block):
            yield self.X[a:a + self.block], self.Y[a:a + self.block]


@gpu
@needs_cuda
@pytest.mark.parametrize("name,options,rtol", [
    ("lstsq", {"method": "gram"}, 1e-5),
    ("lstsq", {"method": "cg"}, 1e-4),
    ("saga", {"lr": 0.05, "batch_size": 100, "max_epochs": 400}, 1e-3),
    ("fast_l1", {"lr": 0.05, "batch_size": 100, "max_epochs": 400}, 1e-2),
])
def test_cuda_fit_equals_the_cpu_fit(name, options, rtol):
    """lstsq (Gram and CG), SAGA and fast_l1 (if installed) on CUDA against the CPU fit (fast_l1: against
    SAGA on the CPU, the same algorithm), with TF32 matmuls enabled as a user might."""
    from coar_dask.solvers import registry

    if name == "fast_l1":
        pytest.importorskip("fast_l1")
    X, Y = _planted()
    tr, va = _Rows(X[:1000], Y[:1000]), _Rows(X[1000:], Y[1000:])
    ref_name = "saga" if name == "fast_l1" else name
    ref_options = {k: v for k, v in options.items()}
    ref = registry.get_solver(ref_name)(tr, va, device="cpu", **ref_options)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        res = registry.get_solver(name)(tr, va, device="cuda", **options)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    scale = float(np.abs(ref.weight).max())
    assert float(np.abs(res.weight - ref.weight).max()) <= rtol * scale * 10
    np.testing.assert_allclose(res.info["val_correlation"], ref.info["val_correlation"], atol=rtol)


@gpu
@needs_cuda
def test_gram_choice_on_this_gpu_follows_its_free_memory():
    from coar_dask.solvers.lstsq import gram_fits_device

    free, _total = torch.cuda.mem_get_info()
    assert gram_fits_device(1000, torch.device("cuda"), grid=False)
    assert not gram_fits_device(int((free / 8) ** 0.5) + 1, torch.device("cuda"), grid=False)


# ------------------------------------------------------------------ issue 23: the GPU check's scripts
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, *argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(BENCHMARKS / name), *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_gpu_check_dry_run_lists_every_step_without_a_gpu_or_a_venv(tmp_path):
    """Issue 23 finding 11: the lent machine has a CUDA torch and no index; the old script ran `make venv`."""
    assert "make venv" not in (BENCHMARKS / "gpu_check.sh").read_text()
    res = _script("gpu_check.sh", "--wheels", str(tmp_path / "none"), "--dry-run", "--out", str(tmp_path / "g.json"))
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("[gpu_check] step ")]
    assert [s.split(":")[0].split()[-1] for s in steps] == ["torch", "install-wheels", "imports", "gpu-tests", "bench"]
    text = res.stdout
    assert "pip install --no-index --no-deps" in text and "--target" in text and "-m gpu" in text
    assert "gpu_bench.py --out " + str(tmp_path / "g.json") in text
    assert not (tmp_path / "g.json").exists() and not (tmp_path / "none").exists()  # nothing ran
    assert _script("gpu_check.sh", "--dry-run").returncode == 2  # --wheels is required


# The selection must never match this test itself (its id holds the words of a -k selection: the
# inner pytest would run this test again, recursively): select by a marker nothing carries instead.
@pytest.mark.parametrize("selection, rc", [("-m never_marked_zz", 1), ("-k test_local_gpus_must_be_visible", 0)],
                         ids=["empty", "one"])
def test_gpu_check_counts_an_empty_test_selection_as_a_failure(selection, rc):
    """pytest's exit 5 (no tests collected) passed the old check; the tests step now fails on it."""
    res = _script("gpu_check.sh", "--tests-only", "--pytest-args", f"tests/test_gpu.py {selection}",
                  env={"PYTHON": sys.executable})
    assert res.returncode == rc, res.stdout + res.stderr
    if rc:
        assert '"exit": 5' in res.stdout and "no tests collected" in res.stdout
    else:
        assert '"ran": 1' in res.stdout


def test_gpu_wheels_list_keeps_what_the_machine_lacks_and_never_its_cuda_stack(tmp_path):
    """The requirement set from a pip report, with no network: torch, nvidia-*, triton and cuda-* are
    always dropped; what the lent image holds only without --all."""
    import json

    names = {"coar_dask": "0.1.0", "torch": "2.10.0", "nvidia-cublas-cu12": "12.8.4.1", "triton": "3.6.0",
             "cuda-bindings": "12.9.4", "dask": "2026.8.0", "Zarr": "3.4.2", "numpy": "2.3.0", "zict": "3.0.0"}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"install": [{"metadata": {"name": n, "version": v}} for n, v in names.items()]}))
    res = _script("gpu_wheels.sh", str(tmp_path / "wheels"), "--list", "--from-report", str(report))
    assert res.returncode == 0, res.stderr
    wanted = [line for line in res.stdout.splitlines() if "==" in line and not line.startswith("[")]
    assert wanted == ["dask==2026.8.0", "zarr==3.4.2", "zict==3.0.0"]
    assert "skip torch==2.10.0" in res.stderr and "skip nvidia-cublas-cu12" in res.stderr
    res = _script("gpu_wheels.sh", str(tmp_path / "wheels"), "--list", "--all", "--from-report", str(report))
    wanted = [line for line in res.stdout.splitlines() if "==" in line and not line.startswith("[")]
    assert "numpy==2.3.0" in wanted and not any(w.startswith(("torch", "nvidia", "triton", "cuda")) for w in wanted)
    assert not (tmp_path / "wheels").exists()  # --list downloads nothing


def _gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", BENCHMARKS / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _junit(path: Path, tests: int, skipped: int) -> str:
    path.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" failures="0" errors="0" '
                    f'skipped="{skipped}"/></testsuites>')
    return str(path)


def test_gpu_tests_verdict_fails_when_nothing_ran(tmp_path):
    bench = _gpu_bench()
    assert not bench.gpu_tests(5, None)["ok"]
    assert not bench.gpu_tests(None, None)["ok"]
    assert not bench.gpu_tests(0, _junit(tmp_path / "a.xml", 7, 7))["ok"]  # every test skipped
    assert not bench.gpu_tests(1, _junit(tmp_path / "b.xml", 7, 0))["ok"]
    assert bench.gpu_tests(0, _junit(tmp_path / "c.xml", 7, 2)) | {"ok": True} == bench.gpu_tests(
        0, _junit(tmp_path / "c.xml", 7, 2)) and bench.gpu_tests(0, str(tmp_path / "c.xml"))["ran"] == 5


def test_gpu_bench_cpu_smoke_writes_every_key_of_the_report(tmp_path):
    """The JSON of the GPU run, produced on the CPU at tiny sizes: every section and figure present."""
    import json

    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_bench.py"), "--cpu-smoke", "--out", str(out),
                          "--tests-rc", "0", "--tests-xml", _junit(tmp_path / "t.xml", 3, 0)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    bench = _gpu_bench()
    assert set(bench.SECTIONS) <= set(report) and report["ok"] and report["cpu_smoke"]
    for section in bench.SECTIONS:
        assert report[section]["ok"], (section, report[section])
    assert {"name", "torch", "cuda", "spec_bf16_tflops", "measured_bf16_matmul_tflops"} <= set(report["device"])
    for amp in ("amp_off", "amp_bf16"):
        figures = report["resnet50_build"][amp]
        assert {"tflops", "fraction_of_peak", "peak_gpu_bytes", "predicted_gpu_bytes", "seconds"} <= set(figures)
        assert figures["tflops"] > 0 and figures["predicted_gpu_bytes"] > 0
    for method in ("gram", "cg"):
        fit = report["fits"][method]
        assert {"seconds", "peak_gpu_bytes", "predicted_gpu_bytes"} <= set(fit) and fit["predicted_gpu_bytes"] > 0
        assert fit["val_correlation_mean"] > 0.5  # a planted linear truth is found
    assert set(bench.CHECKS) <= set(report["checks"])
    assert "skipped" in report["checks"]["two_gpu_uuids"]  # said, not silently passed


# ------------------------------------------------------------------ issue 18 items 4 and 8
def test_the_batched_check_knows_tf32_on_cuda_and_stays_strict_elsewhere(monkeypatch):
    """TF32 rounding moved a ResNet's outputs by 1.26e-2 of their scale (simulated on CPU): within the
    CUDA tolerance when TF32 is on, while float32 without TF32 keeps 1e-4."""
    import torch

    from coar_dask.ablation.engine import _tf32_active, verify_tolerance

    assert verify_tolerance(amp=False, tf32=False) == 1e-4
    assert verify_tolerance(amp=False, tf32=True) > 0.0126 > verify_tolerance(amp=False, tf32=False)
    assert verify_tolerance(amp=True, tf32=False) >= verify_tolerance(amp=False, tf32=True)
    assert verify_tolerance(amp="bf16", tf32=True) > verify_tolerance(amp="fp16", tf32=True) > 0.0126
    assert not _tf32_active(torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert _tf32_active(torch.device("cuda", 0))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not _tf32_active(torch.device("cuda", 0))
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _tf32_active(torch.device("cuda", 0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.mark.parametrize("name, count, expect", [
    ("cuda", 2, "cuda"), ("cuda:1", 2, "cuda:1"), ("cuda:3", 1, "cuda:0"), ("cpu", 0, "cpu"),
])
def test_a_cuda_device_means_this_workers_own_gpu(monkeypatch, name, count, expect):
    import torch

    from coar_dask.core.experiment import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert str(resolve_device(name)) == expect


def test_a_cuda_device_this_process_cannot_see_is_refused_in_one_line(monkeypatch):
    import torch

    from coar_dask.core.experiment import resolve_device
    from coar_dask.errors import ExperimentError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ExperimentError, match=r"sees 2 GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExperimentError, match="sees no CUDA GPU"):
        resolve_device("cuda")


def test_local_gpus_must_be_visible(monkeypatch):
    from coar_dask.errors import ConfigError
    from coar_dask.runtime.clusters import local as cluster

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert cluster._resolve_local_gpus("1,0") == ["1", "0"]
    with pytest.raises(ConfigError, match=r"gpus \['2'\] are not among the GPUs this machine shows"):
        cluster._resolve_local_gpus("0,2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="none"):
        cluster._resolve_local_gpus(["0"])
