"""Losses: least squares quantities against numpy, other losses and callables through the flow."""

import jax
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


def test_stable_log_losses_against_closed_forms():
    # log L in float64 where nothing underflows: closed forms with numpy; far beyond (margins
    # ~ 1e4, L ~ e^{-1e4}) the asymptotics log L = logsumexp(-m) + O(e^{-m}) (logistic)
    from scipy.special import logsumexp

    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 4))
    y = np.sign(X @ rng.standard_normal(4))
    m_dir = y * (X @ np.sign(X.T @ y))
    th0 = np.sign(X.T @ y) / np.min(m_dir)  # every margin >= 1
    for s in (-2.0, 0.3, 1.0, 5.0, 40.0, 300.0):
        th = s * th0
        m = y * (X @ th)
        lg, ex = dd.Logistic(X, y), dd.Exponential(X, y)
        np.testing.assert_allclose(lg.log_loss(th), np.log(np.sum(np.log1p(np.exp(-m)))),
                                   rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ex.log_loss(th), np.log(np.sum(np.exp(-m))), rtol=1e-13)
        # grad log L = -sum_n w_n y_n x_n / L, w_n = phi'(m_n) by hand
        w = np.exp(-m) / (1 + np.exp(-m))
        g = -(X.T @ (y * w)) / np.sum(np.log1p(np.exp(-m)))
        np.testing.assert_allclose(jax.grad(lg.log_loss)(th), g, rtol=1e-11, atol=1e-300)
        # float64 losses of 1e-200 and below: finite, with finite gradients
        assert np.isfinite(float(lg.loss(th))) and not np.any(np.isnan(lg.grad(th)))
    for s in (1e4, 1e6):
        th = s * th0
        m = y * (X @ th)
        for p in (dd.Logistic(X, y), dd.Exponential(X, y)):
            np.testing.assert_allclose(p.log_loss(th), logsumexp(-m), rtol=1e-14)
            g = np.asarray(jax.grad(p.log_loss)(th))
            wts = np.exp(-m - logsumexp(-m))
            np.testing.assert_allclose(g, -(X.T @ (y * wts)), rtol=1e-10, atol=1e-14)
            assert float(p.loss(th)) == 0.0  # L itself underflows: why log_loss exists
