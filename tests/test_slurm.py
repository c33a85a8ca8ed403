"""Against a real one-node SLURM cluster (the project's harness, two fake GPUs).

Skipped, with the reason, only when the slurm/munge binaries (or root) are
missing; CI installs them (``.ci/run``). The harness is started once for the
module; each test makes its own SLURMCluster.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dask
import pytest

from coar_dask.runtime.clusters import cluster_client
from coar_dask.testing.slurm import (
    harness_processes,
    local_slurm_cluster,
    slurm_unavailable_reason,
    start_local_slurm,
    stop_local_slurm,
)

_REASON = slurm_unavailable_reason()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(_REASON is not None, reason=f"no local SLURM: {_REASON}"),
]
pytest.importorskip("dask_jobqueue", reason="needs dask-jobqueue (pip install 'coar_dask[slurm]')")


@pytest.fixture(scope="module")
def slurm():
    with local_slurm_cluster() as cluster:
        yield cluster
    assert not harness_processes(cluster.root)


def slurm_kwargs(slurm, **overrides):
    """Settings of small test jobs on the harness (1 core, 2 GB; job logs in the harness folder)."""
    return {
        "cores": 1,
        "memory": "2GB",
        "queue": slurm.partition,
        "walltime": "00:20:00",
        "interface": "lo",
        "dashboard_address": ":0",
        "log_directory": str(slurm.log_dir),
        "respawn_interval": "1s",
        **overrides,
    }


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------- harness


def test_harness_starts_schedules_fake_gpus_and_stops_leaving_nothing(tmp_path):
    root = tmp_path / "slurm"
    h = start_local_slurm(root, gpus=2)
    daemons = [int(f.read_text().split()[0]) for f in h.pid_files.values()]
    try:
        assert h.node_state() == "idle"
        assert "gpu:2" in h.run("sinfo", "-h", "-N", "-o", "%G").stdout
        out = str(tmp_path / "job-%j.out")
        for _ in range(3):
            h.run("sbatch", "--gres=gpu:1", "-o", out, "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES; sleep 300")
        # Two GPUs: two jobs run (one device each), the third waits for Resources.
        wait_until(lambda: len(list(tmp_path.glob("job-*.out"))) == 2
                   and all(p.read_text().strip() for p in tmp_path.glob("job-*.out")), 30, "two GPU jobs to start")
        seen = sorted(p.read_text().strip() for p in tmp_path.glob("job-*.out"))
        assert seen == ["CVD=0", "CVD=1"]
        reasons = h.run("squeue", "-h", "-t", "PD", "-o", "%r").stdout.split()
        assert reasons == ["Resources"]
        too_many = h.run("sbatch", "--gres=gpu:3", "--wrap", "true", check=False)
        assert too_many.returncode != 0
        assert harness_processes(root)  # daemons, step daemons and the sleeping jobs
    finally:
        stop_local_slurm(root)
    assert harness_processes(root) == []
    for pid in daemons:
        assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_local_slurm_cluster_exports_and_restores_slurm_conf(slurm):
    assert os.environ["SLURM_CONF"] == str(slurm.conf_path)
    before = os.environ.get("SLURM_CONF")
    with local_slurm_cluster(gpus=0) as inner:
        assert os.environ["SLURM_CONF"] == str(inner.conf_path) != before
        root = inner.root
    assert os.environ.get("SLURM_CONF") == before
    assert not root.exists() and harness_processes(root) == []


# ------------------------------------------------------------- SLURMCluster


def test_two_gpu_jobs_each_run_gpu_tasks_on_their_own_device(slurm):
    def where(i):
        import os
        import time

        time.sleep(0.2)
        return os.environ["CUDA_VISIBLE_DEVICES"], os.environ["SLURM_JOB_ID"], tuple(sorted(os.sched_getaffinity(0)))

    with cluster_client("slurm", **slurm_kwargs(slurm, jobs=2, gpus_per_job=1)) as client:
        client.wait_for_workers(2, timeout=60)
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
        placed = set(client.gather(client.map(where, range(12), resources={"GPU": 1}, pure=False)))
        assert {device for device, _, _ in placed} == {"0", "1"}
        assert len({job for _, job, _ in placed}) == 2
        # Each 1-core job is bound to its own core (TaskPlugin=task/affinity), as on a production cluster.
        cpus = {job: cpu for _, job, cpu in placed}
        assert all(len(cpu) == 1 for cpu in cpus.values()) and len(set(cpus.values())) == 2, cpus
        assert len(slurm.job_ids()) == 2
    wait_until(lambda: not slurm.job_ids(), 30, "the jobs to leave the queue after close")


def test_adaptive_cluster_scales_up_for_work_and_back_to_zero(slurm):
    def work(i):
        import time

        time.sleep(1.0)
        return i

    with cluster_client("slurm", **slurm_kwargs(slurm, adapt="0:2")) as client:
        assert client.scheduler_info()["workers"] == {}
        futures = client.map(work, range(16), pure=False)
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, 60, "adapt to scale up to 2 workers")
        assert sorted(client.gather(futures)) == list(range(16))
        del futures
        wait_until(lambda: not client.scheduler_info()["workers"] and not slurm.job_ids(), 60,
                   "adapt to scale back to 0 workers and jobs")


def test_a_lost_job_is_resubmitted(slurm):
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        with cluster_client("slurm", **slurm_kwargs(slurm, jobs=2)) as client:
            client.wait_for_workers(2, timeout=60)
            first = set(slurm.job_ids())
            victim = sorted(first)[0]
            slurm.run("scancel", victim)
            wait_until(lambda: victim not in slurm.job_ids() and len(slurm.job_ids()) == 2, 60,
                       "a replacement job")
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2
            assert set(slurm.job_ids()) - first  # a new job id



def test_workers_leave_at_their_lifetime_and_new_jobs_take_over(slurm):
    """What happens before a walltime, shortened: the worker retires itself, its job ends, a new job starts."""
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        with cluster_client("slurm", **slurm_kwargs(slurm, jobs=1, lifetime="4s", lifetime_stagger="off")) as client:
            client.wait_for_workers(1, timeout=60)
            first = slurm.job_ids()
            assert len(first) == 1
            wait_until(lambda: slurm.job_ids() and slurm.job_ids() != first, 60, "the job to end and be replaced")
            client.wait_for_workers(1, timeout=60)
    log = "".join(p.read_text(errors="replace") for p in slurm.log_dir.glob(f"*-{first[0]}.err"))
    assert "worker-lifetime-reached" in log  # the worker left by itself; SLURM did not kill it

# ---------------------------------------------------------------- digits builds

BUILD_ROWS = 200
ROWS_PER_BLOCK = 10


def _digits_store(path, experiment):
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.core.experiment import load_state

    state = load_state(experiment)
    return eval_store_for(path, experiment, BUILD_ROWS, state.n_components, state.n_examples,
                          rows_per_chunk=ROWS_PER_BLOCK)


def _contents(store):
    from coar_dask.core.store import COMPLETED

    return {name: store.array(name)[:] for name in (*store.spec.names, COMPLETED)}


def _assert_same_store(store, reference):
    import numpy as np

    got, want = _contents(store), _contents(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, digits_experiment):
    """The same digits build on a LocalCluster, to compare SLURM builds with."""
    from coar_dask.runtime.build import run_build

    store = _digits_store(tmp_path_factory.mktemp("reference") / "store", digits_experiment)
    with cluster_client("local", n_workers=2) as client:
        run_build(store, digits_experiment, client=client)
    assert store.completed_rows().all()
    return store


def test_digits_build_on_two_gpu_slurm_jobs_equals_a_local_build(slurm, tmp_path, digits_experiment, reference_store):
    from coar_dask.runtime.build import run_build

    store = _digits_store(tmp_path / "store", digits_experiment)
    with cluster_client("slurm", **slurm_kwargs(slurm, jobs=2, gpus_per_job=1)) as client:
        client.wait_for_workers(2, timeout=60)
        assert [w["resources"] for w in client.scheduler_info()["workers"].values()] == [{"GPU": 1}, {"GPU": 1}]
        report = run_build(store, digits_experiment, client=client)
        where = {r for r in client.run(lambda: __import__("os").environ["SLURM_JOB_ID"]).values()}
    assert report.rows_done == BUILD_ROWS and not report.failed
    assert len(where) == 2  # both workers were SLURM jobs
    _assert_same_store(store, reference_store)


def test_build_survives_scancel_of_a_busy_worker(slurm, tmp_path, digits_experiment, reference_store):
    """scancel one worker's job mid-build: its blocks rerun elsewhere, nothing is lost or doubled."""
    from coar_dask.runtime.build import execute_plan, plan_build

    store = _digits_store(tmp_path / "store", digits_experiment)
    killed: list[str] = []
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        with cluster_client("slurm", **slurm_kwargs(slurm, jobs=2)) as client:
            client.wait_for_workers(2, timeout=60)
            cluster = client.cluster

            def kill_a_busy_worker(result, done, total):
                if killed or done < 3:
                    return
                processing = client.processing()
                names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
                busy = [a for a, tasks in processing.items() if tasks]
                assert busy, "no worker is busy: the build is too short to test a kill mid-build"
                job_id = cluster.workers[names[busy[0]]].job_id
                slurm.run("scancel", job_id)
                killed.append(job_id)

            report = execute_plan(plan_build(store, digits_experiment), client, progress=kill_a_busy_worker)
            assert killed and killed[0] not in slurm.job_ids()
    assert report.blocks_done == BUILD_ROWS // ROWS_PER_BLOCK and not report.failed
    assert store.completed_rows().all()
    _assert_same_store(store, reference_store)


