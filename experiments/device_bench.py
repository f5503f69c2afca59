"""The sweep's rows alone, under a time budget: the prepared script for a device lent for a few
minutes (a GPU), which runs on a CPU too.

    python -m experiments.device_bench                      # accelerator: B = 1e4, 1e5, 1e6
    python -m experiments.device_bench --sizes 1024,4096    # CPU default: 256, 1024
    python -m experiments.device_bench --budget-s 300       # stop planning rows after 300 s

The problem of `experiments.bench` (depth 6, dim 8, n 10, Gaussian inits at scale 1, T = 50, 200
save times, rtol 1e-8, atol 1e-10, steady-state stop at ||grad L||_inf <= 1e-7). The first size
runs twice: a first call after `jax.clear_caches()` (every program compiled in it, counted with
jax.monitoring) and a second identical call (the same bits, checked). Each larger size runs once
(with B at least the slots, 2^14 per accelerator, the slot arrays keep their shapes: nothing new
is compiled, the count says so) if its projected time (the last row's trajectories per second,
1.25x) fits the budget left; else it is skipped, with the projection. Per row: wall time,
trajectories/s, own steps/s (the sum of each trajectory's steps over the wall time), host
syncs/s and bytes moved per retirement (`res.info`), lockstep efficiency, members finished by
Kvaerno5, and the device's peak memory where it reports one. Rows are checked against an
independent method: the first `--check` grid points solved one by one with `dd.gradient_flow`
(diffrax's Tsit5, rtol 1e-10) on the same device; the largest difference of theta at the save
times, relative to max |theta|, must be below 1e-5 (the sweep's rtol is 1e-8; the flow amplifies
round-off).

Writes device_bench.json after every row: a cut-off run keeps the rows it finished.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import ddln_jax as dd

from ._cli import device_bench_parser
from ._common import save_json
from .bench import ATOL, DEPTH, DIM, GTOL, RTOL, T1, N, _compiles, _counters, _counting_compiles

CHECK_TOL = 1e-5  # theta against gradient_flow, relative to max |theta|
MARGIN = 1.25  # a row's projected time: the last row's rate, with this margin


def _reference_error(problem, res, ts, n: int) -> float:
    """Largest |theta_sweep - theta_flow| over the save times of the first `n` grid points,
    relative to max |theta| there; theta_flow from `dd.gradient_flow` at rtol 1e-10."""
    flow = jax.jit(lambda u: dd.gradient_flow(u, problem, t1=T1, ts=ts, rtol=1e-10,
                                              atol=1e-12, stop_when_converged=GTOL))
    worst = 0.0
    for b in range(n):
        want = np.asarray(flow(jnp.asarray(res.layers0[b])).theta)
        got = np.asarray(res.theta[b])
        worst = max(worst, float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    return worst


def _peak_device_bytes(dev) -> int | None:
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def main(*, sizes=None, budget_s: float = 420.0, check: int = 4,
         out="results/device_bench") -> dict:
    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    accel = dev.platform != "cpu"
    sizes = sorted(sizes or ((10**4, 10**5, 10**6) if accel else (256, 1024)))
    kx, ky = jr.split(jr.key(0))
    problem = dd.LeastSquares(jr.normal(kx, (N, DIM)), jr.normal(ky, (N,)))
    ts = jnp.linspace(0.0, T1, 200)
    kw = dict(depths=[DEPTH], scales=[1.0], t1=T1, ts=ts, rtol=RTOL, atol=ATOL,
              stop_when_converged=GTOL, key=jr.key(0), progress=False)
    report = {"device": str(dev), "device_kind": dev.device_kind, "platform": dev.platform,
              "devices": jax.device_count(), "jax": jax.__version__, "budget_s": budget_s,
              "sizes": sizes, "rows": [], "skipped": []}
    print(f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} devices); "
          f"B {sizes}; budget {budget_s:.0f} s", flush=True)
    rate = None  # trajectories per second of the last row
    with _counting_compiles() as compiled:
        for i, B in enumerate(sizes):
            left = budget_s - (time.perf_counter() - start)
            projected = None if rate is None else MARGIN * B / rate * (2 if i == 0 else 1)
            if projected is not None and projected > left:
                report["skipped"].append({"B": B, "projected_s": projected, "left_s": left})
                print(f"B={B}: skipped (projected {projected:.0f} s, {left:.0f} s left)",
                      flush=True)
                continue
            row = {"B": B}
            if i == 0:  # a first call with nothing compiled, then the same call again
                jax.clear_caches()
                with _compiles(compiled) as c:
                    t = time.perf_counter()
                    first = dd.sweep(problem, seeds=range(B), **kw)
                    row["first_call_s"] = time.perf_counter() - t
                row.update(first_call_compiles=c["n"], first_call_compile_s=c["s"])
            with _compiles(compiled) as c:
                t = time.perf_counter()
                res = dd.sweep(problem, seeds=range(B), **kw)
                wall = time.perf_counter() - t
            if i == 0:
                row["first_and_second_same_bits"] = bool(
                    np.array_equal(first.theta, res.theta, equal_nan=True)
                    and np.array_equal(first.num_steps, res.num_steps))
                del first
            rate = B / wall
            steps = float(np.sum(res.num_steps))
            row.update(
                wall_s=wall, compiles=c["n"], compile_s=c["s"], traj_per_s=rate,
                own_steps_per_s=steps / wall, overall_efficiency=float(res.overall_efficiency),
                min_chunk_efficiency=float(np.min(res.efficiency)),
                implicit=int(np.sum(res.implicit)), all_ok=bool(np.all(res.ok)),
                counters=_counters(res.info, wall), peak_device_bytes=_peak_device_bytes(dev),
                check_rows=min(check, B))
            row["check_max_rel_error"] = _reference_error(problem, res, ts, row["check_rows"])
            row["check_ok"] = row["check_max_rel_error"] < CHECK_TOL
            del res
            report["rows"].append(row)
            save_json(out, "device_bench", report)
            cnt = row["counters"]
            syncs = cnt["host_syncs_per_s"]
            per = cnt["bytes_per_retirement"]
            print(f"B={B}: {wall:.1f} s ({row['compiles']} compiles), {rate:.0f} traj/s, "
                  f"{row['own_steps_per_s']:.3g} own steps/s, eff {row['overall_efficiency']:.2f}"
                  f" (chunks >= {row['min_chunk_efficiency']:.2f}), {row['implicit']} implicit, "
                  f"ok {row['all_ok']}; "
                  + ("" if syncs is None else f"{syncs:.1f} host syncs/s, ")
                  + ("" if per is None else f"{per:.3g} bytes per retirement; ")
                  + ("" if i else f"first call {row['first_call_s']:.1f} s "
                     f"({row['first_call_compiles']} compiles, {row['first_call_compile_s']:.1f}"
                     f" s), same bits {row['first_and_second_same_bits']}; ")
                  + f"vs gradient_flow {row['check_max_rel_error']:.1e} "
                  f"({'ok' if row['check_ok'] else 'FAILED'})", flush=True)
    report["total_s"] = time.perf_counter() - start
    save_json(out, "device_bench", report)
    print(f"total {report['total_s']:.0f} s; {out / 'device_bench.json'}", flush=True)
    return report


if __name__ == "__main__":
    cli = device_bench_parser(__doc__)
    args = cli.parse_args()
    main(sizes=None if args.sizes is None else [int(float(s)) for s in args.sizes.split(",")],
         budget_s=args.budget_s, check=args.check, out=args.out)
