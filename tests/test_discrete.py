"""Discrete training (optax), sharpness, stochastic and momentum flows."""

import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import layer_grad_numpy, random_layers, scaled_problem, scipy_layers

import ddln_jax as dd


def test_gd_matches_numpy_loop():
    X, y = scaled_problem()
    u = random_layers(0, 3, 5)
    traj = dd.train(u, dd.LeastSquares(X, y), 0.01, steps=50, save_every=10)
    ref = [u.copy()]
    for _ in range(50):
        u = u - 0.01 * layer_grad_numpy(X, y, u)
        ref.append(u.copy())
    np.testing.assert_allclose(traj.layers, np.stack(ref)[::10], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(traj.ts, 0.01 * np.arange(0, 51, 10), rtol=1e-14)
    assert bool(traj.ok) and int(traj.num_steps) == 50


def test_heavy_ball_matches_numpy_loop():
    # optax.sgd(lr, momentum=beta): m <- beta m + g, u <- u - lr m.
    X, y = scaled_problem(1)
    u = random_layers(1, 3, 5)
    traj = dd.train(u, dd.LeastSquares(X, y), optax.sgd(0.01, momentum=0.9), steps=40)
    m = np.zeros_like(u)
    ref = [u.copy()]
    for _ in range(40):
        m = 0.9 * m + layer_grad_numpy(X, y, u)
        u = u - 0.01 * m
        ref.append(u.copy())
    np.testing.assert_allclose(traj.layers, np.stack(ref), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(traj.ts, np.arange(41.0))  # optax optimizer: t = step count


@pytest.mark.parametrize("depth", [2, 3])
def test_gd_converges_to_flow_with_order_one(depth):
    X, y = scaled_problem(2)
    u0 = random_layers(2, depth, 5, scale=0.9)
    T = 4.0
    ts = np.linspace(0, T, 9)
    ref = np.prod(scipy_layers(X, y, u0, ts), axis=1)  # independent scipy flow
    etas = np.array([0.02, 0.01, 0.005, 0.0025])
    errors = []
    for eta in etas:
        steps = int(round(T / eta))
        traj = dd.train(u0, dd.LeastSquares(X, y), float(eta), steps=steps, save_every=steps // 8)
        np.testing.assert_allclose(traj.ts, ts, rtol=1e-12)
        errors.append(np.max(np.abs(np.asarray(traj.theta) - ref)))
    slope = np.polyfit(np.log(etas), np.log(errors), 1)[0]
    assert 0.9 < slope < 1.1, (slope, errors)


def test_vmap_over_step_sizes_equals_loop():
    X, y = scaled_problem(3)
    u0 = random_layers(3, 3, 5)
    problem = dd.LeastSquares(X, y)
    etas = jnp.array([0.005, 0.01, 0.02])
    batched = jax.vmap(lambda e: dd.train(u0, problem, e, steps=30))(etas)
    for i, eta in enumerate(etas):
        single = dd.train(u0, problem, float(eta), steps=30)
        np.testing.assert_allclose(batched.theta[i], single.theta, rtol=1e-13, atol=1e-14)


def test_too_large_step_is_flagged():
    X, y = scaled_problem(4)
    u0 = random_layers(4, 3, 5)
    problem = dd.LeastSquares(X, y)
    eta = 100.0 / float(dd.sharpness(u0, problem, key=jr.key(0)))
    with pytest.warns(RuntimeWarning, match="diverged"):
        traj = dd.train(u0, problem, eta, steps=200)
    assert not bool(traj.ok)
    assert int(traj.result) == dd.Result.diverged
    assert int(traj.num_steps) < 200
    assert np.all(np.isfinite(traj.theta))  # frozen at the last finite iterate, not NaN
    assert float(traj.t_final) == pytest.approx(eta * int(traj.num_steps))
    # and a stable step is not flagged
    ok = dd.train(u0, problem, 0.5 / float(dd.sharpness(u0, problem, key=jr.key(0))), steps=200)
    assert bool(ok.ok)


def test_sgd_full_batch_equals_gd():
    X, y = scaled_problem(5)
    u0 = random_layers(5, 3, 5)
    problem = dd.LeastSquares(X, y)
    gd = dd.train(u0, problem, 0.01, steps=100)
    sgd = dd.train(u0, problem, 0.01, steps=100, batch_size=10, key=jr.key(0))
    np.testing.assert_allclose(sgd.theta, gd.theta, rtol=1e-12, atol=1e-13)


def test_sgd_minibatch_gradient_is_unbiased():
    # The mean of the first SGD step over many keys is the GD step (to Monte Carlo error).
    X, y = scaled_problem(6, n=6, d=4)
    u0 = random_layers(6, 2, 4)
    problem = dd.LeastSquares(X, y)
    step = jax.vmap(lambda k: dd.train(u0, problem, 1.0, steps=1, batch_size=2, key=k,
                                       blowup=1e30).layers[1])
    mean = np.asarray(step(jr.split(jr.key(0), 20_000))).mean(axis=0)
    gd = u0 - layer_grad_numpy(X, y, u0)
    # sum over all 15 subsets of the exact minibatch steps, averaged: the exact expectation
    exact = np.mean([u0 - 3.0 * layer_grad_numpy(X[list(S)], y[list(S)], u0)
                     for S in itertools.combinations(range(6), 2)], axis=0)
    np.testing.assert_allclose(exact, gd, rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(mean - gd)) < 0.05 * np.max(np.abs(gd - u0))


@pytest.mark.parametrize("depth", [2, 3])
def test_sharpness_is_top_hessian_eigenvalue(depth):
    X, y = scaled_problem(7)
    u0 = random_layers(7, depth, 5)
    problem = dd.LeastSquares(X, y)
    H = jax.hessian(lambda u: problem.loss(dd.theta(u)))(jnp.asarray(u0))
    top = np.linalg.eigvalsh(np.asarray(H).reshape(depth * 5, depth * 5))[-1]
    assert float(dd.sharpness(u0, problem, key=jr.key(0))) == pytest.approx(top, rel=1e-7)


def test_sharpness_when_the_negative_eigenvalue_dominates():
    # f(theta) = -10 sum theta^2 + sum theta: its Hessian is mostly negative.
    u0 = random_layers(8, 2, 4)

    def f(th):
        return -10.0 * jnp.sum(th**2) + jnp.sum(th)

    H = np.asarray(jax.hessian(lambda u: f(dd.theta(u)))(jnp.asarray(u0))).reshape(8, 8)
    ev = np.linalg.eigvalsh(H)
    assert abs(ev[0]) > abs(ev[-1])  # the case under test
    top = float(dd.sharpness(u0, f, key=jr.key(0), max_steps=5000))
    assert top == pytest.approx(ev[-1], rel=1e-6)


def test_bad_inputs():
    X, y = scaled_problem()
    problem = dd.LeastSquares(X, y)
    u0 = random_layers(0, 3, 5)
    with pytest.raises(ValueError, match="multiple of `save_every`"):
        dd.train(u0, problem, 0.1, steps=10, save_every=3)
    with pytest.raises(ValueError, match="batch_size"):
        dd.train(u0, problem, 0.1, steps=10, batch_size=11, key=jr.key(0))
    with pytest.raises(ValueError, match="`key` is required"):
        dd.train(u0, problem, 0.1, steps=10, batch_size=2)
    with pytest.raises(ValueError, match="step size"):
        dd.train(u0, problem, -0.1, steps=10)
    with pytest.raises(TypeError, match="optimizer"):
        dd.train(u0, problem, "adam", steps=10)
    with pytest.raises(TypeError, match="steps"):
        dd.train(u0, problem, 0.1, steps=10.0)
    with pytest.raises(ValueError, match="depth"):
        dd.train(u0[:1], problem, 0.1, steps=10)
    with pytest.raises(TypeError, match="data rows"):
        dd.train(u0, lambda th: jnp.sum(th**2), 0.1, steps=10, batch_size=2, key=jr.key(0))


def test_float32_inputs_promoted_with_x64():
    # x64 on: float32 inputs (the scan's carry crashed on them) are converted exactly to
    # float64: the same iterates as the float64 inputs of the same values, to the bit
    X, y = scaled_problem()
    X32, y32 = np.asarray(X, np.float32), np.asarray(y, np.float32)
    u32 = random_layers(4, 3, 5).astype(np.float32)
    a = dd.train(u32, dd.LeastSquares(X32, y32), 0.01, steps=20, save_every=5)
    b = dd.train(u32.astype(float), dd.LeastSquares(X32.astype(float), y32.astype(float)), 0.01,
                 steps=20, save_every=5)
    assert a.theta.dtype == jnp.float64
    np.testing.assert_array_equal(a.theta, b.theta)


def test_train_key_and_stationary_start():
    X, y = scaled_problem()
    p = dd.LeastSquares(X, y)
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        dd.train(random_layers(0, 2, 5), p, 0.01, steps=2, batch_size=2, key=0)
    # all-zero layers: every layer's gradient is 0 while grad L(0) = -2 X^T y is not
    assert np.abs(X.T @ y).max() > 0
    with pytest.warns(RuntimeWarning, match="train: `layers0` is a stationary point"):
        traj = dd.train(np.zeros((3, 5)), p, 0.01, steps=2)
    np.testing.assert_array_equal(traj.theta, 0.0)
