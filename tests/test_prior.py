"""Ridge toward a prior attribution (issue 26 item 2): the closed form, its limits, the priors
``fit(store, prior=gp|loo|FILE)`` makes, and that a prior fits better from few rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coar_dask.errors import CoarError, RegressionError
from coar_dask.solvers.lstsq import lstsq
from coar_dask.solvers.prior import Prior


class ArrayRows:
    def __init__(self, X, Y, block=37):
        self.X, self.Y, self.block = np.asarray(X), np.asarray(Y), block
        self.n_rows, self.n_features = self.X.shape
        self.n_targets = self.Y.shape[1]

    def blocks(self):
        for i in range(0, self.n_rows, self.block):
            yield self.X[i:i + self.block], self.Y[i:i + self.block]


def closed_form(X, Y, w0, lam):
    """argmin ||y - b - X w||^2 + lam ||w - w0||^2: centred, (G + lam I) w = X'^T y + lam w0."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ Yc + lam * w0)
    return w, Y.mean(0) - X.mean(0) @ w


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(5, 60), p=st.integers(1, 12), k=st.integers(1, 4),
       lam=st.floats(1e-3, 1e3))
def test_prior_fit_equals_the_closed_form(seed, n, p, k, lam):
    rng = np.random.default_rng(seed)
    X = (rng.random((n, p)) < 0.5).astype(np.float64)
    Y = rng.normal(size=(n, k)) * 3 + 5
    w0 = rng.normal(size=(p, k))
    got = lstsq(ArrayRows(X, Y), ridge=lam, prior=w0, prior_scale=False, method="gram")
    w, b = closed_form(X, Y, w0, lam)
    scale = 1 + np.abs(w).max()
    assert np.abs(got.weight - w).max() < 1e-7 * scale
    assert np.abs(got.bias - b).max() < 1e-7 * (1 + np.abs(b).max()) * scale
    assert got.info["prior_sha256"] == Prior(w0).digest


def test_infinite_penalty_gives_the_prior_and_zero_gives_least_squares():
    rng = np.random.default_rng(1)
    X = (rng.random((80, 6)) < 0.5).astype(np.float64)
    Y = X @ rng.normal(size=(6, 2)) + 0.1 * rng.normal(size=(80, 2))
    w0 = rng.normal(size=(6, 2))
    far = lstsq(ArrayRows(X, Y), ridge=1e12, prior=w0, prior_scale=False, method="gram")
    assert np.abs(far.weight - w0).max() < 1e-6
    plain = lstsq(ArrayRows(X, Y), method="gram")
    zero = lstsq(ArrayRows(X, Y), ridge=0.0, prior=w0, prior_scale=False, method="gram")
    assert np.abs(zero.weight - plain.weight).max() < 1e-9


def test_the_prior_scale_is_fitted_per_target_and_flips_a_reversed_prior():
    rng = np.random.default_rng(2)
    X = (rng.random((300, 10)) < 0.5).astype(np.float64)
    w_true = rng.normal(size=(10, 3))
    Y = X @ w_true
    got = lstsq(ArrayRows(X, Y), ridge=1e12, prior=-2.0 * w_true, method="gram")
    assert np.allclose(got.info["prior_scale"], -0.5)
    assert np.abs(got.weight - w_true).max() < 1e-6


def test_a_prior_refuses_refit_and_conjugate_gradients():
    w0 = np.zeros((3, 1))
    with pytest.raises(RegressionError, match="refit"):
        lstsq(ArrayRows(np.eye(3), np.ones((3, 1))), ArrayRows(np.eye(3), np.ones((3, 1))), ridge_grid="0,1",
              refit=True, prior=w0)
    with pytest.raises(RegressionError, match="gram"):
        lstsq(ArrayRows(np.eye(3), np.ones((3, 1))), method="cg", prior=w0)


def test_a_ridge_grid_toward_the_prior_chooses_on_validation_rows():
    rng = np.random.default_rng(3)
    p, k = 40, 5
    w_true = rng.normal(size=(p, k))
    X = (rng.random((600, p)) < 0.5).astype(np.float64)
    Y = X @ w_true + 0.5 * rng.normal(size=(600, k))
    train, val = ArrayRows(X[:45], Y[:45]), ArrayRows(X[45:], Y[45:])
    good = w_true + 0.05 * rng.normal(size=(p, k))
    toward = lstsq(train, val, ridge_grid="auto", prior=good)
    plain = lstsq(train, val, ridge_grid="auto")
    assert np.mean(toward.info["val_correlation"]) > np.mean(plain.info["val_correlation"])
    assert np.abs(toward.weight - w_true).mean() < 0.5 * np.abs(plain.weight - w_true).mean()
    assert (toward.lam > 0).all()


# -- on a real store: fit(store, prior=...) and coar-dask fit --prior ---------------------------


