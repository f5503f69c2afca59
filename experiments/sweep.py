"""A depth x scale x seed sweep from the command line, resumable, shared by any number of
processes, with a phase diagram. Random least-squares problem (X 10x8, fixed), Gaussian inits,
steady-state stop. The figure shows, per (depth, scale), the median time to reach
L - L* < 1e-10 and the fraction of seeds that got there within t1.

    python -m experiments.sweep                       # quick grid, results/sweep
    python -m experiments.sweep --full --seeds 256    # paper grid
    python -m experiments.sweep --load --out results/sweep   # summarise a folder (partial too)

Several processes (one per GPU, or one per SLURM task) run one grid when started with the
same arguments and the same `--out` (on a shared filesystem): they share the work through
lease files in `OUT/chunks`. JAX's distributed runtime is optional: `--distributed` calls
`jax.distributed.initialize()` (cluster auto-detection: SLURM, Open MPI, ...), or give
`--coordinator HOST:PORT --num-processes N --process-id I`. Without it the processes are
independent (a process that dies does not stop the others; its chunks are taken over once
its leases expire).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd
from ddln_jax.plotting import heatmap

from ._cli import sweep_parser
from ._common import save_figure, save_json, save_npz, setup, time_to_reach

FULL_ESTIMATE = "768 trajectories: minutes, not measured"
QUICK = dict(depths=(2, 3, 4), scales=(0.75, 1.0, 1.5), seeds=4, t1=100.0)
FULL = dict(depths=(2, 3, 4, 6), scales=(0.5, 1.0, 1.5), seeds=64, t1=500.0)


def _problem():
    kx, ky = jr.split(jr.key(2024))
    return dd.LeastSquares(jr.normal(kx, (10, 8)), jr.normal(ky, (10,)))


def main(*, quick: bool = True, out="results/sweep", depths=None, scales=None, seeds=None,
         t1=None, init="gaussian", max_chunk: int = 256, lease_timeout: float = 120.0,
         load: bool = False, progress=True) -> dict:
    out = setup(out)
    size = QUICK if quick else FULL
    # an explicit value is used (and checked by `dd.sweep`), never replaced by the default
    depths = size["depths"] if depths is None else depths
    scales = size["scales"] if scales is None else scales
    seeds = size["seeds"] if seeds is None else seeds
    t1 = size["t1"] if t1 is None else t1
    problem = _problem()
    if load:
        res = dd.load_sweep(out / "chunks")
    else:
        res = dd.sweep(problem, depths=depths, scales=scales, seeds=seeds, t1=t1,
                       ts=jnp.linspace(0.0, t1, 200), init=init, stop_when_converged=1e-7,
                       out=out / "chunks", max_chunk=max_chunk, lease_timeout=lease_timeout,
                       progress=progress, key=jr.key(0))
    summary = _summarise(res, problem)
    if jax.process_index() == 0:
        summary["files"] = _write(out, res, summary)
    return summary


def _summarise(res, problem) -> dict:
    depths = list(dict.fromkeys(res.depth.tolist()))
    scales = list(dict.fromkeys(res.scale.tolist()))
    sub = np.asarray(problem.suboptimality(jnp.asarray(np.nan_to_num(res.theta))))
    reach = np.array([time_to_reach(res.ts, s) if d else np.nan for s, d in zip(sub, res.done)])
    shape = (len(depths), len(scales))
    median, frac = np.full(shape, np.nan), np.full(shape, np.nan)
    for i, L in enumerate(depths):
        for j, s in enumerate(scales):
            r = reach[(res.depth == L) & (res.scale == s) & res.done]
            if r.size:
                frac[i, j] = np.mean(np.isfinite(r))
            if np.isfinite(r).any():
                median[i, j] = np.median(r[np.isfinite(r)])
    return {
        "depths": depths, "scales": scales, "seeds": len(set(res.seed.tolist())),
        "t1": float(res.info["t1"]), "done": int(res.done.sum()), "total": int(res.done.size),
        "median_time": median, "fraction_converged": frac, "time_to_1e_10": reach,
        "all_ok": bool(res.ok[res.done].all()), "implicit": int(res.implicit.sum()),
        "lockstep_efficiency": res.efficiency, "overall_efficiency": res.overall_efficiency,
    }


def _write(out: Path, res, s: dict) -> list[str]:
    """Figure and files, written in a private folder and moved into place (other processes
    of the same sweep may write them too)."""
    t1 = s["t1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    heatmap(axes[0], np.where(np.isfinite(s["median_time"]), s["median_time"], t1),
            s["scales"], s["depths"], title="median time to L - L* < 1e-10", fmt="{:.3g}",
            label="median time")
    # fractions on a fixed 0..1 scale (a constant panel would otherwise get an arbitrary one)
    heatmap(axes[1], s["fraction_converged"], s["scales"], s["depths"],
            title=f"fraction converged by t = {t1:g}", fmt="{:.2f}", log=False, vmin=0.0,
            vmax=1.0, label="fraction of seeds")
    for ax in axes:
        ax.set_xlabel("init scale")
        ax.set_ylabel("depth")
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".write-"))
    try:
        names = save_figure(fig, tmp, "sweep_phase_diagram")
        names.append(save_npz(tmp, "sweep", **res.to_dict()))
        names.append(save_json(tmp, "sweep", {k: v for k, v in s.items()
                                              if k != "time_to_1e_10"}))
        files = []
        for name in names:
            files.append(str(out / Path(name).name))
            os.replace(name, files[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def caption(s) -> list[str]:
    """A readable summary: one table row per (depth, scale)."""
    lines = [
        f"Sweep: {s['done']} of {s['total']} trajectories done "
        f"({len(s['depths'])} depths x {len(s['scales'])} scales x {s['seeds']} seeds, "
        f"t1 = {s['t1']:g}); all ok: {s['all_ok']}; {s['implicit']} finished by the Kvaerno5 "
        "phase (stiff members); lockstep efficiency over the grid "
        f"{s['overall_efficiency']:.2f}.",
        "",
        "| depth | scale | median time to L - L* < 1e-10 | fraction converged |",
        "|---|---|---|---|",
    ]
    for i, L in enumerate(s["depths"]):
        for j, sc in enumerate(s["scales"]):
            m, f = s["median_time"][i, j], s["fraction_converged"][i, j]
            lines.append(f"| {L} | {sc:g} | {'-' if np.isnan(m) else f'{m:.3g}'} | "
                         f"{'-' if np.isnan(f) else f'{f:.2f}'} |")
    return lines


def _parse(argv=None):
    return sweep_parser(__doc__, QUICK, FULL, FULL_ESTIMATE).parse_args(argv)


if __name__ == "__main__":
    a = _parse()
    if a.distributed or a.coordinator:
        jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    try:
        summary = main(quick=not a.full, out=a.out, depths=a.depths, scales=a.scales,
                       seeds=a.seeds, t1=a.t1, init=a.init, max_chunk=a.max_chunk,
                       lease_timeout=a.lease_timeout, load=a.load)
    except KeyboardInterrupt:
        print("\ninterrupted: finished trajectories saved; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # everything is on disk; skip the interpreter's teardown, during which XLA's runtime
        # sometimes aborted after an interrupt (seen 2 in 8: "terminate called ...")
        os._exit(130)
    print("\n".join(caption(summary)))
    if summary.get("files"):
        print(f"\nfiles: {', '.join(summary['files'])}")
