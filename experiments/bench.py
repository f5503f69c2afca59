"""Speed and memory, measured (never asserted): ratios against baselines measured in the same run.

    python -m experiments.bench                   # quick: 12-13 min (2 shared CPU cores)
    python -m experiments.bench --full            # B up to 4096 (the headline row)
    python -m experiments.bench --solver dopri5   # also the B rows with dd.sweep(..., solver=)

Problem: depth 6, dim 8, n 10, Gaussian inits at scale 1, T = 50, rtol 1e-8, atol 1e-10,
steady-state stop at ||grad L||_inf <= 1e-7 for every method (scipy: a terminal event).
Prints one line per measurement and writes all of it to bench.json:

- one solve: compile and run of a jitted `gradient_flow`; scipy `solve_ivp` DOP853 and LSODA
  (plain: no jacobian, same rtol/atol and stop) on the same init; then loops of DOP853 and
  LSODA (4 and 8 inits, --full 16 each) and of jitted solves (16) per trajectory, with their
  stop times against the sweep's on the same inits.
- sweep compile time (first B = 1 call minus a second) and, per B (CPU: 1, 64, 256; --full:
  1, 64, 1024, 4096; accelerator: 1e4, 1e5, 1e6): trajectories/s and own steps/s (sum of
  per-trajectory steps / wall) of `dd.sweep`, lockstep efficiency, ratios to the DOP853 and
  LSODA loops with compile (a first call after `jax.clear_caches()`: every program this B
  needs is compiled in it, counted with jax.monitoring) and without (a second identical
  call, checked to give the same bits), to a plain `jax.vmap(gradient_flow)` (measured up to 64
  trajectories: its rate only falls with B) and to the loop of jitted solves; the
  engine counters of `res.info` when present (host syncs/s, bytes moved per retirement); with
  --solver NAME the same rows with `dd.sweep(..., solver=NAME)`. The largest B row is the
  headline (own steps/s; --full: B = 4096).
- depths 2..8 padded into one sweep against one sweep per depth (compiles included).
- three other problems (X, y from jr.key(1..3)) at B = 256 (--full 1024): a fresh sweep call
  after `jax.clear_caches()` (so its compiles are included) against DOP853 (2 inits, --full
  8), LSODA (4, --full 16) and vmap (up to 16 trajectories, --full 64), per problem.
- JAX's persistent compilation cache: the B = 256 (--full 1024) sweep of the B rows in a
  new process without it, then with an empty cache folder, then again (warm), each process's
  sweep call timed, and their results' bits compared.
- peak host memory, each run in its own process (ru_maxrss of RUSAGE_CHILDREN in a small
  launcher process): sweeps of B = 512 (--full 2048) trajectories x 2000 save times, in
  memory or streamed to `out=`, default memory budget or 2**24, next to the result's size
  and a baseline process (imports + a one-trajectory sweep); `dd.load_sweep` of the folder;
  a B = 256 sweep (it compiles the same programs, stiff members' included), and the memory
  each further trajectory costs: (peak(B) - peak(256)) / (result(B) - result(256)).
"""

import platform
import time
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import ddln_jax as dd

from ._bench_processes import compile_cache, memory
from ._bench_tools import (  # device_bench imports the problem and the counters from here
    ATOL,
    DEPTH,
    DIM,
    GTOL,
    RTOL,
    T1,
    N,
    _compiles,
    _counters,
    _counting_compiles,
    _scipy_loop,
    _scipy_solve,
    _x,
)
from ._cli import bench_parser
from ._common import save_json

FULL_ESTIMATE = "29.5 min measured, with other jobs running,"


KV_DEPTH, KV_DIM, KV_N, KV_T1 = 8, 100, 50, 100.0  # the stiff-flow row (issue 35)


