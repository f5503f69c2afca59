"""Time to first result: each public entry point's first and second call, each in a fresh
process, against the plain diffrax program it wraps (measured in the same run).

    python -m experiments.latency            # ~3 min on 2 shared CPU cores
    python -m experiments.latency --repeat 3 # the median of 3 fresh processes per row

The README's problem: depth 4, dim 5, n 10, 200 save times, T = 50 (implicit bias: its first
3 rows). Every row is a new Python process with JAX's persistent compilation cache off
(DDLN_JAX_NO_CACHE=1), timing its first and its second call with `jax.block_until_ready`; the
first call's compiles are counted and split into tracing, lowering and XLA compile time with
`jax.monitoring`. The "warm cache" column runs the same process twice with a fresh cache
folder (`dd.enable_compilation_cache`) and times the second process's first call. Prints a
markdown table and writes latency.json and latency.md to `--out`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {  # issue 34's targets, as (row, baseline row, what is compared, at most)
    "gradient_flow first": ("gradient_flow", "diffrax", "first", 1.3),
    "gradient_flow second": ("gradient_flow", "diffrax", "second", 2.0),
    "gradient_flow second, best of 5": ("gradient_flow", "diffrax", "best_later", 2.0),
    "gradient_flow first, CPU time": ("gradient_flow", "diffrax", "first_cpu", 1.3),
    "implicit_bias first (s)": ("implicit_bias", None, "first", 2.5),
    "implicit_bias first, CPU time (s)": ("implicit_bias", None, "first_cpu", 2.5),
    "implicit_bias second (s)": ("implicit_bias", None, "second", 0.020),
    "implicit_bias second, CPU time (s)": ("implicit_bias", None, "second_cpu", 0.020),
    "sweep first (s)": ("sweep", None, "first", 3.0),
    "sweep first, CPU time (s)": ("sweep", None, "first_cpu", 3.0),
    "import": ("import ddln_jax", "import jax, diffrax, equinox, optax", "import", 1.3),
}

_PRELUDE = r"""
import json, os, sys, time
t_start = time.perf_counter()
{imports}
t_import = time.perf_counter() - t_start
import jax
jax.config.update("jax_enable_x64", True)
events = {{}}
def _on(event, secs, **kw):
    n, s = events.get(event, (0, 0.0))
    events[event] = (n + 1, s + secs)
jax.monitoring.register_event_duration_secs_listener(_on)
if os.environ.get("LATENCY_CACHE"):
    import ddln_jax as dd
    dd.enable_compilation_cache(os.environ["LATENCY_CACHE"])
"""

_CALL = r"""
import jax.numpy as jnp, jax.random as jr
import ddln_jax as dd
kx, ky, ku = jr.split(jr.key(0), 3)
X, y = jr.normal(kx, (10, 5)), jr.normal(ky, (10,))
u0 = dd.init_gaussian(ku, depth=4, dim=5, scale=1.0)
problem = dd.LeastSquares(X, y)
ts = jnp.linspace(0.0, 50.0, 200)
jax.block_until_ready((u0, ts, problem))
{setup}
def call():
    return {call}
times, cpu = [], []
for i in range(2):
    if i == 0:
        events.clear()
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
    if i == 0:
        first_events = dict(events)
later = []
for i in range(5):
    t = time.perf_counter()
    jax.block_until_ready(call())
    later.append(time.perf_counter() - t)
def get(name):
    return first_events.get("/jax/core/compile/" + name, (0, 0.0))
print(json.dumps({{"import": t_import, "first": times[0], "second": times[1],
                  "first_cpu": cpu[0], "second_cpu": cpu[1], "best_later": min(later),
                  "compiles": get("backend_compile_duration")[0],
                  "trace": get("jaxpr_trace_duration")[1],
                  "lower": get("jaxpr_to_mlir_module_duration")[1],
                  "compile": get("backend_compile_duration")[1]}}))
"""

_DIFFRAX = r"""
import diffrax as dfx
@jax.jit
def plain(u0, X, y, ts):
    def vf(t, u, args):
        g = jax.grad(lambda th: jnp.sum((X @ th - y) ** 2))(jnp.prod(u, axis=0))
        _, pull = jax.vjp(lambda v: jnp.prod(v, axis=0), u)
        return -pull(g)[0]
    sol = dfx.diffeqsolve(dfx.ODETerm(vf), dfx.Tsit5(), t0=0.0, t1=50.0, dt0=1e-3, y0=u0,
                          saveat=dfx.SaveAt(ts=ts),
                          stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
                          max_steps=2**20, throw=False)
    return sol.ys
