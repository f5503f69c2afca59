"""GD/SGD limits at finite step sizes (ddln_jax/_gd_bias.py), checked against real GD and
SGD runs: an independent NumPy GD, `dd.train`, and the autodiff Hessian of `dd.sharpness`."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd
from tests.helpers import random_layers, random_problem

N, D = 3, 6


def _problem(seed=0):
    X, y = random_problem(seed, N, D)
    return dd.LeastSquares(X, y)


def _layers(depth, seed=0):
    # depth >= 3 shifted away from 0 so that the flow is not too slow to converge
    return jnp.asarray(random_layers(seed, depth, D, 0.3) + (0.5 if depth > 2 else 0.0))


def _numpy_gd(X, y, u0, gammas, steps, batch=None, rng=None):
    """Plain (S)GD on the layers, written out by hand, batched over step sizes `gammas`:
    returns the final layers (G, depth, d), xi = -sum_k gamma g_k (G, d), the depth-2 gains
    sum_k q(gamma g_k) with q(x) = -ln|1 - x^2| (G, d), and the invariants after every
    step against the law's prediction (max relative error)."""
    n = X.shape[0]
    u = np.repeat(u0[None], len(gammas), axis=0)
    gam = np.asarray(gammas)[:, None]
    xi = np.zeros((len(gammas), X.shape[1]))
    gains = np.zeros_like(xi)
    worst = 0.0
    for _ in range(steps):
        theta = np.prod(u, axis=1)
        if batch is None:
            g = 2.0 * (theta @ X.T - y) @ X
        else:
            idx = rng.permutation(n)[:batch]
            g = (n / batch) * 2.0 * (theta @ X[idx].T - y[idx]) @ X[idx]
        new = np.stack(
            [
                u[:, j] - gam * np.prod(np.delete(u, j, axis=1), axis=1) * g
                for j in range(u.shape[1])
            ],
            axis=1,
        )
        if u.shape[1] > 2 or steps <= 300:
            for j in range(u.shape[1]):
                for k in range(j + 1, u.shape[1]):
                    rest = np.prod(np.delete(u, [j, k], axis=1) ** 2, axis=1)
                    law = (u[:, j] - u[:, k]) * (u[:, j] + u[:, k]) * (1 - gam**2 * g**2 * rest)
                    real = (new[:, j] - new[:, k]) * (new[:, j] + new[:, k])
                    # relative to the size of the terms: a difference of squares cannot be
                    # computed to better than eps (u_j^2 + u_k^2)
                    size = new[:, j] ** 2 + new[:, k] ** 2
                    worst = max(worst, float(np.max(np.abs(law - real) / size)))
        gains += -np.log(np.abs(1 - (gam * g) ** 2))
        xi -= gam * g
        u = new
    return u, xi, gains, worst


@pytest.mark.parametrize("depth", (2, 3, 4, 5, 6))
@pytest.mark.parametrize("batch", (None, 1, 2))
def test_per_step_law_matches_real_iterates(depth, batch):
    X, y = random_problem(depth, N, D)
    u0 = random_layers(depth, depth, D, 0.8)
    rng = np.random.default_rng(depth)
    # the law written by hand inside _numpy_gd, 200 steps of a real (S)GD
    _, _, _, worst = _numpy_gd(X, y, u0, [0.02, 0.05], 200, batch, rng)
    assert worst <= 1e-13  # relative, round-off of products of <= 6 factors
    # dd.step_factors gives the same factors on one step
    u = jnp.asarray(u0)
    g = 2.0 * X.T @ (X @ np.prod(u0, axis=0) - y)
    new = (
        u - 0.05 * jnp.stack([jnp.prod(jnp.delete(u, j, axis=0), axis=0) for j in range(depth)]) * g
    )
    f = dd.step_factors(u, g, 0.05)
    for j in range(depth):
        for k in range(j + 1, depth):
            real = (new[j] - new[k]) * (new[j] + new[k])
            law = (u[j] - u[k]) * (u[j] + u[k]) * f[j, k]
            assert float(jnp.max(jnp.abs(law - real) / (new[j] ** 2 + new[k] ** 2))) <= 1e-13


@pytest.fixture(scope="module")
def depth2():
    prob, layers0 = _problem(), _layers(2)
    st = dd.max_stable_step(layers0, prob)
    return prob, layers0, st


