"""Losses: least squares quantities against numpy, other losses and callables through the flow."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from helpers import random_problem

import ddln_jax as dd


def test_callable_and_other_losses(getkey):
    X = jr.normal(getkey(), (8, 4))
    y = jr.normal(getkey(), (8,))
    u0 = dd.init_gaussian(getkey(), 3, 4)
    ts = jnp.linspace(0, 2, 5)
    a = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=2.0, ts=ts)
    b = dd.gradient_flow(u0, lambda th: jnp.sum((X @ th - y) ** 2), t1=2.0, ts=ts)
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-12, atol=1e-14)
    labels = jnp.sign(y)
    for loss in (dd.Logistic(X, labels), dd.Exponential(X, labels)):
        traj = dd.gradient_flow(u0, loss, t1=2.0, ts=ts)
        assert bool(traj.ok)
        assert bool(jnp.all(jnp.diff(traj.loss) <= 1e-12))  # the loss never increases


def test_least_squares_quantities():
    X, y = random_problem(0, 5, 8)  # rank-deficient X^T X (n < d)
    p = dd.LeastSquares(X, y)
    th = np.random.default_rng(0).standard_normal(8)
    np.testing.assert_allclose(p.grad(th), 2 * X.T @ (X @ th - y), rtol=1e-12)
    np.testing.assert_allclose(p.loss(th), np.sum((X @ th - y) ** 2), rtol=1e-12)
    ls = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(p.theta_ls, ls, atol=1e-12)
    ev = np.linalg.eigvalsh(X.T @ X)
    np.testing.assert_allclose(p.pl_constant, 2 * ev[ev > 1e-9].min(), rtol=1e-9)
    assert float(p.min_value) < 1e-20
    X2, y2 = random_problem(1, 9, 3)  # n > d: L* > 0
    p2 = dd.LeastSquares(X2, y2)
    np.testing.assert_allclose(p2.suboptimality(th[:3]), p2.loss(th[:3]) - p2.min_value,
                               rtol=1e-10)
    # PL inequality at random points, with mu from an independent eigendecomposition
    for s in range(5):
        t = np.random.default_rng(s).standard_normal(3) * 3
        g = p2.grad(t)
        assert 2 * float(p2.pl_constant) * float(p2.suboptimality(t)) <= float(g @ g) * (1 + 1e-10)
