"""The worker set-up (coar_dask.runtime.worker): malloc settings, SIGINT, quiet close."""

from __future__ import annotations

import logging
import signal
import sys

import pytest

from coar_dask.runtime import worker


@pytest.fixture
def malloc_env(monkeypatch):
    """A process whose malloc settings were never applied, with no ``MALLOC_*`` variable set.

    A LocalCluster started by an earlier test leaves its nanny's variables
    (dask's ``MALLOC_TRIM_THRESHOLD_=65536``, ``WORKER_ENV``'s) in
    ``os.environ``; they are cleared so that only the test's own count.
    """
    monkeypatch.setattr(worker, "_MALLOC_APPLIED", None)
    for name in worker._MALLOPT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", str(128 * 1024))  # glibc's own default: harmless
    monkeypatch.setenv("MALLOC_ARENA_MAX", "not-a-number")
    return monkeypatch


def test_malloc_env_is_applied_at_run_time(malloc_env):
    assert worker.apply_malloc_env() == {}  # not a Dask worker: leftovers of a nanny are not applied
    applied = worker.apply_malloc_env(only_in_dask_worker=False)
    if sys.platform.startswith("linux"):
        assert applied == {"MALLOC_TOP_PAD_": 128 * 1024}
    assert worker.apply_malloc_env(only_in_dask_worker=False) is applied  # once per process


def test_dask_setup_applies_malloc_env_and_ignores_sigint(malloc_env):
    """The preload runs outside any task (no get_worker()), yet applies the worker's settings."""
    handlers = []
    malloc_env.setattr(signal, "signal", lambda sig, handler: handlers.append((sig, handler)))
    try:
        worker.dask_setup(object())
    finally:
        for name in ("distributed.worker.state_machine", "distributed.worker"):
            log = logging.getLogger(name)
            for f in [f for f in log.filters if isinstance(f, worker._QuietClose)]:
                log.removeFilter(f)
    assert handlers == [(signal.SIGINT, signal.SIG_IGN)]
    if sys.platform.startswith("linux"):
        assert worker._MALLOC_APPLIED == {"MALLOC_TOP_PAD_": 128 * 1024}
    else:
        assert worker._MALLOC_APPLIED == {}


def test_local_workers_apply_worker_env_malloc_settings_at_start():
    """End to end: the nanny sets ``env`` before the preload runs, so a fresh worker has applied it."""
    distributed = pytest.importorskip("distributed")
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    from coar_dask.runtime.clusters import WORKER_ENV, local_worker_preload

    expected = {k: int(v) for k, v in WORKER_ENV.items() if k in worker._MALLOPT}
    assert expected, "WORKER_ENV sets no MALLOC_* variable: nothing to check"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env=dict(WORKER_ENV), preload=local_worker_preload()) as cluster, \
            distributed.Client(cluster) as client:
        # client.run runs outside any task, and before any build task: only the preload can have applied it
        (applied,) = client.run(lambda: worker._MALLOC_APPLIED).values()
    assert applied == expected


def _cached_states() -> tuple[int, int, int]:
    """On a worker: cached experiment states, engine runners, and distinct models among the states."""
    from coar_dask.ablation import engine
    from coar_dask.core import experiment

    states = list(experiment._STATE_CACHE.values())
    return len(states), len(engine._RUNNERS), len({id(s.model) for s in states})


def test_train_and_eval_stores_share_one_state_per_worker(tmp_path, tiny_experiment):
    """Issue 23 item 1: the mask seed does not change the model or examples, so a worker that builds a
    train store and an evaluation store of one experiment keeps one model, one example set, one runner."""
    from coar_dask.core.experiment import load_state
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.runtime.build import run_build
    from coar_dask.runtime.clusters import cluster_client

    state = load_state(tiny_experiment)
    heldout = tiny_experiment.replace(mask_seed=tiny_experiment.mask_seed + 1)
    with cluster_client("local", n_workers=1) as client:
        for name, exp in (("train", tiny_experiment), ("eval", heldout)):
            store = eval_store_for(tmp_path / name, exp, 8, state.n_components, state.n_examples, rows_per_chunk=4)
            run_build(store, exp, client=client)
        (counts,) = client.run(_cached_states).values()
    assert counts == (1, 1, 1)
    assert load_state(heldout) is state