def _as_trajectory(layers0, prob, layers, xi, gamma, steps):
    theta = np.prod(layers, axis=0)
    return dd.Trajectory(
        ts=jnp.asarray([0.0, gamma * steps]),
        layers=jnp.stack([layers0, jnp.asarray(layers)]),
        theta=jnp.stack([jnp.prod(layers0, 0), jnp.asarray(theta)]),
        xi=jnp.stack([jnp.zeros(D), jnp.asarray(xi)]),
        loss=jnp.asarray([prob.loss(jnp.prod(layers0, 0)), prob.loss(jnp.asarray(theta))]),
        layers0=layers0,
        result=jnp.asarray(0),
        num_steps=jnp.asarray(steps),
        ok=jnp.asarray(True),
        t_final=jnp.asarray(gamma * steps),
    )


@pytest.mark.parametrize("batch", (None, 1))
def test_depth2_run_reproduces_its_limit_and_gains(depth2, batch):
    prob, layers0, st = depth2
    X, y = np.asarray(prob.X), np.asarray(prob.y)
    fracs = (0.2, 0.5, 0.9) if batch is None else (0.2, 0.4)
    scale = 1.0 if batch is None else 1.0 / N  # SGD steps are n / b times larger
    gammas = [f * float(st.step_size) * scale for f in fracs]
    u, xi, gains, _ = _numpy_gd(
        X, y, np.asarray(layers0), gammas, 6000, batch, np.random.default_rng(1)
    )
    for i, gamma in enumerate(gammas):
        traj = _as_trajectory(layers0, prob, u[i], xi[i], gamma, 6000)
        theta_run = np.prod(u[i], axis=0)
        assert float(prob.loss(jnp.asarray(theta_run))) < 1e-24  # a converged run
        res = dd.gd_bias(layers0, prob, gamma, trajectory=traj)
        assert res.method == "run" and bool(res.converged)
        np.testing.assert_allclose(res.theta, theta_run, atol=1e-8)
        # the drift of the invariant is minus the gains Even et al. accumulate
        np.testing.assert_allclose(res.log_shrink[0], -gains[i], rtol=1e-9, atol=1e-12)
        # the flow from the effective initialization ends at the run's limit
        back = dd.implicit_bias(res.layers0_eff, prob).theta
        np.testing.assert_allclose(back, theta_run, atol=1e-8)


