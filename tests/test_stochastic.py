"""Stochastic gradient flow (SDE with SGD's covariance) and momentum flow."""

import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    layer_grad_numpy,
    layer_rhs_numpy,
    random_layers,
    random_problem,
    scaled_problem,
    scipy_layers,
)
from scipy.integrate import solve_ivp

import ddln_jax as dd
from ddln_jax._stochastic import noise_factor


def test_noise_covariance_is_minibatch_covariance():
    # B B^T = eta Cov(minibatch gradient), by enumerating every subset of b rows.
    n, b, eta = 6, 2, 0.3
    X, y = scaled_problem(9, n=n, d=4)
    u0 = random_layers(9, 3, 4)
    grads = np.array([
        (n / b) * layer_grad_numpy(X[list(S)], y[list(S)], u0).ravel()
        for S in itertools.combinations(range(n), b)
    ])
    cov = np.cov(grads.T, bias=True)
    Bu, _ = noise_factor(jnp.asarray(u0), dd.LeastSquares(X, y), eta, b)
    Bu = np.asarray(Bu).reshape(-1, n)
    np.testing.assert_allclose(Bu @ Bu.T, eta * cov, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("noiseless", ["eta0", "full_batch"])
def test_noiseless_sde_is_gradient_flow(noiseless):
    X, y = scaled_problem(10)
    u0 = random_layers(10, 3, 5)
    ts = np.linspace(0, 3, 7)
    ref = np.prod(scipy_layers(X, y, u0, ts), axis=1)
    kwargs = dict(eta=0.0, batch_size=1) if noiseless == "eta0" else dict(eta=0.1, batch_size=10)
    dts = np.array([0.01, 0.005, 0.0025])
    errors = []
    for dt in dts:
        traj = dd.stochastic_flow(u0, dd.LeastSquares(X, y), key=jr.key(0), t1=3.0, ts=ts,
                                  dt=float(dt), max_steps=2048, **kwargs)  # one compile
        assert bool(traj.ok)
        errors.append(np.max(np.abs(np.asarray(traj.theta) - ref)))
    slope = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    assert 0.9 < slope < 1.1, (slope, errors)  # Euler: order 1 in dt


def test_sde_same_key_same_path_and_noise_moves_it():
    X, y = scaled_problem(11)
    u0 = random_layers(11, 2, 5)
    problem = dd.LeastSquares(X, y)
    kw = dict(eta=0.01, t1=1.0, ts=jnp.linspace(0, 1, 5), dt=0.01)
    a = dd.stochastic_flow(u0, problem, key=jr.key(3), **kw)
    b = dd.stochastic_flow(u0, problem, key=jr.key(3), **kw)
    c = dd.stochastic_flow(u0, problem, key=jr.key(4), **kw)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert np.max(np.abs(np.asarray(a.theta - c.theta))) > 1e-4


@pytest.mark.slow
def test_stochastic_flow_is_sparser_than_gradient_flow():
    # Pesme et al. 2021: SGF's limit has a smaller effective initialization than GF's, so it is
    # closer to min-l1. Depth 2, alpha = 0.5, n < d, 8 Brownian paths.
    rng = np.random.default_rng(0)
    n, d = 8, 16
    X = rng.standard_normal((n, d)) / np.sqrt(n)
    truth = np.zeros(d)
    truth[[3, 11]] = [1.5, -1.5]
    y = X @ truth
    problem = dd.LeastSquares(X, y)
    u0 = dd.init_yun(0.5, jnp.ones(d), 2)
    ts = jnp.array([0.0, 100.0])
    gf = dd.gradient_flow(u0, problem, t1=100.0, ts=ts)
    sgf = jax.vmap(lambda k: dd.stochastic_flow(u0, problem, eta=0.02, key=k, t1=100.0, ts=ts,
                                                dt=0.01))(jr.split(jr.key(0), 8))
    assert bool(sgf.ok.all())
    assert float(jnp.max(sgf.loss[:, -1])) < 1e-12  # interpolates
    l1_gf = np.abs(np.asarray(gf.theta[-1])).sum()
    l1_sgf = np.abs(np.asarray(sgf.theta[:, -1])).sum(axis=1)
    assert l1_sgf.mean() + 3 * l1_sgf.std() / np.sqrt(8) < l1_gf, (l1_sgf, l1_gf)


def test_momentum_flow_matches_scipy():
    X, y = scaled_problem(12)
    u0 = random_layers(12, 3, 5)
    gamma = 2.0
    ts = np.linspace(0, 4, 9)
    grad = layer_rhs_numpy(X, y)  # = -grad_u L

    def rhs(t, state):
        u, v = state[:15], state[15:]
        return np.concatenate([v, -gamma * v + grad(t, u, 3, 5)])

    sol = solve_ivp(rhs, (0, 4), np.concatenate([u0.ravel(), np.zeros(15)]), method="DOP853",
                    t_eval=ts, rtol=1e-12, atol=1e-14)
    traj = dd.momentum_flow(u0, dd.LeastSquares(X, y), damping=gamma, t1=4.0, ts=ts,
                            rtol=1e-11, atol=1e-13)
    assert bool(traj.ok)
    np.testing.assert_allclose(np.asarray(traj.layers).reshape(9, 15), sol.y[:15].T, atol=1e-8)


def test_overdamped_momentum_flow_is_rescaled_gradient_flow():
    # u'' + gamma u' = -grad L: with s = t / gamma, u_ss / gamma^2 + u_s = -grad L, so
    # u(gamma s) -> u_GF(s) with an error O(1 / gamma^2).
    X, y = scaled_problem(13)
    u0 = random_layers(13, 3, 5)
    ts = np.linspace(0, 3, 7)
    ref = np.prod(scipy_layers(X, y, u0, ts), axis=1)
    gammas = np.array([10.0, 20.0, 40.0])
    errors = []
    for g in gammas:
        traj = dd.momentum_flow(u0, dd.LeastSquares(X, y), damping=float(g), t1=3.0 * g,
                                ts=ts * g, rtol=1e-11, atol=1e-13)
        errors.append(np.max(np.abs(np.asarray(traj.theta) - ref)))
    slope = np.polyfit(np.log(gammas), np.log(errors), 1)[0]
    assert -2.2 < slope < -1.8, (slope, errors)


def test_divergent_sde_is_flagged_with_failure_time():
    # the README's first SDE example (depth 4, eta = 1e-2, dt = 1e-2) blows up near t = 13.6:
    # the run must say so, with the time it was first seen
    kx, ky, ku = jr.split(jr.key(0), 3)
    X, y = jr.normal(kx, (10, 5)), jr.normal(ky, (10,))
    u0 = dd.init_gaussian(ku, depth=4, dim=5, scale=1.0)
    ts = jnp.linspace(0.0, 50.0, 200)
    with pytest.warns(RuntimeWarning, match="diverged") as rec:
        traj = dd.stochastic_flow(u0, dd.LeastSquares(X, y), eta=1e-2, batch_size=1,
                                  key=jr.key(2), t1=50.0, ts=ts, dt=1e-2)
    assert "successful" not in str(rec[0].message)
    assert not bool(traj.ok) and int(traj.result) == dd.Result.diverged
    # t_final is the first save time whose loss or theta is not finite (read off the saves)
    finite = np.isfinite(np.asarray(traj.loss)) & np.all(np.isfinite(traj.theta), axis=1)
    first_bad = np.flatnonzero(~finite)[0]
    assert float(traj.t_final) == float(ts[first_bad]) and 0 < float(traj.t_final) < 50
    assert finite[:first_bad].all()


def test_bad_inputs():
    X, y = random_problem(3, 10, 5)
    problem = dd.LeastSquares(X, y)
    u0 = random_layers(0, 3, 5)
    kw = dict(key=jr.key(0), t1=1.0, ts=jnp.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="eta"):
        dd.stochastic_flow(u0, problem, eta=-1.0, dt=0.1, **kw)
    with pytest.raises(ValueError, match="dt"):
        dd.stochastic_flow(u0, problem, eta=0.1, dt=0.0, **kw)
    with pytest.raises(ValueError, match="NaN or Inf"):
        dd.stochastic_flow(u0 * np.nan, problem, eta=0.1, dt=0.1, **kw)
    with pytest.raises(ValueError, match="damping"):
        dd.momentum_flow(u0, problem, damping=0.0, t1=1.0, ts=jnp.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="velocity0"):
        dd.momentum_flow(u0, problem, damping=1.0, t1=1.0, ts=jnp.linspace(0, 1, 3),
                         velocity0=np.zeros((2, 5)))


def test_momentum_flow_stops_at_rest():
    X, y = random_problem(4, 10, 4)
    problem = dd.LeastSquares(X, y)
    u0 = random_layers(5, 3, 4)
    ts = jnp.linspace(0.0, 400.0, 50)
    traj = dd.momentum_flow(u0, problem, damping=2.0, t1=400.0, ts=ts, stop_when_converged=1e-8)
    assert bool(traj.ok) and float(traj.t_final) < 400.0
    # stopped at rest at a critical point: theta is the least-squares solution (n > d)
    theta = np.asarray(traj.theta[-1])
    theta_ls = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(theta, theta_ls, atol=1e-6)
