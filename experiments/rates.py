"""How tight is Theorem 2? The empirical exponential rate of L - L* against 2 sigma mu over
depth x scale (Gaussian inits, random X with n > d): a heatmap of their ratio (>= 1 by the
theorem; large = the bound is loose)."""

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import ddln_jax as dd
from ddln_jax.plotting import heatmap

from ._common import cli, save_figure, save_json, save_npz, setup


def main(*, quick: bool = False, out="results/rates", seed: int = 0, progress=True) -> dict:
    out = setup(out)
    depths = (2, 3, 4, 5) if quick else (2, 3, 4, 5, 6, 7, 8)
    scales = (0.75, 1.0, 1.5) if quick else (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    n, d = 10, 5
    t1 = 200.0 if quick else 1000.0
    ts = jnp.linspace(0.0, t1, 800)
    kx, ky, ku = jr.split(jr.key(seed), 3)
    X, y = jr.normal(kx, (n, d)), jr.normal(ky, (n,))
    problem = dd.LeastSquares(X, y)
    mu = float(problem.pl_constant)
    shape = (len(depths), len(scales))
    ratio, emp, thm, ok = np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape, bool)
    grid = [(i, j) for i in range(len(depths)) for j in range(len(scales))]
    for i, j in tqdm(grid, desc="rates", disable=not progress):
        u0 = scales[j] * dd.init_gaussian(jr.fold_in(ku, depths[i]), depths[i], d)
        traj = dd.gradient_flow(u0, problem, t1=t1, ts=ts, rtol=1e-10, atol=1e-12,
                                stop_when_converged=1e-7)
        live = np.asarray(ts) <= float(traj.t_final)
        sub = np.asarray(problem.suboptimality(traj.theta))[live]
        emp[i, j] = dd.empirical_rate(np.asarray(ts)[live], sub)
        thm[i, j] = 2 * float(dd.sigma(u0)) * mu
        ratio[i, j] = emp[i, j] / thm[i, j]
        ok[i, j] = bool(traj.ok)
    fig, ax = plt.subplots(figsize=(6, 4))
    heatmap(ax, ratio, scales, depths, title="empirical rate / (2 sigma mu)  (Theorem 2)")
    ax.set_xlabel("scale of the Gaussian init")
    ax.set_ylabel("depth L")
    files = save_figure(fig, out, "rates")
    files.append(save_npz(out, "rates", depths=depths, scales=scales, ratio=ratio,
                          empirical_rate=emp, theorem2_rate=thm, X=X, y=y))
    summary = {
        "depths": list(depths),
        "scales": list(scales),
        "ratio": ratio,
        "min_ratio": float(ratio.min()),
        "max_ratio": float(ratio.max()),
        "all_ok": bool(ok.all()),
        "bound_respected": bool(np.all(ratio >= 1 - 1e-6)),
    }
    files.append(save_json(out, "rates", summary))
    summary["files"] = files
    return summary


if __name__ == "__main__":
    cli(main, __doc__, "results/rates")