def test_train_matches_numpy_gd(depth2):
    prob, layers0, _ = depth2
    gamma = 0.1
    traj = dd.train(layers0, prob, gamma, steps=300, save_every=300)
    u, xi, _, _ = _numpy_gd(
        np.asarray(prob.X), np.asarray(prob.y), np.asarray(layers0), [gamma], 300
    )
    np.testing.assert_allclose(traj.layers[-1], u[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(traj.xi[-1], xi[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("depth", (2, 3, 4))
def test_ahead_of_time_error_is_second_order(depth):
    prob, layers0 = _problem(), _layers(depth)
    gammas = jnp.asarray([0.01, 0.02, 0.04])
    runs = jax.vmap(lambda g: dd.train(layers0, prob, g, steps=100_000, save_every=100_000))(gammas)
    assert float(jnp.max(runs.loss[:, -1])) < 1e-26  # converged: the limits are measured
    flow = dd.implicit_bias(layers0, prob).theta
    pred_err, flow_err = [], []
    for i, g in enumerate(gammas):
        res = dd.gd_bias(layers0, prob, float(g))
        assert res.method == "flow" and bool(res.converged)
        pred_err.append(float(jnp.linalg.norm(res.theta - runs.theta[i, -1])))
        flow_err.append(float(jnp.linalg.norm(flow - runs.theta[i, -1])))
    p_pred = np.polyfit(np.log(gammas), np.log(pred_err), 1)[0]
    p_flow = np.polyfit(np.log(gammas), np.log(flow_err), 1)[0]
    # measured: prediction orders 1.98 / 2.32 / 1.98, the flow's 0.99 / 1.15 / 0.98
    assert 1.8 <= p_pred <= 2.6 and 0.8 <= p_flow <= 1.3
    assert pred_err[0] < 0.1 * flow_err[0]


def test_sgd_expected_limit_against_many_runs():
    prob, layers0 = _problem(), _layers(2)
    gamma, batch = 0.01, 2
    keys = jr.split(jr.key(0), 48)
    runs = jax.vmap(
        lambda k: dd.train(
            layers0, prob, gamma, steps=40_000, save_every=40_000, batch_size=batch, key=k
        )
    )(keys)
    assert float(jnp.max(runs.loss[:, -1])) < 1e-24
    mean = jnp.mean(runs.theta[:, -1], axis=0)
    sgd = dd.gd_bias(layers0, prob, gamma, batch_size=batch).theta
    gd = dd.gd_bias(layers0, prob, gamma).theta
    flow = dd.implicit_bias(layers0, prob).theta
    # measured: 1.3e-4 from the mean of the runs, against 3.0e-3 (flow) and 3.9e-3 (GD
    # prediction); the runs' standard error is ~4e-5, so the O(gamma^2) bias is visible
    err = float(jnp.linalg.norm(sgd - mean))
    assert err < 0.1 * float(jnp.linalg.norm(flow - mean))
    assert err < 0.1 * float(jnp.linalg.norm(gd - mean))


@pytest.mark.parametrize("kind,depth", (("tied", 2), ("difference", 3)))
def test_tied_and_difference(kind, depth):
    rng = np.random.default_rng(depth)
    X = rng.standard_normal((N, D))
    prob = dd.LeastSquares(X, X @ (0.3 + rng.random(D)))  # a positive interpolator exists
    par = dd.tied(depth) if kind == "tied" else dd.difference(depth)
    w = 0.5 + 0.3 * rng.random((2, D))
    u0 = jnp.asarray(w[0]) if kind == "tied" else (jnp.asarray(w[0]), jnp.asarray(w[1]))
    flow = dd.implicit_bias(u0, prob, parameterization=par).theta
    # the deep difference network's prediction degrades fast (measured: order 4.3 between
    # gamma = 0.005 and 0.01, where the run's limit moved by 0.33): smaller steps there
    gammas, steps = ((0.005, 0.01), 100_000) if kind == "tied" else ((0.00125, 0.0025), 200_000)
    pred_err, flow_err = [], []
    for g in gammas:
        run = dd.train(u0, prob, g, steps=steps, save_every=steps, parameterization=par)
        assert float(run.loss[-1]) < 1e-24
        th = run.theta[-1]
        back = dd.gd_bias(u0, prob, g, parameterization=par, trajectory=run)
        np.testing.assert_allclose(back.theta, th, atol=1e-8)  # the run's own limit
        pred = dd.gd_bias(u0, prob, g, parameterization=par)
        assert bool(pred.converged)
        pred_err.append(float(jnp.linalg.norm(pred.theta - th)))
        flow_err.append(float(jnp.linalg.norm(flow - th)))
    # measured: 7.9e-4 / 3.5e-3 against the flow's 8.1e-3 / 1.8e-2 (tied, L = 2), 6.0e-4 /
    # 2.8e-3 against 5.1e-3 / 1.2e-2 (difference, L = 3): orders 2.16 and 2.23
    order = np.log(pred_err[1] / pred_err[0]) / np.log(2.0)
    assert 1.7 <= order <= 2.7 and pred_err[0] < 0.2 * flow_err[0]


def test_bad_inputs(depth2):
    prob, layers0, _ = depth2
    with pytest.raises(ValueError, match="`step_size`"):
        dd.gd_bias(layers0, prob, 0.0)
    with pytest.raises(ValueError, match="`step_size`"):
        dd.gd_bias(layers0, prob, -0.1)
    with pytest.raises(ValueError, match="product network"):
        dd.gd_bias(jnp.ones(D), prob, 0.1, parameterization=lambda u: u**3)
    with pytest.raises(ValueError, match="> 0"):
        dd.gd_bias(-jnp.ones(D), prob, 0.1, parameterization=dd.tied(2))
    with pytest.raises(ValueError, match="inconsistent"):
        X = np.vstack([np.asarray(prob.X)[:2], np.asarray(prob.X)[:1]])
        dd.gd_bias(layers0, dd.LeastSquares(X, np.array([1.0, 2.0, 3.0])), 0.1)
    with pytest.warns(RuntimeWarning):
        bad = dd.train(layers0, prob, 5.0, steps=100)
    with pytest.raises(ValueError, match="did not converge"):
        dd.gd_bias(layers0, prob, 5.0, trajectory=bad)
    short = dd.train(layers0, prob, 0.1, steps=10)
    with pytest.warns(RuntimeWarning, match="has not converged"):
        dd.gd_bias(layers0, prob, 0.1, trajectory=short)
