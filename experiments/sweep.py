"""A depth x scale x seed sweep from the command line, resumable, with a phase diagram:

    python -m experiments.sweep --depths 2 3 4 6 --scales 0.5 1 1.5 --seeds 256 --out results/sweep

Random least-squares problem (X 10x8, fixed), Gaussian inits, steady-state stop. The figure
shows, per (depth, scale), the median time to reach L - L* < 1e-10 and the fraction of seeds
that got there within t1.
"""

import argparse

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd
from ddln_jax.plotting import heatmap

from ._common import save_figure, save_json, save_npz, setup
from ._common import time_to_reach


def main(*, quick: bool = False, out="results/sweep", depths=None, scales=None, seeds=None,
         t1=None, init="gaussian", progress=True) -> dict:
    out = setup(out)
    depths = depths or ((2, 3, 4) if quick else (2, 3, 4, 6))
    scales = scales or ((0.75, 1.0, 1.5) if quick else (0.5, 1.0, 1.5))
    seeds = seeds or (4 if quick else 64)
    t1 = t1 or (100.0 if quick else 500.0)
    kx, ky = jr.split(jr.key(2024))
    problem = dd.LeastSquares(jr.normal(kx, (10, 8)), jr.normal(ky, (10,)))
    ts = jnp.linspace(0.0, t1, 200)
    res = dd.sweep(problem, depths=depths, scales=scales, seeds=range(seeds), t1=t1, ts=ts,
                   init=init, stop_when_converged=1e-7, out=out / "chunks", progress=progress)
    sub = np.asarray(problem.suboptimality(jnp.asarray(res.theta)))
    reach = np.array([time_to_reach(ts, s) for s in sub])
    shape = (len(depths), len(scales))
    median, frac = np.full(shape, np.nan), np.zeros(shape)
    for i, L in enumerate(depths):
        for j, s in enumerate(scales):
            rows = (res.depth == L) & np.isclose(res.scale, s)
            r = reach[rows]
            frac[i, j] = np.mean(np.isfinite(r))
            if np.isfinite(r).any():
                median[i, j] = np.median(r[np.isfinite(r)])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    heatmap(axes[0], np.where(np.isfinite(median), median, t1), scales, depths,
            title="median time to L - L* < 1e-10", fmt="{:.3g}")
    heatmap(axes[1], frac, scales, depths, title=f"fraction converged by t = {t1:g}",
            fmt="{:.2f}", log=False)
    for ax in axes:
        ax.set_xlabel("init scale")
        ax.set_ylabel("depth")
    files = save_figure(fig, out, "sweep_phase_diagram")
    files.append(save_npz(out, "sweep", **res.to_dict(), time_to_1e_10=reach))
    summary = {
        "depths": list(depths), "scales": list(scales), "seeds": seeds,
        "median_time": median, "fraction_converged": frac,
        "all_ok": bool(res.ok.all()), "implicit": int(res.implicit.sum()),
        "lockstep_efficiency": res.efficiency, "overall_efficiency": res.overall_efficiency,
    }
    files.append(save_json(out, "sweep", summary))
    summary["files"] = files
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--scales", type=float, nargs="+")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--t1", type=float)
    parser.add_argument("--init", default="gaussian", choices=["gaussian", "zero_first"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/sweep")
    a = parser.parse_args()
    s = main(quick=a.quick, out=a.out, depths=a.depths, scales=a.scales, seeds=a.seeds,
             t1=a.t1, init=a.init)
    print({k: v for k, v in s.items() if k != "files"})