def _kvaerno5_row() -> dict:
    """`gradient_flow` at depth 8, dim 100 (n 50, t1 100) with Kvaerno5 (its Newton systems
    solved by their structure) and with Tsit5: second-call times, steps, agreement."""
    kx, ky, ku = jr.split(jr.key(35), 3)
    p = dd.LeastSquares(jr.normal(kx, (KV_N, KV_DIM)), jr.normal(ky, (KV_N,)))
    u0 = dd.init_gaussian(ku, depth=KV_DEPTH, dim=KV_DIM)
    ts = jnp.linspace(0.0, KV_T1, 11)
    row = {"depth": KV_DEPTH, "dim": KV_DIM, "n": KV_N, "t1": KV_T1}
    trajs = {}
    for name in ("tsit5", "kvaerno5"):
        for call in ("first", "second"):
            t = time.perf_counter()
            trajs[name] = traj = dd.gradient_flow(u0, p, t1=KV_T1, ts=ts, solver=name)
            traj.theta.block_until_ready()
            row[f"{name}_{call}_s"] = time.perf_counter() - t
        row[f"{name}_steps"], row[f"{name}_ok"] = int(traj.num_steps), bool(traj.ok)
    a, b = np.asarray(trajs["kvaerno5"].theta), np.asarray(trajs["tsit5"].theta)
    row["max_rel_difference"] = float(np.abs(a - b).max() / np.abs(b).max())
    row["ratio"] = row["kvaerno5_second_s"] / row["tsit5_second_s"]
    print(f"stiff flow (depth {KV_DEPTH}, dim {KV_DIM}, n {KV_N}, t1 {KV_T1:g}), second calls: "
          f"Kvaerno5 {row['kvaerno5_second_s']:.2f} s ({row['kvaerno5_steps']} steps), Tsit5 "
          f"{row['tsit5_second_s']:.2f} s ({row['tsit5_steps']} steps): {row['ratio']:.1f}x; "
          f"max |theta difference| / max |theta| {row['max_rel_difference']:.1e}", flush=True)
    return row


