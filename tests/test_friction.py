"""A newcomer's friction (issue 24 item 10): a build with nothing to do starts no cluster, repair names the
exact command to run next, and a script that closes a LocalCluster ends without a killed worker."""

from __future__ import annotations

import shlex

import pytest

torch = pytest.importorskip("torch")

from coar_dask import run_build  # noqa: E402
from coar_dask.cli import main as cli_main  # noqa: E402
from coar_dask.core.verify import repair_store, verify_store  # noqa: E402
from coar_dask.runtime.build import init_experiment_store  # noqa: E402


@pytest.fixture
def built_store(tmp_path, tiny_experiment):
    store = init_experiment_store(tmp_path / "my store", tiny_experiment, rows=10, rows_per_chunk=5)
    run_build(store, None)
    return store


def test_build_on_a_completed_store_says_so_without_starting_a_cluster(built_store, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(cli_main, "client_for", lambda args: started.append(args) or pytest.fail("cluster started"))
    assert cli_main.main(["build", str(built_store.path)]) == 0
    out = capsys.readouterr().out
    assert not started
    assert out == f"build: nothing to do; all 2 blocks of {built_store.path} are completed.\n"


def test_repair_names_the_runnable_build_command_for_a_store_that_records_its_experiment(built_store):
    (built_store.path / "masks" / "c" / "1" / "0").write_bytes(b"not a chunk")
    report = repair_store(built_store.path, report=verify_store(built_store.path))
    assert report.reset_blocks
    text = report.format()
    assert f"coar-dask build {shlex.quote(str(built_store.path))}`" in text
    assert "EXP.yaml" not in text and "STORE" not in text
