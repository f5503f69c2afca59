"""Speed, measured (never asserted): ratios against baselines measured in the same run.

    python -m experiments.bench              # quick: ~2 min on 2 CPU cores
    python -m experiments.bench --full       # B up to 4096

Problem: depth 6, dim 8, n 10, Gaussian inits at scale 1, T = 50, rtol 1e-8, atol 1e-10,
steady-state stop at ||grad L|| <= 1e-7 for every method (scipy: a terminal event).
Prints and writes JSON: compile time, trajectories/s and trajectory-steps/s (sum of own
steps / wall) of `dd.sweep`, of a plain `jax.vmap(gradient_flow)`, of a Python loop of jitted
single solves and of a scipy `solve_ivp` (DOP853) loop on a subset; lockstep efficiency.
"""

import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from scipy.integrate import solve_ivp

import ddln_jax as dd

from ._common import parser

FULL_ESTIMATE = ("about 6x the quick run (B up to 4096; estimated, not measured)")
DEPTH, DIM, N, T1, RTOL, ATOL, GTOL = 6, 8, 10, 50.0, 1e-8, 1e-10, 1e-7


def _scipy_solve(X, y, u0):
    def rhs(t, f):
        u = f.reshape(DEPTH, DIM)
        g = 2 * X.T @ (X @ np.prod(u, 0) - y)
        du = np.stack([-np.prod(np.delete(u, j, 0), 0) * g for j in range(DEPTH)])
        return du.ravel()

    def event(t, f):
        u = f.reshape(DEPTH, DIM)
        return np.max(np.abs(2 * X.T @ (X @ np.prod(u, 0) - y))) - GTOL

    event.terminal = True
    sol = solve_ivp(rhs, (0, T1), u0.ravel(), method="DOP853", rtol=RTOL, atol=ATOL,
                    events=event)
    return sol.nfev