def main(*, quick: bool = True, out="results/bench", solver: str | None = None) -> dict:
    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    accel = dev.platform != "cpu"
    sizes = (10**4, 10**5, 10**6) if accel else (1, 64, 256) if quick else (1, 64, 1024, 4096)
    vmap_cap = 64  # the B rows' vmap; the other problems' (below): 16 if quick
    print(f"device: {dev}; B sizes {sizes}", flush=True)
    counting = ExitStack()  # (closed at the end)
    compiled = counting.enter_context(_counting_compiles())
    kx, ky = jr.split(jr.key(0))
    X, y = jr.normal(kx, (N, DIM)), jr.normal(ky, (N,))
    problem = dd.LeastSquares(X, y)
    ts = jnp.linspace(0.0, T1, 200)
    report = {"device": str(dev), "platform": platform.platform(), "quick": quick,
              "solver": solver, "rows": [], "section_s": {}}
    sections = report["section_s"]

    def inits(B):
        return jax.vmap(lambda k: dd.init_gaussian(k, DEPTH, DIM))(
            jax.vmap(lambda r: jr.fold_in(jr.key(0), r))(jnp.arange(B)))

    def flow_of(p):
        return lambda u: dd.gradient_flow(u, p, t1=T1, ts=ts, rtol=RTOL, atol=ATOL,
                                          stop_when_converged=GTOL)

    def vmap_rate(p, Bv):
        """(traj/s, lockstep efficiency) of a plain vmap of `Bv` inits (compile excluded)."""
        vmapped = jax.jit(jax.vmap(flow_of(p)))
        u0 = inits(Bv)
        vmapped(u0).theta.block_until_ready()
        t = time.perf_counter()
        v = vmapped(u0)
        v.theta.block_until_ready()
        vs = np.asarray(v.num_steps)
        return Bv / (time.perf_counter() - t), float(vs.sum() / (Bv * vs.max()))

    # --- one solve -------------------------------------------------------------------------
    t_sec = time.perf_counter()
    single = jax.jit(flow_of(problem))
    u1 = inits(1)[0]
    t = time.perf_counter()
    single(u1).theta.block_until_ready()
    compile_single = time.perf_counter() - t
    t = time.perf_counter()
    tr = single(u1)
    tr.theta.block_until_ready()
    run_single = time.perf_counter() - t
    one = {"compile_s": compile_single, "run_s": run_single, "steps": int(tr.num_steps)}
    for m in ("DOP853", "LSODA"):
        t = time.perf_counter()
        sol = _scipy_solve(np.asarray(X), np.asarray(y), u1, m)
        s = time.perf_counter() - t
        one[m] = {"run_s": s, "nfev": int(sol.nfev), "event_stop": bool(sol.status == 1),
                  "speedup": s / run_single}
    # the former keys (DOP853)
    one.update(scipy_run_s=one["DOP853"]["run_s"], scipy_nfev=one["DOP853"]["nfev"],
               speedup_vs_scipy=one["DOP853"]["speedup"])
    report["single"] = one
    print(f"one solve: compile {compile_single:.2f} s, run {run_single * 1e3:.1f} ms "
          f"({one['steps']} steps); scipy DOP853 {one['DOP853']['run_s'] * 1e3:.0f} ms -> "
          f"{one['DOP853']['speedup']:.1f}x, LSODA {one['LSODA']['run_s'] * 1e3:.0f} ms -> "
          f"{one['LSODA']['speedup']:.1f}x", flush=True)

    # scipy and the Python loop on a subset, per trajectory
    sub = inits(16)
    dop = _scipy_loop(X, y, sub[:4 if quick else 16], "DOP853")
    lsoda = _scipy_loop(X, y, sub[:8 if quick else 16], "LSODA")
    report["scipy"] = {"DOP853": dop, "LSODA": lsoda}
    t = time.perf_counter()
    for b in range(16):
        single(sub[b]).theta.block_until_ready()
    loop_per = (time.perf_counter() - t) / 16
    print(f"subset loops: DOP853 {dop['traj_per_s']:.3f} traj/s ({dop['n']} inits, "
          f"{dop['event_stops']} stopped by the gtol event), LSODA {lsoda['traj_per_s']:.3f} "
          f"traj/s ({lsoda['n']} inits, {lsoda['event_stops']} event stops), jitted "
          f"gradient_flow loop {1 / loop_per:.1f} traj/s (16 inits)", flush=True)
    sections["one_solve_and_subsets"] = time.perf_counter() - t_sec

    # --- sweep compile and the B rows ------------------------------------------------------
    t_sec = time.perf_counter()
    sweep_kw = dict(t1=T1, ts=ts, rtol=RTOL, atol=ATOL, stop_when_converged=GTOL, key=jr.key(0),
                    progress=False)

    def compile_time(**kw):
        """First call minus a second identical one (B = 1)."""
        t = time.perf_counter()
        dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(1), **sweep_kw, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(1), **sweep_kw, **kw)
        return first - (time.perf_counter() - t)

    with _compiles(compiled) as c:
        report["sweep_compile_s"] = compile_time()
    print(f"sweep compile: {report['sweep_compile_s']:.1f} s (first B=1 call minus a second; "
          f"{c['n']} backend compiles, {c['s']:.1f} s); 'with compile' below: a first call "
          f"at that B", flush=True)
    if solver is not None:
        try:
            report["solver_compile_s"] = compile_time(solver=solver)
            print(f"solver={solver!r} compile: {report['solver_compile_s']:.1f} s", flush=True)
        except TypeError as e:
            print(f"dd.sweep has no `solver=` yet ({e}); --solver {solver} skipped", flush=True)
            report["solver_error"] = str(e)
            solver = None
    vmap_cache = {}
    for B in sizes:
        # a first call with nothing compiled (what a user's first call in a fresh process
        # costs: every program this B needs, the stiff members' Kvaerno5 included), then a
        # second identical call (nothing to compile: the stepping alone)
        jax.clear_caches()
        with _compiles(compiled) as c_first:
            t = time.perf_counter()
            first = dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(B), **sweep_kw)
            first_s = time.perf_counter() - t
        with _compiles(compiled) as c_row:
            t = time.perf_counter()
            res = dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(B), **sweep_kw)
            sweep_s = time.perf_counter() - t
        same_bits = bool(np.array_equal(first.theta, res.theta, equal_nan=True)
                         and np.array_equal(first.num_steps, res.num_steps))
        del first
        # a plain vmap pays its slowest member for everyone: measured up to `vmap_cap`
        # trajectories (its rate only falls with B), reused above that
        Bv = min(B, vmap_cap)
        if Bv not in vmap_cache:
            vmap_cache[Bv] = vmap_rate(problem, Bv)
        own = float(res.num_steps.sum())
        rate, rate_c = B / sweep_s, B / first_s
        row = {
            "B": B,
            "sweep_s": sweep_s,
            "sweep_with_compile_s": first_s,
            "first_call_compiles": c_first["n"],
            "first_call_compile_s": c_first["s"],
            "first_minus_second_s": first_s - sweep_s,
            "first_and_second_same_bits": same_bits,
            "sweep_traj_per_s": rate,
            "sweep_steps_per_s": own / sweep_s,
            "sweep_steps_per_s_with_compile": own / first_s,
            "sweep_efficiency": [float(e) for e in res.efficiency],
            "sweep_overall_efficiency": float(res.overall_efficiency),
            "sweep_all_ok": bool(res.ok.all()),
            "sweep_implicit": int(res.implicit.sum()),
            "sweep_max_steps": int(res.num_steps.max()),
            "vmap_measured_B": Bv,
            "vmap_traj_per_s": vmap_cache[Bv][0],
            "vmap_efficiency": vmap_cache[Bv][1],
            "loop_traj_per_s": 1 / loop_per,
            "scipy_traj_per_s": dop["traj_per_s"],
            "lsoda_traj_per_s": lsoda["traj_per_s"],
            "counters": _counters(res.info, sweep_s),
            "compiles_in_run": c_row["n"],
            "compile_s_in_run": c_row["s"],
        }
        row["sweep_vs_scipy"] = rate / dop["traj_per_s"]
        row["sweep_vs_dop853_with_compile"] = rate_c / dop["traj_per_s"]
        row["sweep_vs_lsoda"] = rate / lsoda["traj_per_s"]
        row["sweep_vs_lsoda_with_compile"] = rate_c / lsoda["traj_per_s"]
        row["sweep_vs_vmap"] = rate / row["vmap_traj_per_s"]
        row["sweep_vs_loop"] = rate * loop_per
        print(f"B={B:5d}: sweep {rate:.1f} traj/s ({row['sweep_steps_per_s']:.3g} steps/s, eff "
              f"{row['sweep_overall_efficiency']:.2f} grid, {min(row['sweep_efficiency']):.2f}-"
              f"{max(row['sweep_efficiency']):.2f} per chunk, {row['sweep_implicit']} implicit, "
              f"ok {row['sweep_all_ok']}; first call {first_s:.1f} s with {c_first['n']} "
              f"compiles ({c_first['s']:.1f} s of compiling), second {sweep_s:.1f} s with "
              f"{c_row['n']}, same bits {same_bits}) -> /DOP853 {_x(row['sweep_vs_scipy'])} "
              f"({_x(row['sweep_vs_dop853_with_compile'])} with compile), /LSODA "
              f"{_x(row['sweep_vs_lsoda'])} ({_x(row['sweep_vs_lsoda_with_compile'])}), "
              f"/vmap(B={Bv}, eff {row['vmap_efficiency']:.2f}) {_x(row['sweep_vs_vmap'])}, "
              f"/loop {_x(row['sweep_vs_loop'])}", flush=True)
        c = row["counters"]
        if c["host_syncs"] is None and c["bytes_to_host"] is None:
            print("        engine counters: not in res.info", flush=True)
        else:
            syncs = "n/a" if c["host_syncs_per_s"] is None else f"{c['host_syncs_per_s']:.1f}"
            per = ("n/a" if c["bytes_per_retirement"] is None
                   else f"{c['bytes_per_retirement']:.3g}")
            print(f"        engine counters: {syncs} host syncs/s, {per} bytes per retirement "
                  f"({c['retirements']} retirements"
                  + ("" if c["compiles"] is None else f", {c['compiles']} compiles") + ")",
                  flush=True)
        if solver is not None:
            t = time.perf_counter()
            rs = dd.sweep(problem, depths=[DEPTH], scales=[1.0], seeds=range(B), **sweep_kw,
                          solver=solver)
            s_s = time.perf_counter() - t
            own_s = float(rs.num_steps.sum())
            row["solver"] = {"name": solver, "s": s_s, "steps_per_s": own_s / s_s,
                             "traj_per_s": B / s_s, "vs_fast_path": sweep_s / s_s,
                             "all_ok": bool(rs.ok.all()), "counters": _counters(rs.info, s_s)}
            print(f"        solver={solver}: {B / s_s:.1f} traj/s ({own_s / s_s:.3g} steps/s, "
                  f"ok {bool(rs.ok.all())}) -> {sweep_s / s_s:.2f}x the fast path", flush=True)
        report["rows"].append(row)
    # the same stop for every method? stop times on the subset's inits against the sweep's
    n_sub = max(dop["n"], lsoda["n"])
    if res.t_final.size >= n_sub:
        t_sweep = np.asarray(res.t_final[:n_sub])
        early = {m: int(sum(te < ts_ - 1e-3 for te, ts_ in zip(r["t_end"], t_sweep)))
                 for m, r in (("DOP853", dop), ("LSODA", lsoda))}
        report["scipy"]["stops"] = {"sweep_gtol_stops": int((t_sweep < T1).sum()), "n": n_sub,
                                    "earlier_than_sweep": early}
        print(f"stop times on the subset inits: sweep stopped by gtol before T1 on "
              f"{int((t_sweep < T1).sum())}/{n_sub}; earlier than the sweep: DOP853 on "
              f"{early['DOP853']}/{dop['n']}, LSODA on {early['LSODA']}/{lsoda['n']} (an earlier "
              f"stop is less time integrated: less work)", flush=True)
    head = report["rows"][-1]
    report["headline"] = {"B": head["B"], "own_steps_per_s": head["sweep_steps_per_s"],
                          "own_steps_per_s_with_compile": head["sweep_steps_per_s_with_compile"]}
    note = ("" if not quick or accel else
            " (quick run: the headline row is --full's B=4096)")
    print(f"{'=' * 20} HEADLINE B={head['B']}: own steps/s {head['sweep_steps_per_s']:.3g} "
          f"({head['sweep_steps_per_s_with_compile']:.3g} with compile){note} {'=' * 20}",
          flush=True)
    sections["B_rows"] = time.perf_counter() - t_sec

    # --- depths 2..8 padded into one sweep against one sweep per depth (compiles included) --
    t_sec = time.perf_counter()
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
    sections["depth_padding"] = time.perf_counter() - t_sec

    # --- other problems: sweep with its compile against DOP853, LSODA, vmap -----------------
    t_sec = time.perf_counter()
    seed_B = 256 if quick else 1024
    n_dop, n_lsoda = (2, 4) if quick else (8, 16)
    report["problems"] = []
    for k in (1, 2, 3):
        kx, ky = jr.split(jr.key(k))
        Xk, yk = jr.normal(kx, (N, DIM)), jr.normal(ky, (N,))
        pk = dd.LeastSquares(Xk, yk)
        jax.clear_caches()  # a fresh call compiles everything, as in a new process
        with _compiles(compiled) as c:
            t = time.perf_counter()
            res = dd.sweep(pk, depths=[DEPTH], scales=[1.0], seeds=range(seed_B), **sweep_kw)
            s = time.perf_counter() - t
        Bv = min(seed_B, 16 if quick else vmap_cap)
        v_rate, v_eff = vmap_rate(pk, Bv)
        d_k = _scipy_loop(Xk, yk, sub[:n_dop], "DOP853")
        l_k = _scipy_loop(Xk, yk, sub[:n_lsoda], "LSODA")
        rate = seed_B / s
        row = {"key": k, "B": seed_B, "sweep_with_compile_s": s, "compiles": c["n"],
               "compile_s": c["s"], "sweep_traj_per_s_with_compile": rate,
               "sweep_steps_per_s_with_compile": float(res.num_steps.sum()) / s,
               "sweep_all_ok": bool(res.ok.all()), "sweep_implicit": int(res.implicit.sum()),
               "DOP853": d_k, "LSODA": l_k, "vmap_measured_B": Bv, "vmap_traj_per_s": v_rate,
               "vmap_efficiency": v_eff, "sweep_vs_dop853": rate / d_k["traj_per_s"],
               "sweep_vs_lsoda": rate / l_k["traj_per_s"], "sweep_vs_vmap": rate / v_rate}
        report["problems"].append(row)
        print(f"problem jr.key({k}), B={seed_B}: sweep {s:.1f} s incl. compile (fresh call after "
              f"jax.clear_caches(): {c['n']} compiles, {c['s']:.1f} s) = {rate:.1f} traj/s, "
              f"{row['sweep_implicit']} implicit, ok {row['sweep_all_ok']}; DOP853 "
              f"{d_k['traj_per_s']:.3f} ({n_dop} inits), LSODA {l_k['traj_per_s']:.3f} "
              f"({n_lsoda}), vmap(B={Bv}) {v_rate:.2f} (eff {v_eff:.2f}) -> /DOP853 "
              f"{_x(row['sweep_vs_dop853'])}, /LSODA {_x(row['sweep_vs_lsoda'])}, /vmap "
              f"{_x(row['sweep_vs_vmap'])}", flush=True)
    sections["problems"] = time.perf_counter() - t_sec

    # --- JAX's persistent compilation cache and peak host memory, in child processes ------
    t_sec = time.perf_counter()
    report["compile_cache"] = compile_cache(ts.shape[0], quick)
    sections["compile_cache"] = time.perf_counter() - t_sec
    t_sec = time.perf_counter()
    report["memory"] = memory(quick)
    sections["memory"] = time.perf_counter() - t_sec

    # --- one stiff flow: gradient_flow's Kvaerno5 (structured Newton) against Tsit5 --------
    t_sec = time.perf_counter()
    report["kvaerno5_flow"] = _kvaerno5_row()
    sections["kvaerno5_flow"] = time.perf_counter() - t_sec

    report["total_s"] = time.perf_counter() - start
    print("sections (s): " + ", ".join(f"{k} {v:.0f}" for k, v in sections.items())
          + f"; total {report['total_s']:.0f}", flush=True)
    save_json(out, "bench", report)
    counting.close()
    return report


if __name__ == "__main__":
    args = bench_parser(__doc__, FULL_ESTIMATE).parse_args()
    main(quick=not args.full, out=args.out, solver=args.solver)
