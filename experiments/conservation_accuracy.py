"""Accuracy of the solvers: conservation drift (Prop 1) and error against a tight-tolerance
reference (Dopri8, rtol 1e-13), against rtol, for Tsit5, Dopri8 and Kvaerno5, with their
step counts (depth 4, X 10x5, T = 10)."""

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import ddln_jax as dd

from ._common import cli, save_figure, save_json, save_npz, setup
from ._common import fmt as _fmt

FULL_ESTIMATE = "about 3x the quick run (8 tolerances instead of 3; estimated, not measured)"

SOLVERS = ("tsit5", "dopri8", "kvaerno5")


def main(*, quick: bool = True, out="results/conservation_accuracy", seed: int = 0,
         progress=True) -> dict:
    out = setup(out)
    depth, n, d, t1 = 4, 10, 5, 10.0
    rtols = (1e-4, 1e-6, 1e-8) if quick else (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
    ts = jnp.linspace(0.0, t1, 101)
    kx, ky, ku = jr.split(jr.key(seed), 3)
    X, y = jr.normal(kx, (n, d)), jr.normal(ky, (n,))
    problem = dd.LeastSquares(X, y)
    u0 = dd.init_gaussian(ku, depth, d)
    ref = dd.gradient_flow(u0, problem, t1=t1, ts=ts, solver="dopri8", rtol=1e-13, atol=1e-15)
    shape = (len(SOLVERS), len(rtols))
    err, drift, steps = np.zeros(shape), np.zeros(shape), np.zeros(shape, int)
    grid = [(i, j) for i in range(len(SOLVERS)) for j in range(len(rtols))]
    for i, j in tqdm(grid, desc="solvers", disable=not progress):
        traj = dd.gradient_flow(u0, problem, t1=t1, ts=ts, solver=SOLVERS[i], rtol=rtols[j],
                                atol=rtols[j] * 1e-2)
        err[i, j] = float(jnp.max(jnp.abs(traj.layers - ref.layers)))
        drift[i, j] = float(dd.conservation_residual(traj))
        steps[i, j] = int(traj.num_steps)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, name in enumerate(SOLVERS):
        (line,) = ax1.loglog(rtols, err[i], "-o", ms=3, label=f"{name}: error")
        ax1.loglog(rtols, drift[i], "--", color=line.get_color(), label=f"{name}: drift")
        ax2.loglog(rtols, steps[i], "-o", ms=3, label=name)
    ax1.set_xlabel("rtol (atol = rtol / 100)")
    ax1.set_ylabel("max |u - u_ref|  /  conservation drift")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("rtol")
    ax2.set_ylabel("solver steps")
    ax2.legend(fontsize=7)
    files = save_figure(fig, out, "conservation_accuracy")
    files.append(save_npz(out, "conservation_accuracy", rtols=rtols, error=err, drift=drift,
                          steps=steps))
    summary = {
        "solvers": list(SOLVERS),
        "rtols": list(rtols),
        "error": err,
        "drift": drift,
        "steps": steps,
        "reference_drift": float(dd.conservation_residual(ref)),
        "reference_steps": int(ref.num_steps),
    }
    files.append(save_json(out, "conservation_accuracy", summary))
    summary["files"] = files
    return summary


def caption(s) -> list[str]:
    """Markdown lines for `results/index.md` from this experiment's summary."""
    lines = [
        "Solver accuracy: error against a Dopri8 rtol 1e-13 reference and conservation drift "
        "versus rtol, with step counts.",
        "",
        "| solver | " + " | ".join(f"rtol {r:g}" for r in s["rtols"]) + " |",
        "|---|" + "---|" * len(s["rtols"]),
    ]
    for i, solver in enumerate(s["solvers"]):
        cells = [f"err {_fmt(e, '.1e')}, {st} steps" for e, st in
                 zip(s["error"][i], s["steps"][i])]
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    cli(main, __doc__, "results/conservation_accuracy")
