"""Implicit bias: the dual Newton prediction against long flows, KKT conditions and LPs."""


import equinox as eqx
import numpy as np
import pytest
from helpers import random_layers, random_problem, run_float32

import ddln_jax as dd
from experiments._bench_tools import _counting_compiles


def _sparse_problem(seed=0, n=5, d=10):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    truth = np.zeros(d)
    truth[[1, 6]] = [1.5, -2.0]
    return X, X @ truth


@pytest.mark.slow
@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_implicit_bias_equals_long_flow(depth, seed):
    X, y = random_problem(50 + seed, 4, 8)
    u0 = random_layers(60 + seed * 10 + depth, depth, 8, scale=0.8)
    assert np.abs(np.prod(u0, axis=0)).min() > 0  # theta0 != 0
    ib = dd.implicit_bias(u0, X, y)
    assert bool(ib.converged)
    p = dd.LeastSquares(X, y)
    traj = dd.gradient_flow(u0, p, t1=3000.0, ts=np.array([0.0, 3000.0]), rtol=1e-12,
                            atol=1e-14, solver="dopri8")
    assert bool(traj.ok) and float(traj.loss[-1]) < 1e-20
    np.testing.assert_allclose(traj.theta[-1], ib.theta, atol=1e-7)


def test_implicit_bias_with_closed_form_map_and_kkt():
    X, y = random_problem(9, 3, 6)
    u0 = random_layers(9, 2, 6)
    a = dd.implicit_bias(u0, X, y)
    b = dd.implicit_bias(u0, X, y, mirror=dd.ShallowMirrorMap.from_layers(u0))
    np.testing.assert_allclose(a.theta, b.theta, atol=1e-10)
    # KKT of argmin D_Q(theta, theta0) s.t. X theta = y: grad Q(theta) in range(X^T)
    np.testing.assert_allclose(X @ np.asarray(a.theta), y, atol=1e-10)
    g = np.asarray(dd.ShallowMirrorMap.from_layers(u0).grad_q(a.theta))
    proj = X.T @ np.linalg.lstsq(X.T, g, rcond=None)[0]
    np.testing.assert_allclose(proj, g, atol=1e-9)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_yun_limits_l1_and_l2(depth):
    X, y = _sparse_problem()
    l1 = np.asarray(dd.min_l1_interpolator(X, y))
    l2 = np.asarray(dd.min_l2_interpolator(X, y))
    np.testing.assert_allclose(X @ l1, y, atol=1e-9)
    np.testing.assert_allclose(l2, np.linalg.lstsq(X, y, rcond=None)[0], atol=1e-10)
    ubar = np.ones(X.shape[1])
    # L = 2 approaches l1 only logarithmically in alpha; for L >= 3 and alpha < 1e-2 the limit
    # is within the float64 floor (~1e-7) of min-l1 and the trend is noise.
    alphas = [3.0, 1.0, 0.3, 0.1, 0.01] + ([1e-4] if depth == 2 else [])
    thetas = []
    for a in alphas:
        ib = dd.implicit_bias(dd.init_yun(a, ubar, depth), X, y)
        assert bool(ib.converged), (a, float(ib.residual))
        thetas.append(np.asarray(ib.theta))
    d1 = [np.linalg.norm(t - l1) for t in thetas]
    d2 = [np.linalg.norm(t - l2) for t in thetas]
    assert all(b < a for a, b in zip(d1, d1[1:])), d1  # smaller alpha: closer to min-l1
    assert all(b > a for a, b in zip(d2, d2[1:])), d2  # larger alpha: closer to min-l2
    assert d1[-1] < 0.1 * np.linalg.norm(l1) and d2[0] < 0.01 * np.linalg.norm(l2)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_theorem1_bound_holds(depth):
    for n, d in ((4, 7), (9, 4)):
        X, y = random_problem(depth * 3 + n, n, d)
        u0 = random_layers(depth * 5 + n, depth, d)
        p = dd.LeastSquares(X, y)
        ts = dd.log_times(50.0, 60)
        traj = dd.gradient_flow(u0, p, t1=50.0, ts=ts, rtol=1e-10, atol=1e-12)
        ls = np.linalg.lstsq(X, y, rcond=None)[0]
        subopt = np.sum(((np.asarray(traj.theta) - ls) @ X.T) ** 2, axis=1)
        bound = np.asarray(dd.theorem1_bound(u0, p, ts))
        assert np.isinf(bound[0])
        assert np.all(subopt[1:] <= bound[1:] * (1 + 1e-8) + 1e-14)


