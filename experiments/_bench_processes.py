"""The bench's measurements in child processes: JAX's persistent compilation cache (a new
process without it, with an empty cache, with a warm one) and peak host memory (each sweep in
its own process, its peak RSS read by a small launcher)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ._bench_tools import ATOL, DEPTH, DIM, GTOL, RTOL, T1, N

MEM_T = 2000  # save times of the memory rows
MEM_REF_B = 256  # the memory rows' reference sweep (the same compiled programs, a small result)

# a child process of the memory rows: imports jax + ddln_jax only, runs one sweep (or
# `load_sweep`), prints its numbers as one JSON line; the parent reads its peak RSS
_CHILD = r"""
import json, resource, sys, time
spec = json.loads(sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, jax.random as jr
import ddln_jax as dd
rep = {"import_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
t = time.perf_counter()
if spec["load"]:
    res = dd.load_sweep(spec["out"])
else:
    kx, ky = jr.split(jr.key(0))
    X, y = jr.normal(kx, (spec["n"], spec["dim"])), jr.normal(ky, (spec["n"],))
    kw = {} if spec["budget"] is None else {"memory_budget": spec["budget"]}
    res = dd.sweep(dd.LeastSquares(X, y), depths=[spec["depth"]], scales=[1.0],
                   seeds=range(spec["B"]), t1=spec["t1"],
                   ts=jnp.linspace(0.0, spec["t1"], spec["T"]),
                   rtol=spec["rtol"], atol=spec["atol"], stop_when_converged=spec["gtol"],
                   key=jr.key(0), progress=False, out=spec["out"], **kw)
rep["wall_s"] = time.perf_counter() - t
rep["theta_bytes"] = int(res.theta.nbytes)
rep["result_bytes"] = int(sum(getattr(a, "nbytes", 0) for a in res.to_dict().values()))
rep["all_ok"] = bool(res.ok.all())
rep["steps"] = int(res.num_steps.sum())
rep["self_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if spec.get("hash"):  # the result's bits (only where memory is not measured: it reads theta)
    import hashlib
    import numpy as np
    h = hashlib.sha1(np.ascontiguousarray(res.theta))
    h.update(np.ascontiguousarray(res.num_steps))
    rep["sha1"] = h.hexdigest()
try:  # the kernel's high-water mark of this process's memory (a cross-check)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    rep["vmhwm_kb"] = int(status.split()[0])
except (OSError, IndexError, ValueError):
    rep["vmhwm_kb"] = None
print("CHILD " + json.dumps(rep), flush=True)
"""

# runs one command and prints its output and then its peak RSS: a small process, so the
# command does not inherit the bench's high-water mark
_LAUNCH = r"""
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
print(p.stdout, end="")
print("RUSAGE", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(p.returncode)
"""


def _run_child(spec: dict, env: dict | None = None) -> dict:
    """Run `_CHILD` with `spec` under `_LAUNCH` (with `env` added to the environment); the
    child's peak RSS is the launcher's RUSAGE_CHILDREN ru_maxrss (it has one child). Not from
    this process: a child exec'd from a process inherits its high-water mark (ru_maxrss would
    be this process's RSS at least)."""
    cmd = [sys.executable, "-c", _LAUNCH, sys.executable, "-c", _CHILD, json.dumps(spec)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=None if env is None else {**os.environ, **env})
    line = [s for s in p.stdout.splitlines() if s.startswith("CHILD ")]
    usage = [s for s in p.stdout.splitlines() if s.startswith("RUSAGE ")]
    if p.returncode or not line or not usage:
        raise RuntimeError(f"memory child failed ({p.returncode}):\n{p.stdout[-3000:]}")
    rep = json.loads(line[-1][6:])
    rep["peak_rss_kb"] = int(usage[-1].split()[1])  # kilobytes on Linux
    return rep


def compile_cache(num_ts: int, quick: bool) -> dict:
    """A B = 256 (--full 1024) sweep in a new process: no cache, an empty cache, a warm one."""
    cache_B = 256 if quick else 1024
    spec = dict(B=cache_B, T=num_ts, n=N, dim=DIM, depth=DEPTH, t1=T1, rtol=RTOL,
                atol=ATOL, gtol=GTOL, out=None, budget=None, load=False, hash=True)
    with tempfile.TemporaryDirectory(prefix="ddln_cache_") as tmp:
        env = {"JAX_COMPILATION_CACHE_DIR": tmp,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        runs = {"none": _run_child(spec), "cold": _run_child(spec, env),
                "warm": _run_child(spec, env)}
    same = len({r["sha1"] for r in runs.values()}) == 1
    rep = {"B": cache_B, "same_bits": same, **{k: r["wall_s"] for k, r in runs.items()}}
    print(f"persistent compilation cache (JAX_COMPILATION_CACHE_DIR, min compile time 0), "
          f"B={cache_B}, a dd.sweep call in a new process: no cache {runs['none']['wall_s']:.1f}"
          f" s, cold cache {runs['cold']['wall_s']:.1f} s, warm cache (a second process) "
          f"{runs['warm']['wall_s']:.1f} s; same bits {same}", flush=True)
    return rep


def memory(quick: bool) -> dict:
    """Peak RSS of sweeps in memory and streamed to `out=`, at two memory budgets, against a
    baseline process, a B = 256 reference and `dd.load_sweep`."""
    mem_B = 512 if quick else 2048
    base = dict(B=mem_B, T=MEM_T, n=N, dim=DIM, depth=DEPTH, t1=T1, rtol=RTOL, atol=ATOL,
                gtol=GTOL, out=None, budget=None, load=False)
    print(f"memory: B={mem_B}{' (quick; --full: 2048)' if quick else ''} x T={MEM_T} saves x dim "
          f"{DIM}, peak RSS of each process (ru_maxrss)", flush=True)
    mem = {"B": mem_B, "T": MEM_T, "rows": []}
    with tempfile.TemporaryDirectory(prefix="ddln_bench_") as tmp:
        b0 = _run_child(dict(base, B=1))
        mem["baseline"] = b0
        print(f"  baseline (imports + 1-trajectory sweep): peak RSS "
              f"{b0['peak_rss_kb'] / 1024:.0f} MB (after imports {b0['import_rss_kb'] / 1024:.0f}"
              f" MB)", flush=True)
        runs = [("in memory", None, None), ("out=", "out", None),
                ("in memory", None, 2**24), ("out=", "out2", 2**24)]
        for label, folder, budget in runs:
            r = _run_child(dict(base, out=None if folder is None else str(Path(tmp) / folder),
                                budget=budget))
            r.update(label=label, budget=budget)
            mem["rows"].append(r)
            extra = (r["peak_rss_kb"] - b0["peak_rss_kb"]) * 1024
            print(f"  {label:9s} memory_budget={'default' if budget is None else '2**24':7s}: "
                  f"peak RSS {r['peak_rss_kb'] / 1024:.0f} MB (+{extra / 2**20:.0f} MB over "
                  f"baseline = {extra / r['result_bytes']:.1f}x the result), result "
                  f"{r['result_bytes'] / 2**20:.0f} MB (theta {r['theta_bytes'] / 2**20:.0f} MB), "
                  f"{r['wall_s']:.0f} s, ok {r['all_ok']}", flush=True)
        ref = _run_child(dict(base, B=MEM_REF_B))
        mem["reference"] = ref
        per = ((mem["rows"][0]["peak_rss_kb"] - ref["peak_rss_kb"]) * 1024
               / (mem["rows"][0]["result_bytes"] - ref["result_bytes"]))
        mem["marginal"] = per
        print(f"  B={MEM_REF_B} (the same compiled programs): peak RSS "
              f"{ref['peak_rss_kb'] / 1024:.0f} MB, result {ref['result_bytes'] / 2**20:.0f} MB; "
              f"each further trajectory in memory costs {per:.2f}x its result's bytes "
              f"(B={mem_B} against B={MEM_REF_B}, default budget)", flush=True)
        r = _run_child(dict(base, out=str(Path(tmp) / "out"), load=True))
        mem["load_sweep"] = r
        extra = (r["peak_rss_kb"] - b0["import_rss_kb"]) * 1024
        print(f"  dd.load_sweep(out): {r['wall_s']:.1f} s, peak RSS {r['peak_rss_kb'] / 1024:.0f}"
              f" MB (+{extra / 2**20:.0f} MB over the baseline's imports = "
              f"{extra / r['result_bytes']:.1f}x the result)", flush=True)
    return mem