"""

# name: (imports, setup, call); calls are timed in a process of their own
ROWS = {
    "import jax, diffrax, equinox, optax": ("import jax, diffrax, equinox, optax", None, None),
    "import ddln_jax": ("import ddln_jax", None, None),
    "gradient_flow": ("", "", "dd.gradient_flow(u0, problem, t1=50.0, ts=ts)"),
    "diffrax": ("", _DIFFRAX, "plain(u0, X, y, ts)"),
    "implicit_bias": ("", "under = dd.LeastSquares(X[:3], y[:3])", "dd.implicit_bias(u0, under)"),
    "sweep": (
        "",
        "",
        "dd.sweep(problem, depths=[2, 3, 4], scales=[0.5, 1.0], seeds=11, t1=50.0,"
        " ts=ts, key=jr.key(0), progress=False).theta",
    ),
    "metric": ("", "", "dd.metric(u0)"),
    "train": ("", "", "dd.train(u0, problem, 1e-2, steps=1000)"),
}
LABELS = {
    "gradient_flow": "`dd.gradient_flow(u0, problem, t1=50, ts=ts)`",
    "diffrax": "the same flow as one plain `diffrax.diffeqsolve` (Tsit5, PIDController, "
    "SaveAt(ts)) under `jax.jit`",
    "implicit_bias": "`dd.implicit_bias(u0, LeastSquares(X[:3], y[:3]))`",
    "sweep": "`dd.sweep(problem, depths=[2,3,4], scales=[.5,1], seeds=11, …)` (66 trajectories)",
    "metric": "`dd.metric(u0)`",
    "train": "`dd.train(u0, problem, 1e-2, steps=1000)`",
}
WARM = ("gradient_flow", "implicit_bias", "sweep")


def _child_code(name: str) -> str:
    imports, setup, call = ROWS[name]
    code = _PRELUDE.format(imports=imports)
    if call is None:
        return code + 'print(json.dumps({"import": t_import}))'
    return code + _CALL.format(setup=setup, call=call)


def run_row(name: str, cache: str | None = None) -> dict:
    """One fresh process: its import time and, for a call, first/second call times and the
    first call's compiles."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_COMPILATION_CACHE_DIR", "DDLN_JAX_CACHE", "LATENCY_CACHE")
    }
    env.update(DDLN_JAX_NO_CACHE="1", JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    if cache is not None:
        env.pop("DDLN_JAX_NO_CACHE")
        env["LATENCY_CACHE"] = cache
    root = Path(__file__).parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _child_code(name)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"row {name!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure(names, repeat: int = 1, warm: bool = True) -> dict:
    rows = {}
    for name in names:
        rows[name] = _median([run_row(name) for _ in range(repeat)])
        if warm and name in WARM:
            with tempfile.TemporaryDirectory(prefix="ddln_latency_") as tmp:  # (own folder)
                run_row(name, cache=tmp)  # fills the folder
                rows[name]["warm_first"] = statistics.median(
                    run_row(name, cache=tmp)["first"] for _ in range(repeat)
                )
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[name].items()), flush=True)
    return rows


def targets(rows: dict) -> dict:
    """Each target of issue 34: the measured value (a ratio, or seconds) and whether met."""
    got = {}
    for label, (row, base, key, limit) in TARGETS.items():
        if row not in rows or (base is not None and base not in rows):
            continue
        value = rows[row][key] / (rows[base][key] if base is not None else 1.0)
        got[label] = {"value": value, "limit": limit, "met": value <= limit}
    return got


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def table(rows: dict, met: dict) -> list[str]:
    lines = [
        "| call | first call (CPU time) | second call (CPU time; best of 5 more) | first "
        "call's compiles: n, trace / lower / XLA (s) | first call, warm cache |",
        "|---|---|---|---|---|",
    ]
    imp, base = rows.get("import ddln_jax"), rows.get("import jax, diffrax, equinox, optax")
    if imp and base:
        lines.append(
            f"| `import ddln_jax` | {_ms(imp['import'])} (`import jax, diffrax, "
            f"equinox, optax`: {_ms(base['import'])}) | — | — | — |"
        )
    for name, label in LABELS.items():
        if name not in rows:
            continue
        r = rows[name]
        warm = _ms(r["warm_first"]) if "warm_first" in r else "—"
        lines.append(
            f"| {label} | {_ms(r['first'])} ({_ms(r['first_cpu'])}) | "
            f"{_ms(r['second'])} ({_ms(r['second_cpu'])}; {_ms(r['best_later'])}) | "
            f"{r['compiles']:.0f},"
            f" {r['trace']:.2f} / {r['lower']:.2f} / {r['compile']:.2f} | {warm} |"
        )
    lines += ["", "| target (issue 34) | measured | limit | met |", "|---|---|---|---|"]
    for label, m in met.items():
        lines.append(
            f"| {label} | {m['value']:.3g} | {m['limit']:g} | {'yes' if m['met'] else 'no'} |"
        )
    return lines


def main(*, out="results/latency", names=None, repeat: int = 1, warm: bool = True) -> dict:
    import jax

    start = time.perf_counter()
    rows = measure(list(ROWS) if names is None else names, repeat=repeat, warm=warm)
    met = targets(rows)
    lines = table(rows, met)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "rows": rows,
        "targets": met,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "repeat": repeat,
        "wall_s": time.perf_counter() - start,
    }
    (out / "latency.json").write_text(json.dumps(report, indent=2))
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    report["files"] = [str(out / "latency.json"), str(out / "latency.md")]
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    cli = argparse.ArgumentParser(
        prog="python -m experiments.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument("--out", default="results/latency", help="output folder")
    cli.add_argument("--repeat", type=int, default=1, help="fresh processes per row (median)")
    cli.add_argument(
        "--rows",
        nargs="*",
        choices=list(ROWS),
        metavar="ROW",
        default=None,
        help=f"rows to measure (default all: {', '.join(ROWS)})",
    )
    cli.add_argument("--no-warm", action="store_true", help="skip the warm-cache column")
    args = cli.parse_args()
    main(out=args.out, names=args.rows, repeat=args.repeat, warm=not args.no_warm)
