"""Held-out correlation against training rows on the wide digits CNN: least squares, ridge and ridge
toward a prior (GP, LOO), and how many forward passes each needs (issue 26 item 2).

Builds (once, cached under ``--cache``) a train store of ``--rows`` masks and a held-out store of
``--heldout`` masks of the wide model (:mod:`coar_dask.zoo.wide`, 1,568 components, alpha 0.05), the
GP prior (one backward pass per batch of examples) and the LOO prior (P + 1 forward passes, in a
store of its own); then fits each method on prefixes of the train store's rows (a grid of row counts,
10% of each prefix held out to choose the penalty) and scores it on the held-out store.

``passes_ratio`` at a target correlation r: the forward passes least squares needs to reach r (its
row count, interpolated linearly between grid points) over the fewest any method needs, a method
with a prior counting the prior's passes too (LOO: P + 1; GP: ``GP_FORWARD_EQUIVALENTS`` -- one
forward and one backward pass over every example, about 3 forward passes' work).

    OMP_NUM_THREADS=1 nice python benchmarks/sample_efficiency.py --json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

#: A GP prior's cost in forward passes over every example: one forward and one backward (~2 forward).
GP_FORWARD_EQUIVALENTS = 3


def build(cache: Path, rows: int, heldout: int) -> dict:
    """The train and held-out stores, GP and LOO attributions of the wide model (cached)."""
    from coar_dask.core.spec import Spec
    from coar_dask.core.store import init_store
    from coar_dask.fit.attributions import Attributions
    from coar_dask.fit.baselines import gradient_x_parameter, leave_one_out
    from coar_dask.runtime.build import run_build
    from coar_dask.zoo import wide

    cache.mkdir(parents=True, exist_ok=True)
    wide.load_model()
    exp = wide.experiment()
    P, K = wide.N_COMPONENTS, 360
    out = {}
    for name, n, seed in (("train", rows, 0), ("heldout", heldout, 1)):
        path = cache / name
        e = wide.experiment(mask_seed=seed)
        spec = Spec.for_experiment(n, P, K, x_name=e.x_name, y_name=e.y_name, y_dtype="float32")
        store = init_store(path, spec, mask_seed=seed, alpha=e.alpha)
        t0 = time.perf_counter()
        run_build(store, e)
        logging.info("%s store: %d rows in %.0f s", name, n, time.perf_counter() - t0)
        out[name] = path
    for name, make in (("gp", lambda: gradient_x_parameter(exp)),
                       ("loo", lambda: leave_one_out(exp, cache / "loo-store"))):
        path = cache / f"{name}.pt"
        if not path.is_file():
            make().save(path)
        out[name] = path
    return out


def passes(method: str, rows: float, P: int) -> float:
    """Forward passes over every example: one per row (an ablated model), plus the prior's."""
    return rows + {"loo": P + 1, "gp": GP_FORWARD_EQUIVALENTS}.get(method, 0)


def crossing(grid: list[int], scores: list[float], target: float) -> float | None:
    """The row count at which ``scores`` (over ``grid``) first reaches ``target``, linear between points."""
    for i, (n, r) in enumerate(zip(grid, scores)):
        if r >= target:
            if i == 0:
                return float(n)
            n0, r0 = grid[i - 1], scores[i - 1]
            return float(n0 + (n - n0) * (target - r0) / (r - r0))
    return None