def test_inconsistent_system_is_an_error():
    # rows [x0, x0, x1] with different targets for the repeated row: no theta interpolates
    X, y = random_problem(70, 2, 6)
    Xi, yi = np.stack([X[0], X[0], X[1]]), np.array([y[0], y[0] + 1.0, y[1]])
    u0 = random_layers(71, 3, 6)
    with pytest.raises(ValueError, match="inconsistent"):
        dd.implicit_bias(u0, Xi, yi)
    # the same rows with consistent targets: the repeated row is dropped, same limit
    ib = dd.implicit_bias(u0, np.stack([X[0], X[0], X[1]]), np.array([y[0], y[0], y[1]]))
    ref = dd.implicit_bias(u0, X, y)
    assert bool(ib.converged) and ib.omega.shape == (3,)
    np.testing.assert_allclose(ib.theta, ref.theta, atol=1e-10)


def test_not_converged_warns():
    X, y = random_problem(72, 3, 6)
    with pytest.warns(RuntimeWarning, match="not converged"):
        ib = dd.implicit_bias(random_layers(73, 3, 6), X, y, max_steps=1)
    assert not bool(ib.converged)


@pytest.mark.parametrize("depth", [2, 3])
def test_difference_parameterization_equals_long_flow(depth):
    # u^D - v^D: the tied map on the lifted problem [X, -X]; the flow is independent
    X, y = random_problem(74 + depth, 3, 6)
    rng = np.random.default_rng(depth)
    u0, v0 = 0.3 + 0.2 * rng.random(6), 0.3 + 0.2 * rng.random(6)
    ib = dd.implicit_bias((u0, v0), dd.LeastSquares(X, y), parameterization=dd.difference(depth))
    traj = dd.gradient_flow((u0, v0), dd.LeastSquares(X, y), t1=5000.0, ts=np.array([5000.0]),
                            parameterization=dd.difference(depth), rtol=1e-11, atol=1e-13,
                            stop_when_converged=1e-12)
    assert bool(ib.converged) and bool(traj.ok)
    # the flow stops at ||grad L||_inf <= 1e-12: theta within ~1e-9 of its limit
    np.testing.assert_allclose(ib.theta, traj.theta[-1], atol=1e-8)
    # and it is not the product network's prediction from the same numbers
    prod = dd.implicit_bias(np.stack([u0, v0]), X, y)
    assert np.max(np.abs(prod.theta - ib.theta)) > 1e-3


@pytest.mark.parametrize("depth", [2, 3])
def test_tied_parameterization_and_mirror_without_layers(depth):
    # theta = u^L stays > 0 along the flow: targets from a positive theta are reachable
    X, _ = random_problem(80, 2, 5)
    y = X @ np.linspace(0.3, 0.8, 5)
    u0 = np.full(5, 0.7)
    ib = dd.implicit_bias(u0, X, y, parameterization=dd.tied(depth))
    traj = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=5000.0, ts=np.array([5000.0]),
                            parameterization=dd.tied(depth), rtol=1e-11, atol=1e-13,
                            stop_when_converged=1e-12)
    assert bool(ib.converged) and bool(traj.ok)
    np.testing.assert_allclose(ib.theta, traj.theta[-1], atol=1e-8)
    again = dd.implicit_bias(problem=dd.LeastSquares(X, y), mirror=dd.TiedMirrorMap(u0, depth))
    np.testing.assert_allclose(again.theta, ib.theta, atol=1e-12)


