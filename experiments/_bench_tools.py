"""The bench's problem and the measuring tools that `bench` and `device_bench` share: compile
counters from jax.monitoring, the scipy baselines, the engine counters of `res.info`."""

import time
from contextlib import contextmanager

import jax
import numpy as np
from scipy.integrate import solve_ivp

DEPTH, DIM, N, T1, RTOL, ATOL, GTOL = 6, 8, 10, 50.0, 1e-8, 1e-10, 1e-7
COUNTERS = ("host_syncs", "bytes_to_host", "retirements", "compiles")


def _scipy_solve(X, y, u0, method="DOP853"):
    """One plain `solve_ivp` (no jacobian) with the gtol stop as a terminal event."""
    def rhs(t, f):
        u = f.reshape(DEPTH, DIM)
        g = 2 * X.T @ (X @ np.prod(u, 0) - y)
        du = np.stack([-np.prod(np.delete(u, j, 0), 0) * g for j in range(DEPTH)])
        return du.ravel()

    def event(t, f):
        u = f.reshape(DEPTH, DIM)
        return np.max(np.abs(2 * X.T @ (X @ np.prod(u, 0) - y))) - GTOL

    event.terminal = True
    sol = solve_ivp(rhs, (0, T1), np.asarray(u0).ravel(), method=method, rtol=RTOL, atol=ATOL,
                    events=event)
    return sol


def _scipy_loop(X, y, u0s, method) -> dict:
    """Seconds per trajectory of a loop of `_scipy_solve` over `u0s`."""
    X, y = np.asarray(X), np.asarray(y)
    t = time.perf_counter()
    sols = [_scipy_solve(X, y, u0, method) for u0 in np.asarray(u0s)]
    per = (time.perf_counter() - t) / len(sols)
    return {"n": len(sols), "s_per_traj": per, "traj_per_s": 1 / per,
            "event_stops": sum(s.status == 1 for s in sols),
            "t_end": [float(s.t[-1]) for s in sols],
            "nfev_mean": float(np.mean([s.nfev for s in sols]))}


@contextmanager
def _counting_compiles():
    """Backend compiles counted from jax.monitoring while the block runs: a dict {"n": count,
    "s": seconds} (read it with `_compiles`)."""
    compiled = {"n": 0, "s": 0.0}

    def on_duration(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled["n"] += 1
            compiled["s"] += duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)


@contextmanager
def _compiles(counter):
    """Backend compiles (count, seconds) during the block, from jax.monitoring."""
    n0, s0 = counter["n"], counter["s"]
    got = {}
    yield got
    got["n"], got["s"] = counter["n"] - n0, counter["s"] - s0


def _x(r: float) -> str:
    """A ratio with two significant digits or more."""
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"


def _counters(info: dict, seconds: float) -> dict:
    c = {k: info.get(k) for k in COUNTERS}
    c["host_syncs_per_s"] = None if c["host_syncs"] is None else c["host_syncs"] / seconds
    c["bytes_per_retirement"] = (c["bytes_to_host"] / c["retirements"]
                                 if c["bytes_to_host"] is not None and c["retirements"] else None)
    return c
