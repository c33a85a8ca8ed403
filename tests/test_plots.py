"""plot_evaluation draws one page (issue 13): the histogram of correlations with
mean and median, the correlations ranked, a summary, and the best, median and
worst examples on equal axes with y = x, axes naming the experiment's output;
it returns a Figure, and writes PNG or PDF when given a path."""

from __future__ import annotations

import numpy as np
import pytest

from coar_dask.fit.evaluate import EvaluationResult, evaluate, plot_evaluation, ranked_examples

matplotlib = pytest.importorskip("matplotlib")
torch = pytest.importorskip("torch")


def synthetic(k: int = 40, n: int = 50, nan: tuple[int, ...] = (3, 7), output: str | None = "margin"):
    rng = np.random.default_rng(0)
    corr = rng.uniform(0.2, 0.95, k)
    corr[list(nan)] = np.nan
    sample = ranked_examples(corr, 3)
    pred = rng.normal(size=(n, sample.size))
    return EvaluationResult(correlations=corr, n_rows=n, alpha=0.1, sample_examples=sample, sample_predicted=pred,
                            sample_actual=pred + rng.normal(size=pred.shape), n_in_sample=0, output=output)


def test_ranked_examples_are_best_median_worst_without_nan():
    corr = np.array([0.5, np.nan, 0.9, 0.1, 0.7, np.nan, 0.3])
    assert ranked_examples(corr, 3).tolist() == [2, 0, 3]  # 0.9, the median 0.5, 0.1
    assert ranked_examples(corr, 5).tolist() == [2, 4, 0, 6, 3]
    assert ranked_examples(corr, 99).tolist() == [2, 4, 0, 6, 3]
    assert ranked_examples(np.full(4, np.nan), 3).size == 0
    assert ranked_examples(corr, 0).size == 0


def test_the_figure_is_a_page_of_six_panels():
    result = synthetic()
    fig = plot_evaluation(result)
    assert isinstance(fig, matplotlib.figure.Figure)
    axes = fig.axes
    assert len(axes) == 6 and all(ax.get_visible() for ax in axes)
    width, height = fig.get_size_inches()
    assert width > height  # a landscape page, 2 rows of 3
    assert fig.get_suptitle() == "COAR held-out evaluation"


def test_the_histogram_marks_mean_and_median_and_counts_nan():
    result = synthetic()
    hist = plot_evaluation(result).axes[0]
    lines = {line.get_label().split()[0]: line.get_xdata()[0] for line in hist.get_lines()}
    assert lines["mean"] == pytest.approx(result.mean) and lines["median"] == pytest.approx(result.median)
    assert result.mean != pytest.approx(result.median)
    assert "38 examples (2 NaN left out)" == hist.get_title()
    assert sum(p.get_height() for p in hist.patches) == 38
    assert "margin" in hist.get_xlabel()


def test_best_median_and_worst_on_equal_axes_with_y_equals_x():
    result = synthetic()
    scatters = plot_evaluation(result).axes[3:]
    best, median, worst = ranked_examples(result.correlations, 3)
    titles = [ax.get_title() for ax in scatters]
    assert titles[0].startswith(f"best: example {best}: r = {result.correlations[best]:.3f}")
    assert titles[1].startswith(f"median: example {median}:")
    assert titles[2].startswith(f"worst: example {worst}:")
    for j, ax in enumerate(scatters):
        assert ax.get_xlabel() == "predicted margin" and ax.get_ylabel() == "actual margin"
        assert ax.get_xlim() == ax.get_ylim() and ax.get_aspect() == 1.0
        (diagonal,) = [line for line in ax.get_lines() if line.get_label() == "y = x"]
        np.testing.assert_array_equal(diagonal.get_xdata(), diagonal.get_ydata())
        points = ax.collections[0].get_offsets()
        np.testing.assert_allclose(points[:, 0], result.sample_predicted[:, j])
        np.testing.assert_allclose(points[:, 1], result.sample_actual[:, j])


def test_without_a_recorded_output_the_axes_say_output():
    fig = plot_evaluation(synthetic(output=None))
    assert fig.axes[3].get_xlabel() == "predicted output"


def test_a_result_with_other_samples_still_draws(tmp_path):
    rng = np.random.default_rng(1)
    result = EvaluationResult(correlations=rng.uniform(0.5, 1, 20), n_rows=30, sample_examples=np.array([1, 4]),
                              sample_predicted=rng.normal(size=(30, 2)), sample_actual=rng.normal(size=(30, 2)))
    fig = plot_evaluation(result)
    assert [ax.get_visible() for ax in fig.axes] == [True] * 5 + [False]
    assert fig.get_suptitle() == "COAR evaluation"  # not known to be held out


@pytest.mark.parametrize("name, magic", [("eval.png", b"\x89PNG"), ("eval.pdf", b"%PDF"), ("eval", b"\x89PNG")])
def test_saves_png_or_pdf_by_suffix(tmp_path, name, magic):
    path = plot_evaluation(synthetic(), tmp_path / name)
    assert path == tmp_path / (name if "." in name else name + ".png")
    assert path.read_bytes()[:len(magic)] == magic


