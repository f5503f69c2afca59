"""Gradient descent against gradient flow. (a) GD with step eta is the flow at t = k eta up to
O(eta): the error max_k |theta_GD(k) - theta_GF(k eta)| against eta, with its fitted slope.
(b) Large steps: the sharpness (top Hessian eigenvalue w.r.t. the layers) along GD, times
eta, against the stability threshold 2; steps above 2 / S* (S* the sharpness at the flow's
limit) either move GD to a flatter minimum (catapult), trap it in a period-2 orbit whose two
points straddle eta S = 2 (edge of stability: it never converges), or diverge (flagged by
`dd.train`). Every step is saved, so oscillations are not aliased."""

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd

from ._common import cli, save_figure, save_json, save_npz, setup
from ._common import fmt as _fmt

FULL_ESTIMATE = ("about 7x the quick run (4000 GD steps instead of 600; estimated, not measured)")


def main(*, quick: bool = True, out="results/flow_vs_gd", seed: int = 0) -> dict:
    out = setup(out)
    depth, n, d = 3, 10, 5
    kx, ky, ku = jr.split(jr.key(seed), 3)
    X = jr.normal(kx, (n, d)) / jnp.sqrt(n)
    y = jr.normal(ky, (n,))
    problem = dd.LeastSquares(X, y)
    u0 = dd.init_gaussian(ku, depth, d)

    # (a) order of GD as a discretization of the flow
    T = 4.0
    etas = np.array([0.05, 0.025, 0.0125, 0.00625] if quick else [0.05, 0.025, 0.0125, 0.00625,
                                                                  0.003125, 0.0015625])
    saves = 8
    ts = jnp.linspace(0.0, T, saves + 1)
    flow = dd.gradient_flow(u0, problem, t1=T, ts=ts, solver="dopri8", rtol=1e-12, atol=1e-14)
    errors = []
    for eta in etas:
        steps = int(round(T / eta))
        gd = dd.train(u0, problem, float(eta), steps=steps, save_every=steps // saves)
        errors.append(float(jnp.max(jnp.abs(gd.theta - flow.theta))))
    errors = np.array(errors)
    slope = float(np.polyfit(np.log(etas), np.log(errors), 1)[0])

    # (b) large steps, relative to the sharpness S* at the flow's limit: GD can converge to a
    # minimum only if eta * sharpness(minimum) <= 2 (linear stability)
    limit = dd.gradient_flow(u0, problem, t1=500.0, ts=jnp.array([0.0, 500.0]),
                             stop_when_converged=1e-10)
    s_star = float(dd.sharpness(limit.layers[-1], problem, key=jr.key(seed)))
    factors = np.array([0.5, 1.5, 2.5, 4.0, 50.0])
    steps, every = (600, 1) if quick else (4000, 1)
    runs = jax.vmap(lambda e: dd.train(u0, problem, e, steps=steps, save_every=every))(
        jnp.asarray(factors / s_star)
    )
    sharp = jax.vmap(jax.vmap(lambda u: dd.sharpness(u, problem, key=jr.key(seed))))(runs.layers)
    ok = np.asarray(runs.ok)
    taken = np.asarray(runs.num_steps)
    kk = np.arange(0, steps + 1, every)
    final_eta_sharp = [float(factors[i] / s_star * sharp[i, -1]) for i in range(len(factors))]
    previous_eta_sharp = [float(factors[i] / s_star * sharp[i, -2]) for i in range(len(factors))]
    final_subopt = np.asarray(problem.suboptimality(runs.theta[:, -1]))
    converged = ok & (final_subopt < 1e-8)
    # an oscillation of period 2: the loss goes up and down at every step of the last 50
    dl = np.diff(np.asarray(runs.loss)[:, -51:], axis=1)
    period2 = ok & ~converged & np.all(dl[:, 1:] * dl[:, :-1] < 0, axis=1)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.loglog(etas, errors, "o-", label=f"GD error (slope {slope:.2f})")
    ax.loglog(etas, errors[-1] * etas / etas[-1], "k--", lw=0.8, label="O(η)")
    ax.set_xlabel("step size η")
    ax.set_ylabel(r"max$_k\,|\theta_{GD}(k) - \theta_{GF}(k\eta)|$")
    ax.set_title(f"GD → gradient flow (L = {depth}, t ≤ {T:g})")
    ax.legend(fontsize=8)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap
    for i, f in enumerate(factors):
        valid = kk <= taken[i]
        label = f"η = {f:g}/S*" + ("" if ok[i] else f" (diverged at step {taken[i] + 1})")
        label += " (oscillates, period 2)" if period2[i] else ""
        style = "o-" if valid.sum() < 3 else "-"  # a run that diverges at once: visible
        axes[1].semilogy(kk[valid], f / s_star * np.asarray(sharp[i])[valid], style, ms=4,
                         lw=0.8, label=label)
        axes[2].semilogy(kk[valid], np.asarray(problem.suboptimality(runs.theta[i]))[valid],
                         style, ms=4, lw=0.8, label=label)
    axes[1].axhline(2.0, color="k", ls="--", lw=0.8, label="stability 2")
    axes[1].set_ylim(1e-2, 1e3)
    axes[1].set_xlabel("step k")
    axes[1].set_ylabel("η × sharpness")
    axes[1].set_title("Sharpness along GD")
    axes[1].legend(fontsize=7)
    axes[2].set_xlabel("step k")
    axes[2].set_ylabel(r"$\mathcal{L} - \mathcal{L}^*$")
    axes[2].set_title("Loss (floor: float64 round-off of L − L*)")
    axes[2].set_ylim(1e-14, None)
    for a in axes[1:]:
        a.xaxis.set_major_locator(plt.MaxNLocator(5))
    files = save_figure(fig, out, "flow_vs_gd")
    files.append(save_npz(out, "flow_vs_gd", etas=etas, errors=errors, factors=factors,
                          steps=kk, sharpness=sharp, loss=runs.loss, ok=ok, X=X, y=y, u0=u0))
    summary = {
        "depth": depth,
        "etas": etas.tolist(),
        "errors": errors.tolist(),
        "order_slope": slope,
        "sharpness_at_flow_limit": s_star,
        "step_factors": factors.tolist(),
        "ok": ok.tolist(),
        "steps_taken": taken.tolist(),
        "final_eta_times_sharpness": final_eta_sharp,
        "previous_eta_times_sharpness": previous_eta_sharp,
        "period2": period2.tolist(),
        "converged": converged.tolist(),
        "final_suboptimality": final_subopt.tolist(),
        # linear stability: a run that converges ends at a minimum with eta * S <= 2
        "converged_runs_end_below_2": all(v <= 2.0 + 1e-6 for v, c in
                                          zip(final_eta_sharp, converged) if c),
    }
    files.append(save_json(out, "flow_vs_gd", summary))
    summary["files"] = files
    return summary


def caption(s) -> list[str]:
    """Markdown lines for `results/index.md` from this experiment's summary."""
    errs = ", ".join(f"{_fmt(e, '.2e')} (η={_fmt(h)})" for h, e in zip(s["etas"], s["errors"]))
    def fate(ok, c, p, v, w):
        if not ok:
            return "diverged"
        if c:
            return f"converged, final η·S = {_fmt(v)}"
        if p:
            return f"oscillates with period 2, η·S alternating {_fmt(w)} / {_fmt(v)}"
        return f"not converged, final η·S = {_fmt(v)}"

    rows = "; ".join(
        f"{f:g}/S*: {fate(*a)}"
        for f, *a in zip(s["step_factors"], s["ok"], s["converged"], s["period2"],
                         s["final_eta_times_sharpness"], s["previous_eta_times_sharpness"])
    )
    return [
        f"Gradient descent vs gradient flow (depth {s['depth']}): max |θ_GD(k) − θ_GF(kη)| = "
        f"{errs}; fitted order {_fmt(s['order_slope'])} (theory: 1).",
        f"- large steps, S* = {_fmt(s['sharpness_at_flow_limit'])} the sharpness at the "
        f"flow's limit: {rows}.",
        f"- every converged run ends with η·sharpness ≤ 2: {s['converged_runs_end_below_2']}",
    ]


if __name__ == "__main__":
    cli(main, __doc__, "results/flow_vs_gd")