def fit_curves(paths: dict, grid: list[int], val_fraction: float, methods: list[str], stop_at: float = 1.0) -> dict:
    """Held-out mean correlation of each method fitted on the first ``n`` rows, for ``n`` in ``grid``
    (a method's curve ends at the first ``n`` where it reaches ``stop_at``)."""
    from coar_dask.core.store import open_store
    from coar_dask.fit.attributions import Attributions
    from coar_dask.fit.evaluate import evaluate
    from coar_dask.fit.fit import fit
    from coar_dask.solvers.prior import Prior

    store, held = open_store(paths["train"], read_only=True), open_store(paths["heldout"], read_only=True)
    priors = {m: Prior(Attributions.load(paths[m]).weight, name=m) for m in ("gp", "loo") if m in methods}
    curves: dict[str, list[float]] = {m: [] for m in methods}
    lams: dict[str, list[float]] = {m: [] for m in methods}
    for n in grid:
        n_val = max(1, int(round(val_fraction * n)))
        for m in methods:
            if curves[m] and curves[m][-1] >= stop_at:
                continue  # past every target: more rows change no crossing
            t0 = time.perf_counter()
            if m == "lstsq":
                attrs = fit(store, num_train=n, num_val=0, row_rule="seed")
            else:
                extra = {"prior": priors[m]} if m in priors else {}
                attrs = fit(store, num_train=n - n_val, num_val=n_val, row_rule="seed", ridge_grid="auto", **extra)
            r = float(evaluate(attrs, held).mean)
            curves[m].append(r)
            lams[m].append(float(np.median(attrs.lam)))
            logging.info("%5d rows %-6s held-out r %.4f (median lam %.3g) in %.1f s", n, m, r, lams[m][-1],
                         time.perf_counter() - t0)
    return {"curves": curves, "median_lam": lams}


def summarize(grid: list[int], curves: dict, P: int, targets: tuple[float, ...]) -> dict:
    """Rows and forward passes each method needs to reach each target, and ``passes_ratio``."""
    out = {}
    for target in targets:
        rows = {m: crossing(grid, c, target) for m, c in curves.items()}
        need = {m: None if n is None else passes(m, n, P) for m, n in rows.items()}
        reached = {m: v for m, v in need.items() if v is not None}
        best = min(reached, key=reached.get) if reached else None
        ratio = (need["lstsq"] / reached[best]) if best and need.get("lstsq") else None
        out[f"{target:g}"] = {"rows": rows, "passes": need, "best": best, "passes_ratio": ratio}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/coar-sample-efficiency", help="stores and priors (built once)")
    ap.add_argument("--rows", type=int, default=4500, help="masks in the train store")
    ap.add_argument("--heldout", type=int, default=500, help="masks in the held-out store")
    ap.add_argument("--grid", default="250,500,750,1000,1250,1500,1750,2000,2500,3000,3500,4000,4500",
                    help="row counts to fit on (prefixes of the train store)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="of each prefix, to choose the penalty")
    ap.add_argument("--methods", default="lstsq,ridge,gp,loo")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine one thread ran eigh 14x faster than two)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("coar_dask", "distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    from coar_dask.zoo.wide import N_COMPONENTS

    torch.set_num_threads(args.threads)

    grid = [int(v) for v in args.grid.split(",") if int(v) <= args.rows]
    t0 = time.perf_counter()
    paths = build(Path(args.cache), args.rows, args.heldout)
    fits = fit_curves(paths, grid, args.val_fraction, args.methods.split(","), stop_at=0.975)
    result = {"model": "wide digits CNN", "components": N_COMPONENTS, "alpha": 0.05, "heldout_rows": args.heldout,
              "grid": grid, "gp_forward_equivalents": GP_FORWARD_EQUIVALENTS, **fits,
              "targets": summarize(grid, fits["curves"], N_COMPONENTS, (0.97, 0.95)),
              "seconds": round(time.perf_counter() - t0, 1)}
    result["passes_ratio"] = result["targets"]["0.97"]["passes_ratio"]
    result["passes_ratio_095"] = result["targets"]["0.95"]["passes_ratio"]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for m, c in fits["curves"].items():
        print(f"{m:6s} " + " ".join(f"{r:.3f}" for r in c))
    for t, s in result["targets"].items():
        print(f"r = {t}: rows {s['rows']}, passes_ratio {s['passes_ratio']}")


if __name__ == "__main__":
    main()