def test_bad_inputs():
    X, y = random_problem(81, 3, 5)
    u0 = random_layers(82, 3, 5)
    with pytest.raises(TypeError, match="complex"):
        dd.implicit_bias(u0, X.astype(complex), y)
    with pytest.raises(ValueError, match="`layers0` has dim 4"):
        dd.implicit_bias(u0[:, :4], X, y)
    with pytest.raises(ValueError, match="parameterization"):
        dd.implicit_bias(u0, X, y, parameterization=lambda u: u[0] * u[1])
    with pytest.raises(ValueError, match=r"\(u0, v0\)"):
        dd.implicit_bias(u0, X, y, parameterization=dd.difference(2))
    with pytest.raises(TypeError, match="layers0"):
        dd.implicit_bias(problem=dd.LeastSquares(X, y))
    with pytest.raises(ValueError, match="n=6 > dim=5"):
        dd.implicit_bias(u0, np.vstack([X, X]), np.concatenate([y, y]))


def test_float32_converged_is_honest(tmp_path):
    # x64 is on in this process: run float32 in a subprocess. float32 cannot reach the
    # default tol 1e-12: `converged` must be False, with a warning naming float64
    code = (
        "import warnings, numpy as np, ddln_jax as dd\n"
        "rng = np.random.default_rng(0)\n"
        "X, y = rng.standard_normal((3, 6)), rng.standard_normal(3)\n"
        "u0 = rng.standard_normal((3, 6))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ib = dd.implicit_bias(u0, X, y)\n"
        "r = float(np.linalg.norm(X @ np.asarray(ib.theta, np.float64) - y))\n"
        "print(ib.theta.dtype, bool(ib.converged), r > 1e-12 * (1 + np.linalg.norm(y)),\n"
        "      any('float64' in str(m.message) for m in w))\n"
    )
    assert run_float32(code, tmp_path) == ["float32", "False", "True", "True"]


def test_float32_inputs_promoted_with_x64():
    # x64 on: float32 inputs (the Newton loop's carry crashed on them) are converted exactly,
    # giving the float64 prediction of the same values, which satisfies X theta = y
    X, y = random_problem(5, 3, 6)
    u0 = random_layers(5, 3, 6)
    X32, y32, u32 = (a.astype(np.float32) for a in (X, y, u0))
    a = dd.implicit_bias(u32, dd.LeastSquares(X32, y32))
    b = dd.implicit_bias(u32.astype(float), dd.LeastSquares(X32.astype(float), y32.astype(float)))
    assert bool(a.converged) and a.theta.dtype == np.float64
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_allclose(X32.astype(float) @ np.asarray(a.theta), y32, atol=1e-10)


def test_one_program_and_no_retrace(monkeypatch):
    # a call is one compiled program (nothing op by op around it), traced once per shape:
    # new values of the layers, X and y of the same shapes neither retrace nor compile
    from ddln_jax import _bias

    guarded = eqx.filter_jit(eqx.debug.assert_max_traces(_bias._solve.__wrapped__, max_traces=2))
    monkeypatch.setattr(_bias, "_solve", guarded)
    X, y = random_problem(31, 3, 5)
    dd.implicit_bias(random_layers(31, 3, 5), X[:2], y[:2])  # (another shape: warms up JAX)
    X, y = random_problem(32, 2, 7)
    u0, u1, X2, y1 = random_layers(32, 3, 7), random_layers(33, 3, 7), 2 * X, y + 1
    with _counting_compiles() as first:
        a = dd.implicit_bias(u0, X, y)
    with _counting_compiles() as second:
        b = dd.implicit_bias(u1, X2, y1)
    assert first["n"] == 1 and second["n"] == 0
    # the system it solved: X theta = y, each time
    assert a.converged and b.converged
    np.testing.assert_allclose(X @ np.asarray(a.theta), y, atol=1e-10)
    np.testing.assert_allclose(X2 @ np.asarray(b.theta), y1, atol=1e-10)
