"""Saddle-to-saddle dynamics from small initializations at depths 2, 3, 4 (README:
saddle-to-saddle): loss against rescaled time t / T_alpha (T_alpha = ln(1/alpha) for L = 2,
alpha^-(L-2) for L >= 3) for several alpha, with the jump times predicted by `dd.saddle_path`
marked, and the errors of the predicted jump times and saddles against the flows as alpha decreases.

The flows are long (t up to 1e13) and stiff on the plateaus; they are solved with scipy's
LSODA (it switches to BDF on the plateaus, docs/maths.md: numerics) in float64 on the layers.
Flow jump times come from `dd.detect_plateaus` on the saved loss curve.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

import ddln_jax as dd

from ._common import cli, fmt, save_figure, save_json, save_npz, setup

FULL_ESTIMATE = "about 2 minutes"
DEPTHS = (2, 3, 4)
# A problem whose path has a deactivation (coordinate 3 enters, then leaves).
X = np.array([
    [-0.3626, 1.8245, -0.7625, 2.8019, 1.5095],
    [0.1694, 0.9583, 0.4410, 0.3078, -1.7001],
    [0.4395, 1.0538, -1.5083, 1.9986, -0.8030],
])
Y = np.array([-1.0021, -0.0017, -0.1940])


def _layer_flow(layers0, ts):
    depth, d = layers0.shape

    def rhs(t, flat):
        u = flat.reshape(depth, d)
        g = 2.0 * X.T @ (X @ np.prod(u, 0) - Y)
        return np.stack([-np.prod(np.delete(u, j, 0), 0) * g for j in range(depth)]).ravel()

    sol = solve_ivp(rhs, (0.0, ts[-1]), layers0.ravel(), t_eval=ts, method="LSODA",
                    rtol=1e-10, atol=1e-13 * np.max(np.abs(layers0)))
    return sol.success, np.prod(sol.y.T.reshape(-1, depth, d), axis=1)


def _save_times(path, t_end, num):
    """Log-spaced saves, refined around each predicted jump (the drops last O(1) in t)."""
    tp = np.asarray(path.jump_times)
    windows = [np.linspace(t * 0.98, t * 1.02, 400) for t in tp]
    mids = np.sqrt(tp[:-1] * tp[1:])
    grid = np.concatenate([[0.0], np.geomspace(t_end * 1e-9, t_end, num), *windows, mids])
    return np.unique(grid), mids


def _match(pred, found):
    """Each detected jump against the nearest predicted one: (relative errors, predicted).
    Jumps the detector merges (plateaus too short or not flat at this alpha) are counted in
    the table, not in the error."""
    if found.size == 0:
        return np.full(1, np.inf), pred[:1]
    near = pred[np.argmin(np.abs(np.log(pred)[None] - np.log(found)[:, None]), axis=1)]
    return np.abs(found - near) / near, near


def _run(depth, alpha, num):
    layers0 = np.asarray(dd.init_yun(alpha, np.ones(X.shape[1]), depth))
    path = dd.saddle_path(layers0, dd.LeastSquares(X, Y))
    t_end = 4 * float(path.jump_times[-1]) + 20
    ts, mids = _save_times(path, t_end, num)
    ok, theta = _layer_flow(layers0, ts)
    loss = np.sum((theta @ X.T - Y) ** 2, axis=1)
    found = dd.detect_plateaus((ts, loss))
    pred = np.asarray(path.jump_times)
    rel, near = _match(pred, np.asarray(found.jump_times))
    probe = theta[np.searchsorted(ts, mids)]
    saddle_err = float(np.max(np.abs(probe - np.asarray(path.saddles)[1:-1])))
    row = {
        "depth": depth, "alpha": alpha, "ok": bool(ok), "predicted": pred,
        "detected": np.asarray(found.jump_times), "rescaled_predicted": path.rescaled_jump_times,
        "max_rel_jump_error": float(np.max(rel)),
        "max_rescaled_jump_error": float(np.max(rel * near) / float(path.time_scale)),
        "max_saddle_error": saddle_err, "num_predicted": int(pred.size),
        "num_detected": int(found.jump_times.shape[0]),
        "end_point_error": float(np.max(np.abs(theta[-1] - np.asarray(path.end_point)))),
    }
    return row, ts / float(path.time_scale), loss, path


def main(*, quick: bool = True, out="results/saddle_to_saddle", progress: bool = True) -> dict:
    out = setup(out)
    # L = 4 below alpha ~ 1e-4 (t ~ 1e9 and beyond) costs LSODA minutes per flow
    alphas = {2: (1e-2, 1e-4, 1e-6), 3: (1e-2, 1e-3, 1e-4), 4: (1e-1, 1e-2, 1e-3)}
    if not quick:
        alphas = {2: (1e-2, 1e-4, 1e-6, 1e-10, 1e-16), 3: (1e-2, 1e-3, 1e-4, 1e-6),
                  4: (1e-1, 1e-2, 1e-3, 1e-4)}
    num = 2000 if quick else 6000
    grid = [(d, a) for d in DEPTHS for a in alphas[d]]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    rows, data = [], {}
    for depth, alpha in tqdm(grid, desc="saddle_to_saddle", disable=not progress):
        row, tau, loss, path = _run(depth, alpha, num)
        rows.append(row)
        ax, i = axes[0, DEPTHS.index(depth)], alphas[depth].index(alpha)
        color = f"C{i}"
        ax.loglog(tau[1:], loss[1:], color=color, lw=1.2, label=f"α = {alpha:g}")
        for tj in np.asarray(path.rescaled_jump_times):
            ax.axvline(tj, color=color, ls=":", lw=0.8)
        data[f"tau_L{depth}_a{alpha:g}"], data[f"loss_L{depth}_a{alpha:g}"] = tau, loss
    for j, depth in enumerate(DEPTHS):
        scale = "ln(1/α)" if depth == 2 else ("α^-1" if depth == 3 else "α^-2")
        ax = axes[0, j]
        ax.set(title=f"L = {depth} (dotted: predicted jumps)", xlabel=f"t / {scale}",
               ylabel="loss ‖Xθ − y‖²", ylim=(1e-6, 3))
        ax.legend(fontsize=7)
        sub = [r for r in rows if r["depth"] == depth]
        a = [r["alpha"] for r in sub]
        axes[1, j].loglog(a, [r["max_rel_jump_error"] for r in sub], "o-", label="jump time (rel.)")
        axes[1, j].loglog(a, [r["max_saddle_error"] for r in sub], "s--", label="saddle (max |Δθ|)")
        axes[1, j].set(xlabel="α", ylabel="error vs flow", title=f"L = {depth}")
        axes[1, j].invert_xaxis()
        axes[1, j].legend(fontsize=7)
    files = save_figure(fig, out, "saddle_to_saddle")
    files.append(save_npz(out, "saddle_to_saddle", X=X, y=Y, **data))
    shrink = {}
    for depth in DEPTHS:
        sub = [r for r in rows if r["depth"] == depth]
        jumps = [r["max_rel_jump_error"] for r in sub]
        saddles = [r["max_saddle_error"] for r in sub]
        shrink[depth] = bool(np.all(np.diff(jumps) < 0) and np.all(np.diff(saddles) < 0))
    summary = {"rows": rows, "errors_shrink": shrink, "all_ok": all(r["ok"] for r in rows)}
    files.append(save_json(out, "saddle_to_saddle", summary))
    summary["files"] = files
    return summary


def caption(s) -> list[str]:
    """Markdown lines for `results/index.md` from this experiment's summary."""
    lines = [
        "Saddle-to-saddle: loss vs rescaled time at depths 2, 3, 4 (Yun init, "
        "X 3x5, a path with a deactivation), predicted jumps dotted; errors of predicted jump "
        "times (detected jumps vs the nearest predicted one) and saddles against LSODA flows "
        "shrink as α → 0: "
        + ", ".join(f"L = {d}: {v}" for d, v in s["errors_shrink"].items()) + ".",
        "",
        "| L | α | jumps pred./detected | max rel. jump-time error | max saddle error |",
        "|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['depth']} | {r['alpha']:g} | {r['num_predicted']}/{r['num_detected']} | "
            f"{fmt(r['max_rel_jump_error'])} | {fmt(r['max_saddle_error'])} |"
        )
    return lines


if __name__ == "__main__":
    cli(main, __doc__, "results/saddle_to_saddle")