def test_scaling_benchmark_runs_on_the_harness(slurm, monkeypatch):
    """benchmarks/slurm_scaling.py, tiny: it reuses the running cluster and reports both rates and the ceiling."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # spawned children import it
    import slurm_scaling as bench

    lines: list[str] = []
    figures = bench.run(rows=24, rows_per_block=6, echo=lines.append)
    assert set(figures) == {"one_worker_models_per_s", "two_workers_models_per_s", "speedup"}
    assert figures["one_worker_models_per_s"] > 0 and figures["two_workers_models_per_s"] > 0
    assert "existing SLURM cluster" in lines[1]  # the module's harness, found through SLURM_CONF
    assert sum("plain process(es)" in line for line in lines) == 2
    assert any(line.startswith("ceiling of this machine") and "efficiency" in line for line in lines)


def test_ctrl_c_of_a_cli_slurm_build_exits_130_and_the_rerun_resumes(slurm, tmp_path, digits_experiment,
                                                                    coar_dask_cli, ctrl_c):
    """Ctrl-C in the terminal of ``coar-dask build --cluster slurm``: importing dask-jobqueue must not
    turn it into a silent ``sys.exit()`` (exit status 0), and the completed blocks are kept."""
    import subprocess

    import numpy as np

    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.core.experiment import load_state
    from coar_dask.core.store import open_store
    from coar_dask.core.verify import verify_store

    state = load_state(digits_experiment)
    rows, per_block = 2000, 20  # about 13 s on one worker job
    store = eval_store_for(tmp_path / "store", digits_experiment, rows, state.n_components, state.n_examples,
                           rows_per_chunk=per_block)
    experiment_yaml = tmp_path / "digits.yaml"
    digits_experiment.to_yaml(experiment_yaml)
    cmd = [*coar_dask_cli, "build", "--store", str(store.path), "--experiment", str(experiment_yaml),
           "--cluster", "slurm", "--jobs", "1", "--cores", "1", "--memory", "2GB", "--queue", slurm.partition,
           "--interface", "lo"]

    def done_blocks():
        return set(np.flatnonzero(open_store(store.path, read_only=True).completed_blocks()).tolist())

    # The terminal's foreground group is the CLI alone: the worker job runs under SLURM.
    proc = ctrl_c(cmd, done_blocks, wait_s=120, what="the first completed block")
    assert proc.returncode == 130, (proc.stdout, proc.stderr)
    assert "interrupted" in proc.stderr.strip().splitlines()[-1], proc.stderr
    done = done_blocks()
    assert 0 < len(done) < rows // per_block, "the interrupt must land mid-build for this test to mean anything"
    assert verify_store(store.path).intact
    wait_until(lambda: not slurm.job_ids(), 60, "the worker job to leave the queue after the interrupt")

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"Built {rows - len(done) * per_block} rows" in rerun.stdout, rerun.stdout
    assert open_store(store.path, read_only=True).completed_rows().all()


def test_tiny_gpt2_lm_margin_builds_fits_and_evaluates_on_slurm(slurm, tmp_path):
    """Issue 12: a Hugging Face model (tiny GPT-2, mapping inputs, lm_margin) on two SLURM jobs, end to end."""
    pytest.importorskip("transformers")
    from coar_dask import Experiment, Spec, evaluate, fit, init_store
    from coar_dask.runtime.build import run_build

    experiment = Experiment(model="coar_dask.zoo.hf:tiny_gpt2", examples="coar_dask.zoo.hf:token_examples",
                            include=[r"c_attn$", r"c_proj$", r"c_fc$"], kinds=["conv1d"], output="lm_margin",
                            alpha=0.025, batch_size=32)
    spec = Spec.for_experiment(2000, n_components=896, n_outputs=32)
    store = init_store(tmp_path / "store", spec, rows_per_chunk=250)
    held_out = init_store(tmp_path / "eval", spec.with_num_models(200), rows_per_chunk=100)
    with cluster_client("slurm", **slurm_kwargs(slurm, jobs=2)) as client:
        client.wait_for_workers(2, timeout=60)
        for s, exp in ((store, experiment), (held_out, experiment.replace(mask_seed=1))):
            report = run_build(s, exp, client=client)
            assert not report.failed and s.completed_rows().all()
    result = evaluate(fit(store), held_out)
    print(f"\ntiny GPT-2 on SLURM, 2,000 rows at alpha 0.025: held-out mean correlation {result.mean:.3f}")
    assert result.mean >= 0.9