@pytest.fixture(scope="module")
def digits_stores(tmp_path_factory, digits_experiment):
    """A 200-row digits store (80 components), and 300 held-out rows."""
    from coar_dask.core.experiment import load_state
    from coar_dask.fit.evaluate import eval_store_for
    from coar_dask.runtime.build import run_build

    tmp = tmp_path_factory.mktemp("prior")
    state = load_state(digits_experiment)
    held_exp = digits_experiment.replace(mask_seed=1)
    store = eval_store_for(tmp / "store", digits_experiment, 200, state.n_components, state.n_examples)
    held = eval_store_for(tmp / "held", held_exp, 300, state.n_components, state.n_examples)
    run_build(store, digits_experiment)
    run_build(held, held_exp)
    return store, held


def test_a_loo_prior_fits_better_than_least_squares_from_few_rows(digits_stores):
    from coar_dask.fit.evaluate import evaluate
    from coar_dask.fit.fit import fit

    store, held = digits_stores
    rows = dict(num_train=60, num_val=20)  # fewer rows than the 80 components
    plain = evaluate(fit(store, **rows), held).mean
    ridge = evaluate(fit(store, ridge_grid="auto", **rows), held).mean
    toward = fit(store, ridge_grid="auto", prior="loo", **rows)
    assert toward.metadata["prior"] == "loo"
    assert len(toward.metadata["prior_scale"]) == toward.weight.shape[1]
    assert (toward.lam > 0).mean() > 0.5  # the chosen penalties are recorded (lam) and mostly shrink
    scored = evaluate(toward, held).mean
    assert scored > max(plain, ridge) + 0.05, (scored, plain, ridge)
    assert (store.path.parent / "store-loo").is_dir()  # where compare and demo keep the LOO rows


def test_a_prior_file_with_the_wrong_component_count_is_one_line(digits_stores, tmp_path, coar_dask_cli):
    import subprocess

    from coar_dask.fit.attributions import Attributions
    from coar_dask.fit.fit import fit

    store, _ = digits_stores
    k = int(np.prod(store.spec["margins"].shape))
    bad = Attributions(np.zeros((79, k), np.float32), np.zeros(k, np.float32), np.zeros(k, np.float32), {})
    path = bad.save(tmp_path / "bad.pt")
    with pytest.raises(CoarError, match=r"\(79, 360\), not \(80, 360\)"):
        fit(store, prior=str(path), ridge_grid="auto", num_val=20)
    out = subprocess.run([*coar_dask_cli, "fit", str(store.path), "--prior", str(path), "--ridge-grid", "auto",
                          "--num-val", "20", "--out", str(tmp_path / "a.pt")], capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not (80, 360)" in lines[0], out.stderr


def test_the_fit_command_takes_a_prior_file(digits_stores, tmp_path, coar_dask_cli):
    import subprocess

    from coar_dask.fit.attributions import Attributions
    from coar_dask.fit.fit import fit

    store, _ = digits_stores
    full = fit(store)
    path = full.save(tmp_path / "full.pt")
    out = tmp_path / "toward.pt"
    run = subprocess.run([*coar_dask_cli, "fit", str(store.path), "--prior", str(path), "--num-train", "40",
                          "--num-val", "20", "--ridge-grid", "auto", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = Attributions.load(out)
    assert got.metadata["prior"] == str(path)
    assert got.metadata["prior_sha256"]
    unfitted = got.metadata["unfitted_components"]
    assert unfitted  # 40 rows at alpha 0.05 leave some components never ablated: they keep the scaled prior
    scaled = full.weight * np.asarray(got.metadata["prior_scale"])[None, :]
    np.testing.assert_allclose(got.weight[unfitted], scaled[unfitted], rtol=1e-4, atol=1e-6)
    corr = np.corrcoef(got.weight.ravel(), full.weight.ravel())[0, 1]
    assert corr > 0.9  # 40 rows for 80 components, pulled toward the 200-row fit


def test_a_prior_fit_summed_on_a_local_cluster_equals_the_one_in_process(digits_stores, tmp_path):
    """The row-parallel fit (moments summed on workers, one solve) takes the prior as the in-process one."""
    from coar_dask.fit.fit import fit
    from coar_dask.fit.plan import FitSettings, plan_fit
    from coar_dask.runtime.clusters import cluster_client

    store, _ = digits_stores
    path = fit(store).save(tmp_path / "full.pt")
    rows = dict(num_train=50, num_val=30, prior=str(path), target_slice=(100, 160))
    here = fit(store, **rows)
    with cluster_client("local", n_workers=2) as client:
        there = fit(store, client=client, **rows)
        settings = FitSettings.create(**{**rows, "prior": Prior(np.zeros((80, 360)))})
        assert plan_fit(store, settings, client=client).execution == "rows"
    np.testing.assert_allclose(there.weight, here.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(there.lam, here.lam)
