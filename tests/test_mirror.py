import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_layers, random_problem
from scipy.integrate import quad

import ddln_jax as dd


def _interior_xis(m, num=7):
    lo, hi = (np.asarray(v) for v in m.domain())
    lo, hi = np.maximum(lo, -3.0), np.minimum(hi, 3.0)
    fr = np.linspace(0.02, 0.98, num)[:, None]
    return lo + fr * (hi - lo)


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
def test_inverse_gradient_and_metric(depth):
    u0 = random_layers(depth, depth, 4)
    m = dd.MirrorMap.from_layers(u0)
    for xi in _interior_xis(m):
        th = m.psi(xi)
        np.testing.assert_allclose(m.grad_q(th), xi, rtol=1e-11, atol=1e-13)  # grad Q o Psi = id
        # dPsi/dxi by central differences equals the metric formula
        h = 1e-6 * (1 + np.abs(xi))
        dpsi = (m.psi(xi + h) - m.psi(xi - h)) / (2 * h)
        np.testing.assert_allclose(m.metric(th), dpsi, rtol=1e-6)
        # Q' = grad Q by fourth-order central differences of the scalar potential, one
        # coordinate at a time (the others at theta0, where their terms vanish)
        th0 = np.asarray(dd.theta(u0))
        for i in range(4):
            base = th0.copy()
            base[i] = float(th[i])
            e = np.zeros(4)
            e[i] = 1e-4 * (1 + abs(base[i]))
            dq = (8 * (m.q(base + e) - m.q(base - e)) - (m.q(base + 2 * e) - m.q(base - 2 * e)))
            # error: truncation ~h^4 plus rounding of Q = theta xi - Q* (~1e-16 |theta xi| / h)
            np.testing.assert_allclose(dq / (12 * e[i]), m.grad_q(th)[i], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.grad_q(dd.theta(u0)), 0.0, atol=1e-14)  # normalisation


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_mirror_identity_along_flow(depth):
    # theta(t) = Psi(xi(t)) and M(t) = metric(theta(t)) along an independently solved flow
    X, y = random_problem(depth, 6, 4)
    u0 = random_layers(depth + 1, depth, 4)
    traj = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=5.0, ts=np.linspace(0, 5, 26),
                            rtol=1e-11, atol=1e-13)
    m = dd.MirrorMap.from_layers(u0)
    psi = jax.vmap(m.psi)(traj.xi)
    np.testing.assert_allclose(psi, traj.theta, rtol=1e-7, atol=1e-9)
    mt = jax.vmap(m.metric)(traj.theta)
    np.testing.assert_allclose(mt, jax.vmap(dd.metric_diag)(traj.layers), rtol=1e-7)


def test_numerical_equals_shallow_closed_form():
    u0 = random_layers(0, 2, 5)
    num, closed = dd.MirrorMap.from_layers(u0), dd.ShallowMirrorMap.from_layers(u0)
    th0 = dd.theta(u0)
    for xi in _interior_xis(num):
        np.testing.assert_allclose(num.psi(xi), closed.psi(xi), rtol=1e-10, atol=1e-12)
        th = closed.psi(xi)
        np.testing.assert_allclose(num.grad_q(th), closed.grad_q(th), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(num.metric(th), closed.metric(th), rtol=1e-10)
        np.testing.assert_allclose(num.bregman(th, th0), closed.bregman(th, th0), rtol=1e-10,
                                   atol=1e-13)


@pytest.mark.parametrize("depth", [3, 4])
def test_numerical_equals_yun_closed_form(depth):
    ubar = np.array([1.0, -0.6, 1.7, 0.4])
    alpha = 0.8
    num = dd.MirrorMap.from_layers(dd.init_yun(alpha, ubar, depth))
    closed = dd.YunMirrorMap(alpha, ubar, depth)
    np.testing.assert_allclose(num.domain()[1], closed.domain()[1], rtol=1e-10)
    np.testing.assert_allclose(num.domain()[0], closed.domain()[0], rtol=1e-10)
    for xi in _interior_xis(num):
        np.testing.assert_allclose(num.psi(xi), closed.psi(xi), rtol=1e-10)
        th = closed.psi(xi)
        np.testing.assert_allclose(num.grad_q(th), xi, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(num.metric(th), closed.metric_xi(xi), rtol=1e-10)
        np.testing.assert_allclose(num.q(th), closed.q(th), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_tied_closed_form(depth):
    # (i) the corrected eq 28 against the tied flow theta = u^L solved by diffrax, and
    # (ii) grad Q = int dtheta / M(theta) and Q = int grad Q by scipy quadrature.
    rng = np.random.default_rng(depth)
    X = np.abs(rng.standard_normal((5, 3)))
    y = X @ np.abs(rng.standard_normal(3))
    u0 = 0.5 + np.abs(rng.standard_normal(3))
    traj = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=2.0, ts=np.linspace(0, 2, 11),
                            parameterization=dd.tied(depth), rtol=1e-11, atol=1e-13)
    tied = dd.TiedMirrorMap(u0, depth)
    np.testing.assert_allclose(jax.vmap(tied.psi)(traj.xi), traj.theta, rtol=1e-8)
    np.testing.assert_allclose(jax.vmap(tied.grad_q)(traj.theta), traj.xi, rtol=1e-7, atol=1e-9)
    th0 = u0**depth
    for th in (0.3 * th0, 2.5 * th0):
        for i in range(3):
            metric_i = lambda t, i=i: float(tied.metric(jnp.full(3, t))[i])  # noqa: E731
            gq = quad(lambda t: 1 / metric_i(t), th0[i], th[i], epsabs=1e-14, epsrel=1e-13)[0]
            np.testing.assert_allclose(tied.grad_q(th)[i], gq, rtol=1e-10, atol=1e-14)
        d_num = sum(
            quad(lambda t, i=i: float(tied.grad_q(jnp.full(3, t))[i]), th0[i], th[i],
                 epsabs=1e-14, epsrel=1e-12)[0]
            for i in range(3)
        )
        np.testing.assert_allclose(tied.bregman(th, th0), d_num, rtol=1e-9)


def test_domain_bounded_for_deep_and_psi_blows_up():
    u0 = random_layers(3, 3, 2)
    m = dd.MirrorMap.from_layers(u0)
    lo, hi = (np.asarray(v) for v in m.domain())
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < 0) and np.all(hi > 0)
    near = np.asarray(m.psi(hi * (1 - 1e-6)))
    assert np.all(np.abs(near) > 1e3 * np.abs(np.asarray(m.psi(0.5 * hi))))
    assert np.all(np.isinf(np.asarray(m.psi(hi * 1.01))))
    m2 = dd.MirrorMap.from_layers(random_layers(3, 2, 2))
    assert np.all(np.isinf(np.asarray(m2.domain()[1])))


def test_mirror_map_requires_assumption_a():
    u0 = random_layers(0, 3, 3)
    u0[1] = u0[0]
    u0[2] = 3 + np.abs(u0[0])
    with pytest.raises(ValueError, match="Assumption \\(A\\)"):
        dd.MirrorMap.from_layers(u0)

