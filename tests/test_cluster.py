"""Cluster settings, batch job scripts (SLURM, PBS, LSF, SGE, HTCondor) and local GPU workers, without SLURM.

The job-script tests are string tests (dask-jobqueue's own first tier): they
need the ``dask-jobqueue`` package but no batch system. Tests against a real
SLURM cluster are in ``test_slurm.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import textwrap

import dask
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coar_dask.cli import cluster as cli_cluster
from coar_dask.runtime import clusters as C
from coar_dask.runtime.clusters import local as L
from coar_dask.errors import ConfigError, MissingDependencyError

def _has_jobqueue() -> bool:
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return False
    return True


needs_jobqueue = pytest.mark.skipif(not _has_jobqueue(), reason="needs dask-jobqueue (pip install 'coar_dask[slurm]')")
#: SLURM, the tested path (the settings tests below were written for it).
resolve = functools.partial(C.resolve_jobqueue_settings, "slurm")
slurm_script = functools.partial(C.job_script, kind="slurm")


@pytest.fixture(autouse=True)
def _clean_jobqueue_config():
    """No site jobqueue.yaml leaks into these tests; each sees the packaged defaults only."""
    if _has_jobqueue():
        C.import_jobqueue()  # its defaults in dask's config
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None,
                          "jobqueue.slurm.queue": None, "jobqueue.slurm.account": None}):
        yield


# ------------------------------------------------------------------ walltimes


@pytest.mark.parametrize(
    "text, seconds",
    [("30", 1800), ("05:30", 330), ("01:00:00", 3600), ("2-00", 172800), ("1-02:03", 93780),
     ("1-00:00:01", 86401), (90, 5400)],
)
def test_parse_walltime_reads_every_slurm_format(text, seconds):
    assert C.parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "00:00:00", "1:2:3:4", "-5", "a-01:00"])
def test_parse_walltime_rejects_non_slurm_times_with_an_example(text):
    with pytest.raises(ConfigError, match="HH:MM:SS"):
        C.parse_walltime(text)


@given(st.integers(min_value=60, max_value=30 * 86400))
def test_workers_leave_before_the_walltime(walltime):
    lifetime, stagger = C.worker_lifetime(walltime)
    assert 0 < stagger < lifetime
    # The last worker leaves at lifetime + stagger: still before SLURM kills it.
    assert lifetime + stagger < walltime
    assert walltime - (lifetime + stagger) >= min(60, walltime / 8)


def test_worker_lifetime_of_one_hour_is_54_minutes_give_or_take_3():
    assert C.worker_lifetime(3600) == (54 * 60, 3 * 60)


@pytest.mark.parametrize("value, pair", [("0:8", (0, 8)), ("2:2", (2, 2)), ((1, 4), (1, 4)), (None, None)])
def test_parse_adapt(value, pair):
    assert C.parse_adapt(value) == pair


@pytest.mark.parametrize("value", ["8", "4:2", "0:0", "-1:3", "a:b", (1, 2, 3)])
def test_parse_adapt_rejects_bad_ranges(value):
    with pytest.raises(ConfigError, match="MIN:MAX"):
        C.parse_adapt(value)


# ------------------------------------------------------------ settings resolution


def test_cores_and_memory_are_required_and_the_error_says_where_to_put_them():
    with pytest.raises(ConfigError) as err:
        resolve(jobs=2)
    message = str(err.value)
    assert "cores=4, memory='16GB'" in message
    assert "coar-dask config slurm --example" in message and "jobqueue.slurm.cores" in message


def test_arguments_beat_the_config_file_which_beats_dask_config(tmp_path):
    f = tmp_path / "slurm.yaml"
    f.write_text("cores: 4\nmemory: 16GB\nqueue: from-file\nwalltime: '02:00:00'\n")
    with dask.config.set({"jobqueue.slurm.queue": "from-dask", "jobqueue.slurm.account": "acct-dask",
                          "jobqueue.slurm.cores": 64}):
        s = resolve(f, queue="from-arg")
        assert s.get("queue") == "from-arg"  # argument
        assert s.get("cores") == 4 and s.get("walltime") == "02:00:00"  # file
        assert s.get("account") == "acct-dask"  # dask config, which dask-jobqueue reads itself:
        assert "account" not in s.cluster_kwargs() and "#SBATCH -A acct-dask" in C.job_script(s).splitlines()


@needs_jobqueue
def test_a_sites_jobqueue_yaml_works_as_dask_config():
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "32GB",
                          "jobqueue.slurm.queue": "gpu", "jobqueue.slurm.job-extra-directives": ["--qos=high"]}):
        s = resolve(gpus_per_job=1)
        kw = s.cluster_kwargs()
        lines = C.job_script(s).splitlines()
    assert not {"cores", "memory", "queue"} & set(kw)  # left to dask-jobqueue, which reads jobqueue.slurm.*
    assert kw["job_extra_directives"] == ["--qos=high", "--gres=gpu:1"]  # the site's, and the GPU's added
    for directive in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "#SBATCH --qos=high",
                      "#SBATCH --gres=gpu:1"):
        assert directive in lines


def test_a_jobqueue_yaml_file_can_be_given_as_the_config_file(tmp_path):
    f = tmp_path / "jobqueue.yaml"
    f.write_text(textwrap.dedent("""\
        jobqueue:
          slurm:
            cores: 2
            memory: 8GB
            shebang: '#!/bin/bash'
            job-mem: 10GB
    """))
    s = resolve(f)
    assert (s.options["shebang"], s.options["job_mem"]) == ("#!/bin/bash", "10GB")
    assert s.cluster_kwargs()["shebang"] == "#!/bin/bash"


def test_the_packaged_slurm_example_is_valid():
    from coar_dask.config import SLURM_EXAMPLE_FILE

    s = resolve(SLURM_EXAMPLE_FILE)
    assert s.get("cores") >= 1 and s.gpus_per_job >= 0


def test_the_printed_slurm_example_is_the_packaged_file_and_loads(tmp_path, capsys):
    from coar_dask.cli.main import main
    from coar_dask.config import SLURM_EXAMPLE_FILE

    assert main(["config", "slurm", "--example"]) == 0
    text = capsys.readouterr().out
    assert text == SLURM_EXAMPLE_FILE.read_text() and "# " in text
    f = tmp_path / "slurm.yaml"
    f.write_text(text)
    assert resolve(f) == resolve(SLURM_EXAMPLE_FILE)
    assert main(["config", "slurm"]) == 2
    assert "--example" in capsys.readouterr().err


def test_a_missing_slurm_config_file_names_the_shipped_example(tmp_path):
    with pytest.raises(ConfigError, match="coar-dask config slurm --example"):
        C.load_jobqueue_config(tmp_path / "nowhere.yaml")


def test_unknown_setting_names_the_key_and_lists_valid_ones(tmp_path):
    f = tmp_path / "slurm.yaml"
    f.write_text("slurm:\n  cores: 2\n  memory: 8GB\n  gpu: 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'gpu'.*gpus-per-job"):
        resolve(f)


def test_deprecated_jobqueue_keys_point_to_their_new_name():
    with pytest.raises(ConfigError, match="use 'job-script-prologue'"):
        resolve(cores=1, memory="1GB", env_extra=["module load cuda"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "nope.yaml", cores=1, memory="1GB")


def test_jobs_and_adapt_come_from_one_source():
    with dask.config.set({"coar-dask.slurm.adapt": "0:4"}):
        assert resolve(cores=1, memory="1GB", jobs=3).adapt is None
        assert resolve(cores=1, memory="1GB").adapt == (0, 4)
    s = resolve(cores=1, memory="1GB")
    assert (s.jobs, s.adapt) == (1, None)
    with pytest.raises(ConfigError, match="either jobs"):
        resolve(cores=1, memory="1GB", jobs=2, adapt="0:2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cores": 0}, "cores must be a positive integer"),
        ({"memory": "lots"}, "memory must be an amount"),
        ({"gpus_per_job": 2, "processes": 2, "cores": 2}, "needs processes=1"),
        ({"processes": 3, "cores": 4}, "multiple of processes"),
        ({"jobs": -1}, "jobs must be an integer"),
        ({"walltime": "2h"}, "not a SLURM time"),
        ({"lifetime": "soon"}, "lifetime must be"),
        ({"walltime": "00:10:00", "lifetime": "20m"}, "not shorter than the walltime"),
    ],
)
def test_bad_settings_name_the_field_and_the_fix(kwargs, match):
    settings = {"cores": 1, "memory": "2GB", **kwargs}
    with pytest.raises(ConfigError, match=match):
        resolve(**settings).cluster_kwargs()


def test_settings_are_frozen_and_round_trip_through_to_dict():
    s = resolve(cores=2, memory="8GB", adapt="0:3", gpus_per_job=1, walltime="01:00:00")
    with pytest.raises(dataclasses_frozen_error()):
        s.cores = 3  # type: ignore[misc]
    again = C.JobqueueSettings.from_dict(s.to_dict(), kind="slurm")
    assert again == s


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_packaged_defaults_are_in_dask_config():
    assert dask.config.get("coar-dask.jobqueue.lifetime") == "auto"
    assert dask.config.get("coar-dask.cluster.kind") == "local"
    assert dask.config.get("coar-dask.jobqueue.gpus-per-job") == 0


def test_a_kinds_own_section_overrides_the_common_one():
    with dask.config.set({"coar-dask.jobqueue.jobs": 3, "coar-dask.pbs.jobs": 5}):
        assert resolve(cores=1, memory="1GB").jobs == 3
        assert C.resolve_jobqueue_settings("pbs", cores=1, memory="1GB").jobs == 5


# ------------------------------------------------------------------ job scripts


@needs_jobqueue
def test_job_script_of_a_gpu_job():
    script = slurm_script(cores=2, memory="8GB", gpus_per_job=1, queue="gpu", account="proj42",
                                walltime="01:00:00", python="/opt/env/bin/python")
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in ("#SBATCH -p gpu", "#SBATCH -A proj42", "#SBATCH -n 1", "#SBATCH --cpus-per-task=2",
                      "#SBATCH --mem=8G", "#SBATCH -t 01:00:00", "#SBATCH --gres=gpu:1"):
        assert directive in lines
    worker = lines[-1]
    assert worker.startswith("/opt/env/bin/python -m distributed.cli.dask_worker tcp://<scheduler-address>:8786")
    assert "--nthreads 2" in worker and "--resources GPU=1" in worker
    # One hour: leave after 54 min +- 3 min, and do not restart inside the job.
    assert "--lifetime 3240s --lifetime-stagger 180s" in worker
    assert "--lifetime-restart" not in worker
    assert "export OMP_NUM_THREADS=1" in lines


@needs_jobqueue
def test_job_script_of_a_cpu_job_has_no_gres_and_no_gpu_resource():
    script = slurm_script(cores=4, memory="16GB", walltime="00:30:00")
    assert "--gres" not in script and "GPU=" not in script
    assert "--nthreads 4" in script


@needs_jobqueue
def test_job_script_extra_directives_prologue_and_existing_resources():
    script = slurm_script(
        cores=1, memory="2GB", gpus_per_job=1, lifetime="off",
        job_extra_directives=["--constraint=a100", "--qos=long"],
        job_script_prologue=["module load cuda/12", "export OMP_NUM_THREADS=4"],
        worker_extra_args=["--resources", "MEM=1"],
    )
    lines = script.splitlines()
    assert lines.index("#SBATCH --constraint=a100") < lines.index("#SBATCH --gres=gpu:1")
    assert "module load cuda/12" in lines and "export OMP_NUM_THREADS=4" in lines
    assert "export OMP_NUM_THREADS=1" not in lines  # the user's own setting is kept...
    assert "export MKL_NUM_THREADS=1" in lines  # ...and the rest of the workers' environment added
    assert "--resources MEM=1,GPU=1" in lines[-1]
    assert "--lifetime" not in script


@needs_jobqueue
def test_job_script_does_not_duplicate_a_gres_directive_the_user_gave():
    script = slurm_script(cores=1, memory="2GB", gpus_per_job=1, job_extra_directives=["--gres=gpu:a100:1"])
    assert script.count("--gres") == 1 and "--resources GPU=1" in script


@needs_jobqueue
def test_job_script_with_explicit_lifetime_and_restart():
    script = slurm_script(cores=1, memory="2GB", walltime="02:00:00", lifetime="100m",
                                lifetime_stagger="5m", lifetime_restart=True)
    assert "--lifetime 6000s --lifetime-stagger 300s --lifetime-restart" in script


def test_missing_dask_jobqueue_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    monkeypatch.setitem(sys.modules, "dask_jobqueue.slurm", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'coar_dask\[slurm\]'"):
        slurm_script(cores=1, memory="1GB")
    with pytest.raises(MissingDependencyError, match="dask-jobqueue"):
        with C.cluster_client("slurm", cores=1, memory="1GB"):
            pass


@needs_jobqueue
def test_slurm_kind_without_slurm_commands_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="SLURM login node"):
        with C.cluster_client("slurm", cores=1, memory="1GB"):
            pass


# -------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli_cluster.add_cluster_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_become_cluster_client_arguments():
    args = _parse(["--cluster", "slurm", "--adapt", "0:8", "--queue", "gpu", "--cores", "4", "--memory", "16GB",
                   "--gpus-per-job", "1", "--job-extra=--constraint=a100", "--walltime", "04:00:00"])
    assert cli_cluster.cluster_from_args(args) == {
        "kind": "slurm", "adapt": "0:8", "queue": "gpu", "cores": 4, "memory": "16GB", "gpus_per_job": 1,
        "job_extra_directives": ["--constraint=a100"], "walltime": "04:00:00",
    }
    assert cli_cluster.cluster_from_args(_parse([])) == {"kind": "local"}
    assert cli_cluster.cluster_from_args(_parse(["--gpus", "2", "--workers", "3"])) == {"kind": "local", "n_workers": 3, "gpus": 2}
    assert cli_cluster.cluster_from_args(_parse(["--gpus", "0,1"]))["gpus"] == "0,1"
    assert cli_cluster.cluster_from_args(_parse(["--cluster", "none"])) == {"kind": "none"}
    assert cli_cluster.cluster_from_args(_parse(["--cluster", "address", "--address", "tcp://h:8786"])) == {
        "kind": "address", "address": "tcp://h:8786"}


def test_cli_jobs_and_adapt_exclude_each_other():
    with pytest.raises(SystemExit):
        _parse(["--jobs", "2", "--adapt", "0:2"])


@needs_jobqueue
def test_cluster_dry_run_prints_the_job_script(tmp_path):
    import io

    f = tmp_path / "slurm.yaml"
    f.write_text("cores: 2\nmemory: 4GB\nqueue: gpu\ngpus-per-job: 1\n")
    out = io.StringIO()
    assert cli_cluster.cluster_dry_run_main(_parse(["--slurm-config", str(f), "--jobs", "4", "--walltime", "01:00:00"]), out) == 0
    text = out.getvalue()
    assert text.startswith("# SLURM cluster: 4 job(s)")
    assert "#SBATCH -p gpu" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH -t 01:00:00" in text


# ------------------------------------------------------------------- local GPUs


def test_local_gpu_worker_specs_give_each_worker_its_own_device():
    specs = C.local_gpu_worker_specs(["0", "1", "GPU-abc"], threads_per_worker=2)
    assert list(specs) == ["gpu-0", "gpu-1", "gpu-GPU-abc"]
    for device, spec in zip(["0", "1", "GPU-abc"], specs.values()):
        options = spec["options"]
        assert options["env"]["CUDA_VISIBLE_DEVICES"] == device and spec["cls"] == L.GPU_NANNY
        assert options["env"]["OMP_NUM_THREADS"] == "1"
        assert options["resources"] == {"GPU": 1}
        assert options["nthreads"] == 2


def test_local_gpu_workers_share_the_memory_by_gpus_not_by_cores():
    """Issue 18.7: distributed's 'auto' gives a one-thread worker RAM / cores; a GPU worker gets RAM / GPUs."""
    from distributed.system import MEMORY_LIMIT

    for devices in (["0"], ["0", "1"], ["0", "1", "2", "3"]):
        specs = C.local_gpu_worker_specs(devices)
        assert {s["options"]["memory_limit"] for s in specs.values()} == {MEMORY_LIMIT // len(devices)}
    assert C.local_gpu_worker_specs(["0"], memory_limit="4GB")["gpu-0"]["options"]["memory_limit"] == "4GB"


@needs_jobqueue
def test_more_than_one_gpu_per_slurm_job_is_refused_naming_more_jobs():
    """Issue 18.5: a job's one worker advertised GPU=N and ran its N tasks on cuda:0."""
    with pytest.raises(ConfigError, match=r"--jobs N --gpus-per-job 1") as err:
        resolve(cores=4, memory="16GB", gpus_per_job=2)
    assert "\n" not in str(err.value)
    script = slurm_script(cores=4, memory="16GB", gpus_per_job=1, jobs=4)
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script


@pytest.mark.parametrize("devices", [[], ["0", "0"]])
def test_local_gpu_worker_specs_reject_no_or_repeated_devices(devices):
    with pytest.raises(ConfigError):
        C.local_gpu_worker_specs(devices)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert C.visible_gpus() == ["2", "3"]
    assert L._resolve_local_gpus("auto") == ["2", "3"]
    assert L._resolve_local_gpus(1) == ["2"]
    assert L._resolve_local_gpus(0) == []
    assert L._resolve_local_gpus("3,2") == ["3", "2"]
    with pytest.raises(ConfigError, match=r"gpus \['5', '7'\] are not among"):  # was accepted: issue 18 item 8
        L._resolve_local_gpus("5,7")
    with pytest.raises(ConfigError, match="only 2 GPU"):
        L._resolve_local_gpus(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert C.visible_gpus() == []


def test_local_cluster_with_gpus_runs_gpu_tasks_one_per_device(monkeypatch):
    """The real local GPU layout, with fake device ids (no CUDA is touched)."""

    def device_of_worker():
        import os

        return os.environ["CUDA_VISIBLE_DEVICES"]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the machine's (fake) GPUs
    with C.cluster_client("local", gpus=["0", "1"]) as client:
        info = client.scheduler_info()["workers"].values()
        assert sorted(w["name"] for w in info) == ["gpu-0", "gpu-1"]
        assert all(w["resources"] == {"GPU": 1} for w in info)
        seen = client.gather([client.submit(device_of_worker, pure=False, resources={"GPU": 1},
                                            workers=[name]) for name in ("gpu-0", "gpu-1")])
    assert seen == ["0", "1"]


def test_local_workers_ignore_ctrl_c_and_keep_configured_preloads():
    """Ctrl-C reaches the whole process group; the CLI handles it and closes the workers."""
    import signal

    with dask.config.set({"distributed.worker.preload": ["json"]}):
        assert C.local_worker_preload() == ["json", "coar_dask.runtime.worker"]
    assert C.local_worker_preload() == ["coar_dask.runtime.worker"]
    with C.cluster_client("local", n_workers=1, gpus=0) as client:
        # signal.getsignal itself runs there (a function of this module would import it, and with it
        # dask-jobqueue, which installs its own SIGINT handler on import).
        assert list(client.run(signal.getsignal, signal.SIGINT).values()) == [signal.SIG_IGN]


@needs_jobqueue
def test_importing_dask_jobqueue_keeps_the_ctrl_c_handler():
    """dask-jobqueue's import sets SIGINT to sys.exit(): Ctrl-C of a SLURM build would exit 0, silently."""
    code = textwrap.dedent("""
        import signal
        from coar_dask.runtime.clusters import import_jobqueue
        import_jobqueue()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
    """)
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "KeyboardInterrupt", done.stderr


def test_local_only_arguments_are_refused_for_slurm_with_the_slurm_names():
    with pytest.raises(ConfigError, match="jobs=N"):
        with C.cluster_client("slurm", n_workers=4, cores=1, memory="1GB"):
            pass


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ConfigError, match="local"):
        with C.cluster_client("kubernetes"):
            pass


# ------------------------------------------------ the workers' profiler interval


def _profile_interval():
    import dask

    return dask.config.get("distributed.worker.profile.interval")


@pytest.mark.slow
def test_local_workers_sample_their_tasks_every_100ms_and_the_client_keeps_its_config():
    """Dask's 10ms profiler cost a build 3-5% (BENCHMARKS.md); coar_dask's clusters sample every 100ms."""
    before = dask.config.get("distributed.worker.profile.interval")
    with C.cluster_client("local", n_workers=1) as client:
        assert set(client.run(_profile_interval).values()) == {"100ms"}
    assert dask.config.get("distributed.worker.profile.interval") == before
    with dask.config.set({"coar-dask.worker-profile-interval": None}), \
            C.cluster_client("local", n_workers=1) as client:  # null: dask's own setting
        assert set(client.run(_profile_interval).values()) == {before}


@needs_jobqueue
def test_slurm_workers_get_the_profile_interval_unless_the_prologue_sets_it():
    script = slurm_script(cores=1, memory="2GB", walltime="00:30:00")
    assert "export DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=100ms" in script.splitlines()
    with dask.config.set({"coar-dask.worker-profile-interval": "250ms"}):
        assert "export DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=250ms" in slurm_script(
            cores=1, memory="2GB", walltime="00:30:00").splitlines()
    own = slurm_script(cores=1, memory="2GB", walltime="00:30:00",
                             job_script_prologue=["export DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=10ms"])
    assert own.count("DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL") == 1


@pytest.mark.parametrize("bad", ["-1s", "0", "soon", [1]])
def test_a_bad_profile_interval_is_one_config_error(bad):
    from coar_dask.config import worker_dask_config

    with pytest.raises(ConfigError, match="worker-profile-interval must be a positive duration"):
        worker_dask_config(bad)


# ------------------------------------------------ PBS, LSF, SGE, HTCondor: the same path as SLURM

#: kind -> (settings of a 1-hour GPU job, lines its script must hold). Each kind writes its walltime
#: its own way (LSF: HH:MM); workers leave 54 min +- 3 min after they start, as on SLURM.
KIND_SCRIPTS = {
    "pbs": ({"walltime": "01:00:00", "queue": "gpuq", "account": "proj42"},
            ["#PBS -q gpuq", "#PBS -A proj42", "#PBS -l select=1:ncpus=2:mem=7630MB", "#PBS -l walltime=01:00:00",
             "#PBS -l ngpus=1"]),
    "lsf": ({"walltime": "01:00", "queue": "gpuq", "account": "proj42"},
            ["#BSUB -q gpuq", '#BSUB -P "proj42"', "#BSUB -n 2", "#BSUB -W 01:00", '#BSUB -gpu "num=1"']),
    "sge": ({"walltime": "01:00:00", "queue": "gpuq", "account": "proj42"},
            ["#$ -q gpuq", "#$ -P proj42", "#$ -l h_rt=01:00:00", "#$ -l gpu=1"]),
    "htcondor": ({"disk": "10GB", "lifetime": "54m", "lifetime_stagger": "3m"},
                 ["request_gpus = 1", "MY.DaskWorkerCores = 2", "MY.DaskWorkerDisk = 10000000000"]),
}


@needs_jobqueue
@pytest.mark.parametrize("kind", sorted(KIND_SCRIPTS))
def test_job_script_of_a_gpu_job_on_every_batch_system(kind):
    settings, expected = KIND_SCRIPTS[kind]
    script = C.job_script(kind=kind, cores=2, memory="8GB", gpus_per_job=1, python="/opt/env/bin/python",
                          **settings)
    lines = script.splitlines()
    for line in expected:
        assert line in lines, (line, script)
    assert "/opt/env/bin/python -m distributed.cli.dask_worker tcp://<scheduler-address>:8786" in script
    assert "--resources GPU=1" in script and "--lifetime 3240s --lifetime-stagger 180s" in script
    assert "export OMP_NUM_THREADS=1" in script and "DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL=100ms" in script


@needs_jobqueue
@pytest.mark.parametrize("kind, own", [("pbs", "-l select=1:ncpus=2:ngpus=1"), ("lsf", '-gpu "num=1:mode=exclusive_process"'),
                                       ("sge", "-l gpu_card=1"), ("slurm", "--gpus=1")])
def test_a_gpu_directive_the_user_gave_is_not_doubled(kind, own):
    script = C.job_script(kind=kind, cores=2, memory="8GB", gpus_per_job=1, job_extra_directives=[own])
    assert own in script and sum("gpu" in line for line in script.splitlines() if line.startswith("#")) == 1


@needs_jobqueue
def test_cpu_jobs_of_other_kinds_ask_for_no_gpu():
    for kind in ("pbs", "lsf", "sge"):
        script = C.job_script(kind=kind, cores=4, memory="16GB")
        assert "gpu" not in script.lower() and "--nthreads 4" in script


@needs_jobqueue
def test_each_kind_reads_its_own_walltime_format():
    assert C.resolve_jobqueue_settings("lsf", cores=1, memory="1GB", walltime="02:00").lifetime_args()[:2] == \
        ["--lifetime", f"{C.worker_lifetime(7200)[0]}s"]
    assert C.resolve_jobqueue_settings("pbs", cores=1, memory="1GB", walltime="7200").lifetime_args()[:2] == \
        ["--lifetime", f"{C.worker_lifetime(7200)[0]}s"]
    with pytest.raises(ConfigError, match="not an LSF time"):
        C.resolve_jobqueue_settings("lsf", cores=1, memory="1GB", walltime="01:00:00")
    with pytest.raises(ConfigError, match=r"unknown setting 'walltime'.*disk"):  # HTCondor has none
        C.resolve_jobqueue_settings("htcondor", cores=1, memory="1GB", disk="1GB", walltime="01:00:00")
    with pytest.raises(ConfigError, match="need disk per job"):
        C.resolve_jobqueue_settings("htcondor", cores=1, memory="1GB")


@needs_jobqueue
def test_a_kinds_own_jobqueue_keys_pass_through_from_the_file_and_dask_config(tmp_path):
    f = tmp_path / "pbs.yaml"
    f.write_text("jobqueue:\n  pbs:\n    cores: 2\n    memory: 8GB\n    resource-spec: select=1:ncpus=2:mem=8GB:model=a100\n")
    assert "#PBS -l select=1:ncpus=2:mem=8GB:model=a100" in C.job_script(kind="pbs", config_file=f)
    with pytest.raises(ConfigError, match="unknown setting 'resource_spec'"):  # not a SLURM key
        C.resolve_jobqueue_settings("slurm", cores=1, memory="1GB", resource_spec="x")
    with dask.config.set({"jobqueue.lsf.lsf-units": "GB", "jobqueue.lsf.cores": 2, "jobqueue.lsf.memory": "8GB"}):
        assert "#BSUB -M 8" in C.job_script(kind="lsf").splitlines()


@needs_jobqueue
@pytest.mark.filterwarnings("ignore:OAR Job memory")
def test_a_batch_system_is_one_registry_entry():
    """OAR, which dask-jobqueue also drives, takes one entry: the CLI, job scripts and cluster_client know it."""
    oar = C.JobqueueKind("oar", "OAR", "OARCluster", "-l gpu={n}", ("gpu",), None, account_key="project")
    C.register_jobqueue_kind(oar)
    try:
        assert "oar" in C.cluster_kinds()
        script = C.job_script(kind="oar", cores=1, memory="2GB", gpus_per_job=1)
        assert "#OAR -l gpu=1" in script.splitlines() and "--resources GPU=1" in script
    finally:
        del C.JOBQUEUE_KINDS["oar"]
    with pytest.raises(ConfigError, match="unknown cluster kind 'oar'"):
        with C.cluster_client("oar", cores=1, memory="2GB"):
            pass


@needs_jobqueue
@pytest.mark.parametrize("kind, header", [("pbs", "#PBS"), ("lsf", "#BSUB"), ("sge", "#$"), ("slurm", "#SBATCH")])
def test_the_cli_dry_run_prints_each_kinds_job_script(kind, header, coar_dask_cli):
    """``coar-dask cluster --cluster pbs --dry-run``, run as a user runs it."""
    done = subprocess.run([*coar_dask_cli, "cluster", "--cluster", kind, "--dry-run", "--cores", "2", "--memory", "8GB",
                           "--gpus-per-job", "1", "--jobs", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"# {C.JOBQUEUE_KINDS[kind].label} cluster: 3 job(s)")
    assert sum(line.startswith(header + " ") for line in lines) >= 2 and "--resources GPU=1" in lines[-1]


def test_the_cli_dry_run_of_a_kind_without_a_job_script_says_which_have_one(capsys):
    from coar_dask.cli.main import main

    assert main(["cluster", "--cluster", "local", "--dry-run"]) == 2
    assert "--cluster slurm | pbs | lsf | sge | htcondor" in capsys.readouterr().err


# ------------------------------------- local GPU workers: their device before the user's code runs

GPU_SCRIPT = '''\
import json
import os
import sys

SEEN_AT_IMPORT = os.environ.get("CUDA_VISIBLE_DEVICES")  # a model module touching CUDA here pins a GPU


def seen(dask_worker):
    return dask_worker.name, sys.modules["__mp_main__"].SEEN_AT_IMPORT


if __name__ == "__main__":
    from coar_dask import cluster_client

    with cluster_client("local", gpus=["0", "1"]) as client:
        first = sorted(client.run(seen).values())
        client.restart()  # new worker processes, started by the same nannies
        print(json.dumps([first, sorted(client.run(seen).values())]))
    print(os.environ["CUDA_VISIBLE_DEVICES"])
'''


def test_each_gpu_worker_has_its_device_when_it_imports_the_users_main(tmp_path):
    """Issue 23.4: the nanny set CUDA_VISIBLE_DEVICES after the worker re-imported ``__main__``: every
    worker saw the parent's '0,1' there (CUDA at import -> all on GPU 0). Fake devices; run as a user does."""
    script = tmp_path / "train.py"
    script.write_text(GPU_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    workers, parent = done.stdout.strip().splitlines()
    first, restarted = json.loads(workers)
    assert first == restarted == [["gpu-0", "0"], ["gpu-1", "1"]]
    assert parent == "0,1"  # the client's own environment is as it was