def main(*, quick: bool = True, out="results/bench") -> dict:
    jax.config.update("jax_enable_x64", True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = (1, 64, 256) if quick else (1, 64, 1024, 4096)
    print(f"device: {jax.devices()[0]}", flush=True)
    kx, ky = jr.split(jr.key(0))
    X, y = jr.normal(kx, (N, DIM)), jr.normal(ky, (N,))
    problem = dd.LeastSquares(X, y)
    ts = jnp.linspace(0.0, T1, 200)
    report = {"device": str(jax.devices()[0]), "platform": platform.platform(), "rows": []}

    def inits(B):
        return jax.vmap(lambda k: dd.init_gaussian(k, DEPTH, DIM))(
            jax.vmap(lambda r: jr.fold_in(jr.key(0), r))(jnp.arange(B)))

    single = jax.jit(lambda u: dd.gradient_flow(u, problem, t1=T1, ts=ts, rtol=RTOL, atol=ATOL,
                                                stop_when_converged=GTOL))
    u1 = inits(1)[0]
    t = time.perf_counter()
    single(u1).theta.block_until_ready()
    compile_single = time.perf_counter() - t
    t = time.perf_counter()
    tr = single(u1)
    tr.theta.block_until_ready()
    run_single = time.perf_counter() - t
    t = time.perf_counter()
    nfev = _scipy_solve(np.asarray(X), np.asarray(y), np.asarray(u1))
    run_scipy = time.perf_counter() - t
    report["single"] = {"compile_s": compile_single, "run_s": run_single,
                        "steps": int(tr.num_steps), "scipy_run_s": run_scipy,
                        "scipy_nfev": int(nfev), "speedup_vs_scipy": run_scipy / run_single}
    print(f"one solve: compile {compile_single:.2f} s, run {run_single * 1e3:.1f} ms "
          f"({int(tr.num_steps)} steps); scipy DOP853 {run_scipy * 1e3:.1f} ms -> "
          f"{run_scipy / run_single:.1f}x")

    # scipy and the Python loop on a subset, scaled to B
    sub = inits(16)
    n_scipy = 4 if quick else 16
    t = time.perf_counter()
    for b in range(n_scipy):
        _scipy_solve(np.asarray(X), np.asarray(y), np.asarray(sub[b]))
    scipy_per = (time.perf_counter() - t) / n_scipy
    t = time.perf_counter()
    steps_loop = 0
    for b in range(16):
        r = single(sub[b])
        r.theta.block_until_ready()
        steps_loop += int(r.num_steps)
    loop_per = (time.perf_counter() - t) / 16

    vmapped = jax.jit(jax.vmap(lambda u: dd.gradient_flow(
        u, problem, t1=T1, ts=ts, rtol=RTOL, atol=ATOL, stop_when_converged=GTOL)))
    sweep_kw = dict(t1=T1, ts=ts, rtol=RTOL, atol=ATOL, stop_when_converged=GTOL, key=jr.key(0),
                    progress=False)
    # compile time of a sweep: first call minus a second identical one
    t = time.perf_counter()
    dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(1), **sweep_kw)
    first = time.perf_counter() - t
    t = time.perf_counter()
    dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(1), **sweep_kw)
    report["sweep_compile_s"] = first - (time.perf_counter() - t)
    print(f"sweep compile: {report['sweep_compile_s']:.1f} s", flush=True)
    vmap_cap = 64
    vmap_rate = {}
    for B in sizes:
        t = time.perf_counter()
        res = dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(B), **sweep_kw)
        sweep_s = time.perf_counter() - t
        # a plain vmap pays its slowest member for everyone: measured up to `vmap_cap`
        # trajectories (its rate only falls with B), reused above that
        Bv = min(B, vmap_cap)
        if Bv not in vmap_rate:
            u0 = inits(Bv)
            vmapped(u0).theta.block_until_ready()  # compile outside the timing
            t = time.perf_counter()
            v = vmapped(u0)
            v.theta.block_until_ready()
            vs = np.asarray(v.num_steps)
            vmap_rate[Bv] = (Bv / (time.perf_counter() - t), float(vs.sum() / (Bv * vs.max())))
        own = float(res.num_steps.sum())
        row = {
            "B": B,
            "sweep_s": sweep_s,
            "sweep_traj_per_s": B / sweep_s,
            "sweep_steps_per_s": own / sweep_s,
            "sweep_efficiency": [float(e) for e in res.efficiency],
            "sweep_overall_efficiency": float(res.overall_efficiency),
            "sweep_all_ok": bool(res.ok.all()),
            "sweep_implicit": int(res.implicit.sum()),
            "sweep_max_steps": int(res.num_steps.max()),
            "vmap_measured_B": Bv,
            "vmap_traj_per_s": vmap_rate[Bv][0],
            "vmap_efficiency": vmap_rate[Bv][1],
            "loop_traj_per_s": 1 / loop_per,
            "scipy_traj_per_s": 1 / scipy_per,
        }
        row["sweep_vs_scipy"] = row["sweep_traj_per_s"] / row["scipy_traj_per_s"]
        row["sweep_vs_vmap"] = row["sweep_traj_per_s"] / row["vmap_traj_per_s"]
        row["sweep_vs_loop"] = row["sweep_traj_per_s"] / row["loop_traj_per_s"]
        report["rows"].append(row)
        print(f"B={B:5d}: sweep {row['sweep_traj_per_s']:.1f} traj/s "
              f"({row['sweep_steps_per_s']:.3g} steps/s, efficiency "
              f"{row['sweep_overall_efficiency']:.2f} over the grid, per chunk "
              f"{min(row['sweep_efficiency']):.2f}-{max(row['sweep_efficiency']):.2f}, "
              f"{row['sweep_implicit']} implicit, all ok {row['sweep_all_ok']}); vmap(B={Bv}) "
              f"{row['vmap_traj_per_s']:.1f} traj/s (eff {row['vmap_efficiency']:.2f}); loop "
              f"{row['loop_traj_per_s']:.1f}; scipy {row['scipy_traj_per_s']:.2f} -> sweep/scipy "
              f"{row['sweep_vs_scipy']:.0f}x, sweep/vmap {row['sweep_vs_vmap']:.1f}x, "
              f"sweep/loop {row['sweep_vs_loop']:.1f}x", flush=True)

    # depths 2..8 padded into one sweep against one sweep per depth (compiles included)
    per_depth = 16 if quick else 64
    depths = list(range(2, 9))
    t = time.perf_counter()
    padded = dd.sweep(problem, depths=depths, scales=[1.0], seeds=range(per_depth), **sweep_kw)
    padded_s = time.perf_counter() - t
    t = time.perf_counter()
    for L in depths:
        dd.sweep(problem, depths=[L], scales=[1.0], seeds=range(per_depth), **sweep_kw)
    loop_s = time.perf_counter() - t
    report["depth_padding"] = {"depths": depths, "seeds_per_depth": per_depth,
                               "padded_s": padded_s, "per_depth_loop_s": loop_s,
                               "all_ok": bool(padded.ok.all())}
    print(f"depths 2..8 x {per_depth} seeds: padded sweep {padded_s:.1f} s, per-depth sweeps "
          f"{loop_s:.1f} s -> {loop_s / padded_s:.2f}x", flush=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    args = parser(__doc__, "bench", FULL_ESTIMATE, "results/bench").parse_args()
    main(quick=not args.full, out=args.out)
