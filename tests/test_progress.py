"""``fit(..., progress=True)`` shows a tqdm bar on stderr whose unit says what it
counts (rows, iterations, epochs, slices), the same bar ``coar-dask fit`` uses
(:mod:`coar_dask.fit.progress`); a progress function still gets every report."""

from __future__ import annotations

import pytest

from coar_dask.fit.progress import FitProgressBar, fit_progress, stage_unit
from coar_dask.solvers.base import FitProgress

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from coar_dask import Experiment, run_build
    from coar_dask.runtime.build import init_experiment_store

    exp = Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=12)
    path = tmp_path_factory.mktemp("progress") / "store"
    run_build(init_experiment_store(path, exp, 60, rows_per_chunk=30), exp)
    return path


@pytest.mark.parametrize("stage, unit", [("moments", "row"), ("moments (validation)", "row"), ("cg", "iteration"),
                                         ("ridge", "penalty"), ("saga", "epoch"), ("saga-refit", "epoch"),
                                         ("slices", "slice"), ("something new", "step")])
def test_each_stage_counts_in_its_unit(stage, unit):
    assert stage_unit(stage) == unit


def test_fit_with_progress_true_writes_a_bar_in_rows_to_stderr(store, capsys):
    from coar_dask import fit

    attrs = fit(store, num_val=10, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "moments" in captured.err and "row/s" in captured.err
    assert "60/60" not in captured.err and "50/50" in captured.err  # 50 training rows, then 10 validation
    assert attrs.n_examples == 12


def test_saga_epochs_show_as_epochs(store, capsys):
    from coar_dask import fit

    fit(store, num_val=10, solver="saga", max_epochs=3, k=2, progress=True)
    assert "epoch/s" in capsys.readouterr().err


def test_a_progress_function_still_gets_every_report(store, capsys):
    from coar_dask import fit

    seen: list[FitProgress] = []
    fit(store, num_val=10, progress=seen.append)
    assert capsys.readouterr().err == ""  # no bar unless asked
    assert seen and all(isinstance(p, FitProgress) for p in seen)
    assert {p.stage for p in seen} >= {"moments"}
    assert seen[-1].done <= (seen[-1].total or seen[-1].done)


def test_no_progress_shows_nothing(store, capsys):
    from coar_dask import fit

    fit(store, progress=False)
    fit(store)
    assert capsys.readouterr().err == ""


def test_the_bar_restarts_its_count_and_unit_per_stage(capsys):
    with fit_progress(True) as bar:
        assert isinstance(bar, FitProgressBar)
        bar(FitProgress("moments", 40, 50, detail="40/50 rows"))
        bar(FitProgress("saga", 2, 10, detail="2/10 epochs"))
        assert bar._bar.unit == "epoch" and bar._bar.n == 2 and bar._bar.total == 10
    err = capsys.readouterr().err
    assert "40/50" in err and "2/10" in err and "saga" in err


def test_fit_progress_passes_functions_and_none_through():
    def fn(p):
        return None

    with fit_progress(fn) as got:
        assert got is fn
    for value in (None, False):
        with fit_progress(value) as got:
            assert got is None
