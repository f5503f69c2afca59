"""The saddle-to-saddle path (DESIGN §6) against independent routes: long scipy flows of the
layers (LSODA, float64), thresholds by scipy quadrature or closed forms, end points by
scipy `linprog`/`lstsq`. Nothing is compared with numbers of the code under test alone."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from scipy.integrate import quad, solve_ivp
from scipy.optimize import brentq, linprog

import ddln_jax as dd

# A problem whose path drops a coordinate (found by a search over seeds, rounded): coordinate
# 3 enters first, then coordinate 1 makes it useless and it leaves (support not monotone).
X_DROP = np.array([
    [-0.3626, 1.8245, -0.7625, 2.8019, 1.5095],
    [0.1694, 0.9583, 0.4410, 0.3078, -1.7001],
    [0.4395, 1.0538, -1.5083, 1.9986, -0.8030],
])
Y_DROP = np.array([-1.0021, -0.0017, -0.1940])


# ---------------------------------------------------------------- independent references


def _rhs(X, y, depth, d):
    def rhs(t, flat):
        u = flat.reshape(depth, d)
        g = 2.0 * X.T @ (X @ np.prod(u, 0) - y)
        return np.stack([-np.prod(np.delete(u, j, 0), 0) * g for j in range(depth)]).ravel()

    return rhs


def _solve(X, y, layers0, ts):
    """Layers at `ts` by LSODA (switches to BDF on the stiff plateaus); atol below alpha."""
    depth, d = layers0.shape
    sol = solve_ivp(_rhs(X, y, depth, d), (ts[0], ts[-1]), layers0.ravel(), t_eval=ts,
                    method="LSODA", rtol=1e-11, atol=1e-13 * np.max(np.abs(layers0)))
    assert sol.success, sol.message
    return sol.y.T.reshape(-1, depth, d)


def _loss(X, y, u):
    return np.sum((np.prod(u, -2) @ X.T - y) ** 2, -1)


def _crossing(X, y, u_prev, t_prev, t_next, level, depth=2):
    """Where the loss crosses `level` in [t_prev, t_next], refined by re-integration."""
    ts = np.linspace(t_prev, t_next, 200)
    u = _solve(X, y, u_prev, ts)
    lo = _loss(X, y, u)
    j = int(np.argmax(lo < level))
    if depth > 0:
        return _crossing(X, y, u[j - 1], ts[j - 1], ts[j], level, depth - 1)
    f = (lo[j - 1] - level) / (lo[j - 1] - lo[j])
    return ts[j - 1] + f * (ts[j] - ts[j - 1])


def _flow(X, y, layers0, levels, t_probe, t_end, num=2000):
    """The flow's jump times (loss halfway between consecutive `levels`, the loss is
    non-increasing) and theta at the times `t_probe`."""
    ts = np.unique(np.concatenate([[0.0], np.geomspace(t_end * 1e-8, t_end, num), t_probe]))
    u = _solve(X, y, layers0, ts)
    lo = _loss(X, y, u)
    times = []
    for a, b in zip(levels[:-1], levels[1:]):
        mid = 0.5 * (a + b)
        j = int(np.argmax(lo < mid))
        assert lo[j] < mid, "the flow never reached the next plateau"
        times.append(_crossing(X, y, u[j - 1], ts[j - 1], ts[j], mid))
    probe = np.prod(u[np.searchsorted(ts, t_probe)], axis=1)
    return np.array(times), probe, ts, lo


def _edges(layers0):
    """(e^-, e^+) = int dtheta / M on each side of theta0, in the minimal layer v:
    dxi/dv = s prod_{j>=2} (v^2 + Delta_j)^{-1/2} (Prop 1), by scipy quad."""
    layers0 = np.asarray(layers0)
    lo, hi = [], []
    for col in layers0.T:
        k = int(np.argmin(np.abs(col)))
        a, others = col[k], np.delete(col, k)
        deltas, s = others**2 - a**2, np.prod(np.sign(others))
        h = lambda v, dl=deltas: np.prod((v * v + dl) ** -0.5)  # noqa: E731
        right = quad(h, a, np.inf, epsabs=0, epsrel=1e-12, limit=200)[0]
        left = quad(h, -np.inf, a, epsabs=0, epsrel=1e-12, limit=200)[0]
        hi.append(right if s > 0 else left)
        lo.append(left if s > 0 else right)
    return np.array(lo), np.array(hi)


def _weighted_l1(X, y, w_minus, w_plus, normal_equations=False):
    """argmin sum w+ beta+ + w- beta- s.t. X beta = y (or X^T X beta = X^T y), HiGHS."""
    A, b = (X.T @ X, X.T @ y) if normal_equations else (X, y)
    d = X.shape[1]
    res = linprog(np.concatenate([w_plus, w_minus]), A_eq=np.hstack([A, -A]), b_eq=b,
                  bounds=(0, None), method="highs")
    assert res.success
    return res.x[:d] - res.x[d:]


def _init(kind, alpha, depth, d, seed):
    rng = np.random.default_rng(seed)
    if kind == "yun_uniform":
        return np.asarray(dd.init_yun(alpha, jnp.ones(d), depth))
    if kind == "yun_shape":
        return np.asarray(dd.init_yun(alpha, jnp.asarray(rng.uniform(0.5, 2.0, d)), depth))
    if kind == "zero_first":
        return alpha * np.concatenate([np.zeros((1, d)), rng.standard_normal((depth - 1, d))])
    return alpha * rng.standard_normal((depth, d))  # gaussian: asymmetric e^+ != e^-


def _compare(X, y, layers0):
    """Rescaled jump-time errors, saddle errors (flow theta mid-plateau vs beta_k), flow
    theta there, and relative jump-time errors."""
    path = dd.saddle_path(layers0, dd.LeastSquares(X, y))
    tp = np.asarray(path.jump_times)
    probe = np.sqrt(tp[:-1] * tp[1:])  # mid-plateau in log time, plateaus 1..K-1
    t_flow, theta, _, _ = _flow(X, y, layers0, np.asarray(path.plateau_losses), probe,
                                4 * tp[-1] + 20)
    jump_err = np.abs(t_flow - tp) / float(path.time_scale)
    rel_err = np.abs(t_flow - tp) / tp
    saddle_err = np.max(np.abs(theta - np.asarray(path.saddles)[1:-1]), axis=1)
    return path, jump_err, saddle_err, theta, rel_err


# ---------------------------------------------------------------- thresholds


@pytest.mark.parametrize("depth", (2, 3, 4, 5))
@pytest.mark.parametrize("kind", ("yun_uniform", "gaussian", "zero_first"))
def test_thresholds_independent(depth, kind):
    layers0 = _init(kind, 1e-2, depth, 4, seed=depth)
    e_minus, e_plus = (np.asarray(e) for e in dd.saddle_path(
        layers0, dd.LeastSquares(np.eye(4), np.ones(4))).thresholds)
    if depth == 2:
        # u = u0 cosh xi + v0 sinh xi, v = v0 cosh xi + u0 sinh xi solve the depth-2 flow
        # in xi; the threshold is where theta = uv reaches +-1.
        ref_p, ref_m = [], []
        for u0, v0 in layers0.T:
            th = lambda x, u0=u0, v0=v0: ((u0 * np.cosh(x) + v0 * np.sinh(x))  # noqa: E731
                                          * (v0 * np.cosh(x) + u0 * np.sinh(x)))
            ref_p.append(brentq(lambda x: th(x) - 1, 0, 60, xtol=1e-14))
            ref_m.append(-brentq(lambda x: th(x) + 1, -60, 0, xtol=1e-14))
        ref_m, ref_p = np.array(ref_m), np.array(ref_p)
    else:
        ref_m, ref_p = _edges(layers0)
    # quadrature and root finding to ~1e-12 relative
    np.testing.assert_allclose(e_plus, ref_p, rtol=1e-9)
    np.testing.assert_allclose(e_minus, ref_m, rtol=1e-9)
    if kind == "yun_uniform" and depth in (3, 4):
        c = 1e-2  # closed forms (DESIGN §3): pi/(2c) for L = 3, 1/c^2 for L = 4
        np.testing.assert_allclose(e_plus, np.pi / (2 * c) if depth == 3 else c**-2, rtol=1e-9)


# ---------------------------------------------------------------- jump times and saddles


def test_depth2_deactivation_against_flows():
    alphas = (1e-2, 1e-4, 1e-8, 1e-16)
    results = [_compare(X_DROP, Y_DROP, _init("yun_uniform", a, 2, 5, 0)) for a in alphas]
    jump = np.array([r[1] for r in results])
    saddle = np.array([r[2] for r in results])
    # every jump and every saddle gets closer as alpha decreases
    assert np.all(np.diff(jump, axis=0) < 0), jump
    assert np.all(np.diff(saddle, axis=0) < 0), saddle
    # like 1/ln(1/alpha): halving from 1e-8 to 1e-16 (0.5, with slack for the O(1/ln^2) term)
    assert np.all(jump[-1] < 0.6 * jump[-2]), jump
    # the flow itself leaves coordinate 3 (no reference to the prediction's signs)
    theta = results[-1][3]
    assert abs(theta[1, 3]) > 0.2 and abs(theta[2, 3]) < 1e-2, theta
    signs = np.asarray(results[-1][0].signs)
    assert signs[2, 3] != 0 and signs[3, 3] == 0


@pytest.mark.parametrize("depth", (3, 4))
@pytest.mark.parametrize("kind", ("yun_uniform", "yun_shape", "zero_first", "gaussian"))
def test_deep_jumps_against_flows(depth, kind):
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((3, 5)), rng.standard_normal(3)
    alphas = (1e-1, 1e-2, 1e-3) if depth == 3 else (1e-1, 3e-2, 1e-2)
    out = [_compare(X, y, _init(kind, a, depth, 5, seed=11)) for a in alphas]
    jump = np.array([np.max(r[1]) for r in out])
    saddle = np.array([np.max(r[2]) for r in out])
    # §6 predicts O(1) absolute time errors, relative O(alpha^(L-2)): a factor
    # (alpha ratio)^(L-2) (0.1 or ~0.1) per step; 0.3 allows for the constant changing
    ratio = jump[1:] / jump[:-1]
    assert np.all(ratio < 0.3), jump
    assert np.all(np.diff(saddle) < 0), saddle
    rel = np.max(out[-1][4])
    assert rel < 1e-2 and saddle[-1] < 1e-2, (rel, saddle)


def test_overdetermined_against_flow():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((6, 3)), rng.standard_normal(6)
    lstsq = np.linalg.lstsq(X, y, rcond=None)[0]
    jump = []
    for a in (1e-1, 1e-2):
        path, err, *_ = _compare(X, y, _init("gaussian", a, 3, 3, seed=2))
        jump.append(np.max(err))
        # no interpolation: the path ends at theta_LS with the loss L* > 0
        np.testing.assert_allclose(np.asarray(path.end_point), lstsq, atol=1e-10)
        np.testing.assert_allclose(float(path.plateau_losses[-1]), np.sum((X @ lstsq - y) ** 2),
                                   rtol=1e-10)
    assert jump[1] < 0.3 * jump[0], jump


# ---------------------------------------------------------------- end point


@pytest.mark.parametrize("depth", (2, 3, 4))
@pytest.mark.parametrize("kind", ("yun_uniform", "yun_shape", "gaussian"))
def test_end_point_weighted_l1(depth, kind):
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((4, 8)), rng.standard_normal(4)
    problem = dd.LeastSquares(X, y)
    alphas = {2: (1e-2, 1e-4, 1e-8), 3: (1e-1, 1e-2, 1e-3), 4: (3e-1, 1e-1, 3e-2)}[depth]
    dist_bias = []
    for a in alphas:
        layers0 = _init(kind, a, depth, 8, seed=4)
        end = np.asarray(dd.saddle_path(layers0, problem).end_point)
        if depth == 2:
            e_minus, e_plus = (np.asarray(e) for e in dd.saddle_path(layers0, problem).thresholds)
            # the L = 2 weights were checked against brentq above; here: e = ln(2/(α|a±b|))
            # + O(α^4) (DESIGN §6), so their spread is O(1)/ln(1/α)
            u, v = layers0[0] / a, layers0[1] / a
            np.testing.assert_allclose(e_plus, np.log(2 / (a * np.abs(u + v))), rtol=1e-6)
            np.testing.assert_allclose(e_minus, np.log(2 / (a * np.abs(u - v))), rtol=1e-6)
        else:
            e_minus, e_plus = _edges(layers0)
        ref = _weighted_l1(X, y, e_minus, e_plus)
        np.testing.assert_allclose(end, ref, atol=1e-8)  # LP and NNLS at ~1e-10
        if kind == "yun_uniform":
            l1 = _weighted_l1(X, y, np.ones(8), np.ones(8))
            np.testing.assert_allclose(end, l1, atol=1e-8)
        bias = dd.implicit_bias(layers0, X, y)
        assert bool(bias.converged)
        dist_bias.append(np.max(np.abs(np.asarray(bias.theta) - end)))
    # the finite-alpha implicit bias approaches the path's end point
    assert np.all(np.diff(dist_bias) < 0) and dist_bias[-1] < 0.05, dist_bias


def test_rank_deficient_no_interpolation():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((6, 3))
    X = np.hstack([X, X[:, :1] + X[:, 1:2]])  # rank 3 < dim 4, n = 6: no interpolation
    y = rng.standard_normal(6)
    layers0 = _init("gaussian", 1e-2, 3, 4, seed=1)
    path = dd.saddle_path(layers0, dd.LeastSquares(X, y))
    end = np.asarray(path.end_point)
    np.testing.assert_allclose(X.T @ (X @ end - y), 0, atol=1e-9)  # a least-squares minimiser
    e_minus, e_plus = _edges(layers0)
    ref = _weighted_l1(X, y, e_minus, e_plus, normal_equations=True)
    np.testing.assert_allclose(end, ref, atol=1e-8)


# ---------------------------------------------------------------- plateau detection


def test_detect_plateaus_synthetic():
    # logistic drops of known centres (the midpoint crossing of each drop is its centre)
    centres, levels, width = np.array([3.0, 40.0, 700.0]), np.array([1.0, 0.3, 0.05, 0.0]), 0.2
    ts = np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 40_000)])

    def curve(t):
        out = np.full_like(t, levels[-1])
        for c, a, b in zip(centres, levels[:-1], levels[1:]):
            out += (a - b) * scipy.special.expit(-(t - c) / width)  # 1 / (1 + e^((t-c)/w))
        return out

    found = dd.detect_plateaus((ts, curve(ts)))
    np.testing.assert_allclose(np.asarray(found.levels)[:3], levels[:3], rtol=1e-6)
    spacing = centres * (ts[2] / ts[1] - 1)  # resolution = the save spacing there
    assert np.all(np.abs(np.asarray(found.jump_times) - centres) <= spacing)


def test_detect_plateaus_on_flow():
    layers0 = _init("yun_uniform", 1e-3, 3, 5, 0)
    path = dd.saddle_path(layers0, dd.LeastSquares(X_DROP, Y_DROP))
    t_flow, _, ts, lo = _flow(X_DROP, Y_DROP, layers0, np.asarray(path.plateau_losses),
                              np.array([1.0]), 4 * float(path.jump_times[-1]))
    found = dd.detect_plateaus((ts, lo))
    assert found.jump_times.shape == t_flow.shape
    j = np.searchsorted(ts, t_flow)
    spacing = ts[j] - ts[j - 1]
    assert np.all(np.abs(np.asarray(found.jump_times) - t_flow) <= spacing)


def test_detect_plateaus_bad_input():
    with pytest.raises(ValueError, match="increasing"):
        dd.detect_plateaus((np.array([0.0, 2.0, 1.0]), np.ones(3)))


# ---------------------------------------------------------------- bad input


def test_bad_input():
    problem = dd.LeastSquares(np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="Assumption"):
        dd.saddle_path(np.full((3, 3), 1e-2), problem)  # equal layers violate (A)
    with pytest.raises(ValueError, match="depth"):
        dd.saddle_path(np.full((1, 3), 1e-2), problem)
    with pytest.raises(TypeError, match="problem"):
        dd.saddle_path(_init("gaussian", 1e-2, 3, 3, 0), lambda th: th @ th)
    with pytest.raises(ValueError, match="small"):
        dd.saddle_path(np.array([[2.0, 0.1, 0.1], [1.0, 0.01, 0.01]]), problem)
    with pytest.raises(ValueError, match="scale"):
        dd.saddle_path(_init("gaussian", 1e-2, 3, 3, 0), problem, scale=-1.0)
    with pytest.raises(ValueError, match="dim"):
        dd.saddle_path(_init("gaussian", 1e-2, 3, 4, 0), problem)