def test_evaluate_samples_the_best_median_and_worst_and_names_the_output(tmp_path):
    from coar_dask import Experiment, fit, run_build
    from coar_dask.runtime.build import init_experiment_store

    exp = Experiment(model="conftest:tiny_model", examples="conftest:tiny_examples", alpha=0.2, batch_size=12,
                     output="correct_logit")
    run_build(init_experiment_store(tmp_path / "train", exp, 80, rows_per_chunk=40), exp)
    evaluation = exp.replace(mask_seed=1)
    eval_store = init_experiment_store(tmp_path / "eval", evaluation, 30, rows_per_chunk=10)
    run_build(eval_store, evaluation)
    attrs = fit(tmp_path / "train")
    result = evaluate(attrs, eval_store)
    assert result.output == "correct_logit" and result.kind == "held-out"
    np.testing.assert_array_equal(result.sample_examples, ranked_examples(result.correlations, 3))
    rows = [data for _, data in eval_store.iter_completed(["masks", "margins"])]
    masks = np.concatenate([d["masks"] for d in rows])
    actual = np.concatenate([d["margins"] for d in rows]).astype(np.float64)
    np.testing.assert_allclose(result.sample_actual, actual[:, result.sample_examples])
    np.testing.assert_allclose(result.sample_predicted, attrs.predict(masks)[:, result.sample_examples], rtol=1e-5,
                               atol=1e-5)
    fig = plot_evaluation(result)
    assert fig.axes[3].get_xlabel() == "predicted correct_logit"
    assert evaluate(attrs, eval_store, n_plot_examples=0).sample_examples.size == 0


def _edit_sweep():
    """A two-case sweep over ks 1, 5, 10 with known numbers (no model)."""
    from coar_dask.fit.edit import EditCase, EditSweep

    ks = np.array([1, 5, 10])
    cases = [EditCase([0], [1, 2], held_out=[3, 4, 5]), EditCase([6], [7, 8], held_out=[9], held_out_target=[10])]
    shape = {"coar": (2, 1, 3), "random": (2, 2, 3), "target_only": (2, 1, 3)}
    flipped = {m: np.zeros(s) for m, s in shape.items()}
    flipped["coar"][:, 0, 1:] = 1.0  # both flip at k = 5
    acc = {m: np.full(s, 0.9) for m, s in shape.items()}
    held = {m: np.full(s, 0.8) for m, s in shape.items()}
    held["coar"][0, 0] = [0.8, 0.7, 0.6]
    held["coar"][1, 0] = [0.8, 0.5, 0.4]
    held_t = {m: np.full(s, np.nan) for m, s in shape.items()}
    held_t["coar"][1, 0] = [1.0, 0.0, 0.0]
    out = {m: np.zeros(s) for m, s in shape.items()}
    out["coar"][:, 0] = [-0.5, -2.0, -4.0]
    predicted = {m: np.zeros(s) for m, s in shape.items()}
    predicted["coar"][:, 0] = [-1.0, -3.0, -5.0]
    return EditSweep(ks, cases, "lower", 50, flipped, acc, out, np.array([0.9, 0.9]), np.array([1.0, 1.0]),
                     held_out_accuracy=held, held_out_target_accuracy=held_t, predicted_change=predicted,
                     base_held_out_accuracy=np.array([0.85, 0.75]), base_held_out_target_accuracy=np.array([np.nan, 1.0]))


def test_edit_summary_reports_held_out_accuracy_at_the_flip():
    s = _edit_sweep().summary()
    assert s["median_k_flip"]["coar"] == 5 and s["median_k_flip"]["random"] is None
    assert s["median_held_out_accuracy_at_flip"]["coar"] == pytest.approx(0.6)  # median of 0.7 and 0.5
    assert s["median_held_out_accuracy_at_flip"]["random"] is None  # never flips
    assert s["median_held_out_target_accuracy_at_flip"]["coar"] == 0.0  # the case without them is left out
    assert s["unedited"]["held_out_accuracy"] == pytest.approx(0.8)
    assert s["coar_by_k"]["actual_change"] == [-1.5, -3, -5] and s["coar_by_k"]["predicted_change"] == [-1, -3, -5]


def test_the_edit_figure_has_flips_held_out_accuracy_and_predicted_vs_actual_change(tmp_path):
    from coar_dask.errors import ConfigError
    from coar_dask.fit.edit import edit_figure, plot_edit

    fig = edit_figure(_edit_sweep())
    flips, held, change = fig.axes
    labels = [line.get_label() for line in change.get_lines()]
    actual = change.get_lines()[labels.index("COAR-Edit, actual")].get_ydata()
    predicted = change.get_lines()[labels.index("COAR-Edit, predicted")].get_ydata()
    np.testing.assert_allclose(actual, [-1.5, -3.0, -5.0])
    np.testing.assert_allclose(predicted, [-1.0, -3.0, -5.0])
    held_lines = {line.get_label(): line.get_ydata() for line in held.get_lines()}
    np.testing.assert_allclose(held_lines["COAR-Edit, held-out"], [0.8, 0.6, 0.5])
    np.testing.assert_allclose(held_lines["COAR-Edit, held-out targets"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(flips.get_lines()[0].get_ydata(), [0.0, 1.0, 1.0])
    path = plot_edit(_edit_sweep(), tmp_path / "edit.png")
    assert path.stat().st_size > 5000
    with pytest.raises(ConfigError, match="--overwrite|overwrite"):
        plot_edit(_edit_sweep(), tmp_path / "edit.png")  # the library refuses as the CLI does
    plot_edit(_edit_sweep(), tmp_path / "edit.png", overwrite=True)
