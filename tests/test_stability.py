"""Stability at an interpolator (ddln_jax/_stability.py): the closed-form sharpness against
the autodiff Hessian of `dd.sharpness`, and the predicted threshold against real GD runs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddln_jax as dd
from tests.helpers import random_layers, random_problem

N, D = 3, 6


def _problem(seed=0):
    X, y = random_problem(seed, N, D)
    return dd.LeastSquares(X, y)


def _layers(depth, seed=0):
    return jnp.asarray(random_layers(seed, depth, D, 0.3) + (0.5 if depth > 2 else 0.0))


@pytest.mark.parametrize("depth", (2, 3, 5))
def test_interpolator_sharpness_is_the_autodiff_hessian(depth, getkey):
    prob, layers0 = _problem(depth), _layers(depth, depth)
    traj = dd.train(layers0, prob, 0.01, steps=100_000, save_every=100_000)
    assert float(traj.loss[-1]) < 1e-24
    closed = dd.interpolator_sharpness(traj.layers[-1], prob)
    power = dd.sharpness(traj.layers[-1], prob, key=getkey(), rtol=1e-13, max_steps=5000)
    np.testing.assert_allclose(closed, power, rtol=1e-8)  # power iteration's tolerance


@pytest.mark.parametrize("depth", (2, 3))
def test_stability_threshold(depth):
    prob, layers0 = _problem(), _layers(depth)
    st = dd.max_stable_step(layers0, prob)
    assert bool(st.converged)
    # the threshold is where the predicted limit's sharpness, in closed form, is 2 / gamma
    np.testing.assert_allclose(st.step_size * st.sharpness, 2.0, rtol=1e-8)
    gammas = st.step_size * jnp.array([0.95, 1.05])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a run above gamma* may diverge
        runs = jax.vmap(lambda g: dd.train(layers0, prob, g, steps=40_000, save_every=40_000))(
            gammas
        )
    assert bool(runs.ok[0]) and float(runs.loss[0, -1]) < 1e-24  # converges below gamma*
    # above gamma* GD diverges or (edge of stability) converges elsewhere: not to the
    # predicted minimum, which is unstable there; the minimum it reaches is stable
    pred = dd.gd_bias(layers0, prob, float(gammas[1]))
    lam_pred = dd.interpolator_sharpness(jnp.asarray(_limit_layers(pred)), prob)
    assert float(gammas[1] * lam_pred / 2) > 1.0
    if bool(runs.ok[1]) and float(runs.loss[1, -1]) < 1e-24:
        lam = dd.interpolator_sharpness(runs.layers[1, -1], prob)
        assert float(gammas[1] * lam / 2) < 1.0
        assert float(jnp.linalg.norm(pred.theta - runs.theta[1, -1])) > 1e-3


def _limit_layers(pred):
    """The layers at the predicted limit: the flow from the effective init, in closed form
    through the reduced variables (theta = s v1 prod sqrt(v1^2 + Delta_j)), written out."""
    u0 = np.asarray(pred.layers0_eff)
    k = np.argmin(np.abs(u0), axis=0)
    theta = np.asarray(pred.theta)
    out = np.empty_like(u0)
    for i in range(u0.shape[1]):
        others = np.delete(u0[:, i], k[i])
        deltas = others**2 - u0[k[i], i] ** 2
        s = np.sign(np.prod(others))
        # solve s v prod sqrt(v^2 + Delta) = theta_i for v (monotone): bisection
        f = lambda v: s * v * np.prod(np.sqrt(v**2 + deltas)) - theta[i]  # noqa: E731
        lo, hi = -1e3, 1e3
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) * s < 0 else (lo, mid)
        v = 0.5 * (lo + hi)
        col = np.sign(others) * np.sqrt(v**2 + deltas)
        out[:, i] = np.insert(col, k[i], v)
    return out


def test_bad_inputs():
    with pytest.warns(RuntimeWarning, match="not at an interpolator"):
        dd.interpolator_sharpness(_layers(2), _problem())
    with pytest.raises(TypeError, match="LeastSquares"):
        dd.interpolator_sharpness(_layers(2), lambda th: jnp.sum(th**2))
    with pytest.raises(ValueError, match="inconsistent"):
        X = np.vstack([np.asarray(_problem().X)[:2], np.asarray(_problem().X)[:1]])
        dd.max_stable_step(_layers(2), dd.LeastSquares(X, np.array([1.0, 2.0, 3.0])))
