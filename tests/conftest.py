"""Shared fixtures: a tiny model and experiment, small digits stores.

The digits model is trained once per cache directory (~7 s) and cached in
``$COAR_DASK_CACHE`` (default ``~/.cache/coar_dask``); worker processes of the
clusters started in tests inherit the variable and load the same file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _restore_ctrl_c() -> None:
    """Undo dask-jobqueue's SIGINT handler: importing ``dask_jobqueue.runner`` installs
    ``lambda *_: sys.exit()``, which turns each Ctrl-C into a SystemExit that fails the running test
    and lets the session go on. With Python's own handler back, Ctrl-C stops pytest."""
    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__module__", None) == "dask_jobqueue.runner" and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_finish(session):
    _restore_ctrl_c()  # test modules that import dask_jobqueue have been imported


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _restore_ctrl_c()
    yield
    _restore_ctrl_c()  # a test that imported dask_jobqueue itself


def tiny_model():
    """A small CNN with conv, BN and linear layers (random, seeded)."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.ReLU(),
        nn.Linear(8, 5),
    ).eval()


def tiny_examples(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tests use tiny models: extra OpenMP threads only spin against each other
    # (and against the cluster workers the tests start) on a small machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def tiny_experiment():
    from coar_dask.core.experiment import Experiment

    return Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=5)


@pytest.fixture(scope="session")
def digits_experiment():
    from coar_dask.zoo import digits

    digits.load_model()  # train once, before any worker needs it
    return digits.experiment()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def _tests_on_path():
    # Workers import `conftest:tiny_model`; make the tests folder importable there too.
    here = os.path.dirname(__file__)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = here + (os.pathsep + old if old else "")
    yield


@pytest.fixture(scope="session")
def coar_dask_cli() -> list[str]:
    """The command of the installed ``coar-dask`` CLI (its console script, else ``python -m``)."""
    script = Path(sys.executable).parent / "coar-dask"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "coar_dask.cli"]


@pytest.fixture
def ctrl_c():
    """``ctrl_c(cmd, when, ...)``: run ``cmd`` in its own session, wait until ``when()`` is true, then
    send SIGINT to its whole process group, as a terminal's Ctrl-C does; return the finished process
    (``returncode``, ``stdout``, ``stderr``)."""

    def interrupt(cmd: list[str], when, *, env: dict[str, str] | None = None, wait_s: float = 240,
                  what: str = "the moment to interrupt") -> subprocess.CompletedProcess:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + wait_s
            while not when():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"{what} did not come within {wait_s:.0f} s while {cmd} ran")
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return interrupt


def deepcopy_reference(state, masks):
    """Outputs of deepcopy-and-zero per mask (the seed's semantics), on the experiment's batches, the
    output function called as a user's would be: the reference every faster path is compared with."""
    import torch

    from coar_dask.ablation.zeroing import reference_model

    rows, bs = [], state.experiment.batch_size
    with torch.inference_mode():
        for mask in masks:
            model = reference_model(state.model, state.components, mask)
            parts = []
            for s in range(0, state.n_examples, bs):
                batch = state.batch(s, min(s + bs, state.n_examples))
                out = model(**batch.inputs) if isinstance(batch.inputs, dict) else model(batch.inputs)
                parts.append(state.output_fn(out, batch).float().numpy())
            rows.append(np.concatenate(parts))
    return np.stack(rows)
