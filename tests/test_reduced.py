"""The mirror flow and the reduced flow against the layer flow (three routes to one path)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_layers, random_problem

import ddln_jax as dd


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
@pytest.mark.parametrize("n,d", [(8, 4), (3, 5)])
def test_three_flows_agree(depth, n, d):
    X, y = random_problem(depth + n, n, d)
    u0 = random_layers(depth + d, depth, d, scale=0.9)
    p = dd.LeastSquares(X, y)
    ts = np.linspace(0, 4, 21)
    kw = dict(t1=4.0, ts=ts, rtol=1e-11, atol=1e-13, solver="dopri8")
    full = dd.gradient_flow(u0, p, **kw)
    mirror = dd.mirror_flow(u0, p, **kw)
    reduced = dd.reduced_flow(u0, p, **kw)
    for other in (mirror, reduced):
        assert bool(other.ok)
        np.testing.assert_allclose(other.theta, full.theta, atol=1e-8)
        np.testing.assert_allclose(other.layers, full.layers, atol=1e-8)
        np.testing.assert_allclose(other.xi, full.xi, atol=1e-8)


def test_reduced_flow_zero_first_init(getkey):
    # v1(0) = 0: the paper's formula with |v1| would give theta = 0 forever; ours moves.
    X, y = random_problem(5, 6, 4)
    u0 = np.asarray(dd.init_zero_first(getkey(), 3, 4))
    ts = np.linspace(0, 2, 9)
    full = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=2.0, ts=ts, rtol=1e-11, atol=1e-13)
    red = dd.reduced_flow(u0, dd.LeastSquares(X, y), t1=2.0, ts=ts, rtol=1e-11, atol=1e-13)
    assert np.abs(np.asarray(full.theta[-1])).min() > 1e-3
    np.testing.assert_allclose(red.theta, full.theta, atol=1e-8)


def test_reduced_flow_falls_back_on_near_ties():
    X, y = random_problem(0, 6, 3)
    u0 = random_layers(0, 3, 3)
    u0[1, 0] = np.abs(u0[0, 0]) * (1 + 1e-7) * np.sign(u0[1, 0])  # |u^1_0| ~ |u^2_0|
    u0[2, 0] = 2.0
    with pytest.warns(RuntimeWarning, match="gradient_flow"):
        traj = dd.reduced_flow(u0, dd.LeastSquares(X, y), t1=1.0, ts=np.linspace(0, 1, 3))
    assert bool(traj.ok)


def test_reduced_and_mirror_flows_require_assumption_a():
    X, y = random_problem(0, 6, 3)
    u0 = random_layers(0, 3, 3)
    u0[1] = u0[0]  # equal (and minimal) layers violate (A)
    u0[2] = 3.0 + np.abs(u0[0])
    for flow in (dd.reduced_flow, dd.mirror_flow):
        with pytest.raises(ValueError, match="Assumption \\(A\\)"):
            flow(u0, dd.LeastSquares(X, y), t1=1.0, ts=np.linspace(0, 1, 3))


@pytest.mark.parametrize("flow", ["mirror_flow", "reduced_flow"])
def test_steady_state_stop(flow):
    # the stop fires once ||grad L||_inf <= gtol: then ||theta - theta_LS|| <=
    # ||(2 X^T X)^{-1}|| ||grad L||_2 (full column rank), and the later saves hold that state
    X, y = random_problem(90, 8, 4)
    problem = dd.LeastSquares(X, y)
    u0 = random_layers(91, 3, 4)
    ts = jnp.linspace(0.0, 1e4, 20)
    gtol = 1e-6
    traj = getattr(dd, flow)(u0, problem, t1=1e4, ts=ts, stop_when_converged=gtol)
    assert bool(traj.ok) and float(traj.t_final) < 1e4
    assert int(traj.result) == dd.Result.event_occurred
    g = 2 * X.T @ (X @ np.asarray(traj.theta[-1]) - y)
    assert np.max(np.abs(g)) <= gtol * (1 + 1e-6)
    theta_ls = np.linalg.lstsq(X, y, rcond=None)[0]
    bound = np.linalg.norm(g) / (2 * np.linalg.eigvalsh(X.T @ X)[0])
    assert np.linalg.norm(traj.theta[-1] - theta_ls) <= bound * (1 + 1e-6)
    np.testing.assert_array_equal(traj.theta[-1], traj.theta[-2])
