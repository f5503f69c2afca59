"""Weight decay (ddln_jax/_weight_decay.py): depth 2 against a Lasso solved by coordinate
descent in NumPy; depth >= 3 against gradient descent with weight decay (`dd.train` with
optax), with the first-order conditions and the balance written out by hand."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddln_jax as dd
from tests.helpers import random_layers, random_problem


def _lasso_cd(X, y, lam, sweeps=200_000, tol=1e-15):
    """min ||X theta - y||^2 + lam ||theta||_1 by cyclic coordinate descent (soft threshold)."""
    theta = np.zeros(X.shape[1])
    r = y.copy()
    col = np.sum(X * X, axis=0)
    for _ in range(sweeps):
        biggest = 0.0
        for i in range(X.shape[1]):
            rho = X[:, i] @ r + col[i] * theta[i]
            new = np.sign(rho) * max(abs(rho) - lam / 2, 0.0) / col[i]
            r -= X[:, i] * (new - theta[i])
            biggest = max(biggest, abs(new - theta[i]))
            theta[i] = new
        if biggest <= tol:
            break
    return theta


def _first_order(X, y, theta, lam, depth):
    """max |2 X_i^T r + lam sign(theta_i) |theta_i|^{2/L - 1}| over the support."""
    c = 2 * X.T @ (X @ theta - y)
    on = theta != 0
    return np.max(np.abs(c[on] + lam * np.sign(theta[on]) * np.abs(theta[on]) ** (2 / depth - 1)))


@pytest.mark.parametrize("seed", (0, 1))
@pytest.mark.parametrize("lam", (0.3, 1.0))
def test_depth2_is_the_lasso(seed, lam):
    X, y = random_problem(seed, 4, 8)
    ref = _lasso_cd(X, y, lam)
    res = dd.weight_decay_limit(None, dd.LeastSquares(X, y), lam, depth=2)
    assert bool(res.converged)
    np.testing.assert_allclose(res.theta, ref, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(res.support), ref != 0)
    np.testing.assert_allclose(np.prod(np.asarray(res.layers), axis=0), ref, atol=1e-8)


def test_depth2_gd_with_weight_decay_lands_on_the_lasso():
    X, y = random_problem(0, 4, 8)
    lam, prob = 0.3, dd.LeastSquares(X, y)
    layers0 = jnp.asarray(random_layers(0, 2, 8, 0.3))
    opt = optax.chain(optax.add_decayed_weights(lam), optax.sgd(0.01))
    run = dd.train(layers0, prob, opt, steps=100_000, save_every=100_000)
    np.testing.assert_allclose(run.theta[-1], _lasso_cd(X, y, lam), atol=1e-8)
    res = dd.weight_decay_limit(layers0, prob, lam)
    np.testing.assert_allclose(res.theta, run.theta[-1], atol=1e-8)


@pytest.mark.parametrize("depth,lam", ((3, 0.5), (4, 0.1)))
def test_deep_stationary_point_reached_by_gd(depth, lam):
    X, y = random_problem(0, 3, 6)
    prob = dd.LeastSquares(X, y)
    layers0 = jnp.asarray(random_layers(0, depth, 6, 0.3) + 0.5)
    res = dd.weight_decay_limit(layers0, prob, lam)
    assert bool(res.converged) and bool(jnp.any(res.support))
    th = np.asarray(res.theta)
    assert _first_order(X, y, th, lam, depth) <= 1e-8
    # small-step GD with weight decay (optax) from the same init lands on the same point
    opt = optax.chain(optax.add_decayed_weights(lam), optax.sgd(0.01))
    run = dd.train(layers0, prob, opt, steps=200_000, save_every=200_000)
    u = np.asarray(run.layers[-1])
    gd = np.prod(u, axis=0)
    np.testing.assert_allclose(th, gd, atol=1e-8)
    on = np.abs(gd) > 1e-12
    assert _first_order(X, y, np.where(on, gd, 0.0), lam, depth) <= 1e-8
    assert np.max(np.ptp(u**2, axis=0)) <= 1e-8  # GD's limit is balanced
    assert float(res.balance) <= 1e-8
    # the layers returned are balanced with product theta
    np.testing.assert_allclose(np.ptp(np.asarray(res.layers) ** 2, axis=0), 0, atol=1e-14)
    np.testing.assert_allclose(np.prod(np.asarray(res.layers), axis=0), th, atol=1e-14)
    # and the penalised objectives agree: the u-space one at the balanced layers equals the
    # theta-space one (AM-GM with equality)
    lu = np.sum((X @ th - y) ** 2) + lam / 2 * np.sum(np.asarray(res.layers) ** 2)
    lt = np.sum((X @ th - y) ** 2) + lam * depth / 2 * np.sum(np.abs(th) ** (2 / depth))
    np.testing.assert_allclose(lu, lt, rtol=1e-13)


def test_bad_inputs():
    X, y = random_problem(0, 3, 6)
    prob = dd.LeastSquares(X, y)
    layers0 = jnp.asarray(random_layers(0, 3, 6, 0.3))
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`weight_decay`"):
            dd.weight_decay_limit(layers0, prob, lam)
    with pytest.raises(ValueError, match="`depth`"):
        dd.weight_decay_limit(layers0, prob, 0.1, depth=2)
    with pytest.raises(ValueError, match="`layers0`"):
        dd.weight_decay_limit(None, prob, 0.1, depth=3)
    with pytest.raises(TypeError, match="LeastSquares"):
        dd.weight_decay_limit(layers0, lambda th: jnp.sum(th**2), 0.1)
