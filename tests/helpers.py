"""Independent references for the tests: numpy/scipy only, no ddln_jax code."""

import os
import subprocess
import sys

import numpy as np
from scipy.integrate import solve_ivp


def random_problem(seed, n, d):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(n)


def random_layers(seed, depth, d, scale=1.0):
    rng = np.random.default_rng(10_000 + seed)
    return scale * rng.standard_normal((depth, d))


def layer_rhs_numpy(X, y):
    """du^j/dt = -(prod_{k != j} u^k) * 2 X^T (X theta - y), written out by hand."""

    def rhs(t, flat, depth, d):
        u = flat.reshape(depth, d)
        theta = np.prod(u, axis=0)
        g = 2.0 * X.T @ (X @ theta - y)
        du = np.empty_like(u)
        for j in range(depth):
            du[j] = -np.prod(np.delete(u, j, axis=0), axis=0) * g
        return du.ravel()

    return rhs


def scipy_layers(X, y, layers0, ts, method="DOP853", rtol=1e-12, atol=1e-14):
    """Layers at `ts`, integrated piecewise between consecutive save times."""
    depth, d = layers0.shape
    rhs = layer_rhs_numpy(X, y)
    out = [layers0.copy()]
    state = layers0.ravel().copy()
    for a, b in zip(ts[:-1], ts[1:]):
        sol = solve_ivp(rhs, (a, b), state, method=method, rtol=rtol, atol=atol, args=(depth, d))
        assert sol.success, sol.message
        state = sol.y[:, -1]
        out.append(state.reshape(depth, d).copy())
    return np.stack(out)


def scaled_problem(seed=0, n=10, d=5):
    """`random_problem` with X / sqrt(n) (unit-scale rows for step-size experiments)."""
    X, y = random_problem(seed, n, d)
    return X / np.sqrt(n), y


def layer_grad_numpy(X, y, u):
    """grad_u of ||X prod(u) - y||^2, written out by hand."""
    theta = np.prod(u, axis=0)
    g = 2.0 * X.T @ (X @ theta - y)
    return np.stack([np.prod(np.delete(u, j, axis=0), axis=0) * g for j in range(len(u))])


def run_float32(code: str, cwd) -> list[str]:
    """Run `code` in a fresh Python with float64 off (conftest turns it on in the test
    process, and x64 cannot be switched off there); returns its stdout split in words."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_ENABLE_X64": "0"}, cwd=cwd, check=True)
    return out.stdout.split()
