"""Max-margin directions of classification flows: `dd.max_margin` against independent scipy
solves (the l1 LP on the primal, an SVM QP by trust-constr) and a brute-force enumeration of
the KKT vertices written here; long log-time flows against them; Lyu & Li's monotone margin."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import LinearConstraint, linprog, minimize

import ddln_jax as dd


def separable(seed, n, d):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    return X, np.sign(X @ rng.standard_normal(d))


def l1_lp(X, y):
    """min ||theta||_1 s.t. y_n <x_n, theta> >= 1 on the primal (theta, t), |theta| <= t."""
    n, d = X.shape
    Z = y[:, None] * X
    A = np.block([[-Z, np.zeros((n, d))], [np.eye(d), -np.eye(d)], [-np.eye(d), -np.eye(d)]])
    b = np.concatenate([-np.ones(n), np.zeros(2 * d)])
    c = np.concatenate([np.zeros(d), np.ones(d)])
    res = linprog(c, A_ub=A, b_ub=b, bounds=[(None, None)] * d + [(0, None)] * d)
    assert res.status == 0
    return res.x[:d]


def svm_qp(X, y):
    """min ||theta||^2 / 2 s.t. y_n <x_n, theta> >= 1, primal, trust-constr."""
    Z = y[:, None] * X
    res = minimize(
        lambda t: 0.5 * t @ t,
        np.linalg.lstsq(Z, np.ones(len(y)), rcond=None)[0],
        jac=lambda t: t,
        hess=lambda t: np.eye(len(t)),
        method="trust-constr",
        constraints=[LinearConstraint(Z, lb=np.ones(len(y)))],
        options={"gtol": 1e-13, "xtol": 1e-14, "maxiter": 5000},
    )
    return res.x


def kkt_vertices(Z, depth, tol=1e-10):
    """Brute force: every vertex (support S, active rows A, |S| = |A|) of {Z theta >= 1}
    whose multipliers for min sum |theta_i|^{2/L} are >= 0."""
    n, d = Z.shape
    p, out = 2.0 / depth, []
    for k in range(1, min(n, d) + 1):
        for S in itertools.combinations(range(d), k):
            for A in itertools.combinations(range(n), k):
                M = Z[np.ix_(A, S)]
                if abs(np.linalg.det(M)) < 1e-12:
                    continue
                tS = np.linalg.solve(M, np.ones(k))
                th = np.zeros(d)
                th[list(S)] = tS
                lam = np.linalg.solve(M.T, p * np.sign(tS) * np.abs(tS) ** (p - 1))
                if np.min(Z @ th) >= 1 - tol and np.all(lam >= -tol):
                    out.append(th)
    return out


def angle(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))


def long_flow(X, y, loss, depth, alpha, t1, num=25, t_min=1.0):
    """A log-time flow (tau = log(1 + t)) from the Yun init, saved log-spaced in tau."""
    problem = loss(X, y)
    ts = jnp.concatenate([jnp.zeros(1), jnp.geomspace(t_min, t1, num)]).at[-1].set(t1)
    u0 = dd.init_yun(alpha, jnp.ones(X.shape[1]), depth)
    traj = dd.gradient_flow(u0, problem, t1=t1, ts=ts, time="log", rtol=1e-8, atol=1e-10)
    assert bool(traj.ok)
    return traj, problem


def assert_monotone(x, rel):
    x = np.asarray(x)
    x = x[np.isfinite(x)]
    assert len(x) > 5
    assert np.all(np.diff(x) >= -rel * np.abs(x[1:])), np.diff(x).min()


def test_depth2_long_flow_reaches_the_l1_max_margin():
    # tau = 3000: the loss is e^{-3008}; the direction converges like 1/log(1/L) (angle
    # 1.1e-3 at tau = 1678, 6e-4 at 3193 on this data)
    X, y = separable(0, 6, 5)
    lp = l1_lp(X, y)
    mm = dd.max_margin(X, y, depth=2)
    np.testing.assert_allclose(mm.theta, lp, atol=1e-9)
    assert float(mm.kkt_residual) < 1e-12 and mm.method == "linprog-highs"
    np.testing.assert_allclose(float(mm.margin), 1 / np.abs(lp).sum(), rtol=1e-12)
    finals = {}
    for loss in (dd.Logistic, dd.Exponential):
        traj, problem = long_flow(X, y, loss, 2, 0.1, 3000.0)
        path = dd.margin_along(traj, problem)
        assert float(path.log_loss[-1]) < -3000
        assert angle(traj.theta[-1], lp) <= 1e-3
        # the margins equal (the normalised margin converges at the same 1/log rate)
        np.testing.assert_allclose(float(path.margin[-1]), 1 / np.abs(lp).sum(), rtol=1e-3)
        assert float(path.margin[-1]) <= 1 / np.abs(lp).sum() * (1 + 1e-12)  # LP optimum
        # Lyu & Li: the smoothed margin never decreases (solver tolerance 1e-8)
        assert_monotone(path.smoothed_margin, 1e-7)
        assert float(path.kkt_residual[-1]) < 1e-3 < float(path.kkt_residual[3])
        finals[loss.__name__] = np.asarray(traj.theta[-1])
    # exponential and logistic losses reach the same direction
    assert angle(finals["Logistic"], finals["Exponential"]) < 1e-4


@pytest.mark.parametrize("depth", (3, 4))
def test_deep_flows_reach_the_unique_kkt_point(depth):
    X, y = separable(37, 5, 4)
    (vertex,) = kkt_vertices(y[:, None] * X, depth)  # brute force: one KKT point only
    mm = dd.max_margin(X, y, depth=depth)
    assert mm.candidates.shape[0] == 1 and mm.method == "vertex-enumeration"
    np.testing.assert_allclose(mm.theta, vertex, rtol=1e-10)
    losses = (dd.Exponential, dd.Logistic) if depth == 3 else (dd.Exponential,)
    for loss in losses:
        # the off-support terms decay like alpha^2 log(1/L)^{-2/L}: smaller alpha at depth 4
        traj, problem = long_flow(X, y, loss, depth, 0.1 if depth == 3 else 0.03, 1000.0, num=15)
        path = dd.margin_along(traj, problem)
        res = np.asarray(path.kkt_residual)
        # Lyu & Li: the KKT residual tends to 0; here it decreases at every save once the
        # loss is below 1, to <= 1e-4 (depth 3: 4.6e-5 at tau = 832, loss e^{-842})
        below = np.asarray(path.log_loss) < 0
        assert np.all(np.diff(res[below]) < 0) and res[-1] <= 1e-4
        assert angle(traj.theta[-1], vertex) < 1e-5
        assert_monotone(path.smoothed_margin, 1e-7)


def test_large_scale_is_kernel_first_then_moves_to_l1():
    # alpha = 10 at depth 2 (the boundary log(1/L) ~ alpha^2 = 100): at a loss of e^{-80}
    # the direction is nearer the SVM's than the l1 one; at e^{-3000} the reverse
    X, y = separable(0, 6, 5)
    svm, lp = svm_qp(X, y), l1_lp(X, y)
    th = np.asarray(dd.max_margin(X, y, depth=2, norm="l2").theta)
    np.testing.assert_allclose(th, svm, atol=1e-5)  # trust-constr's own accuracy
    # an optimality certificate of the convex QP: feasible, theta = Z_A^T nu with nu >= 0
    Z = y[:, None] * X
    A = Z @ th <= 1 + 1e-9
    nu = np.linalg.lstsq(Z[A].T, th, rcond=None)[0]
    assert np.min(Z @ th) >= 1 - 1e-12 and np.all(nu >= 0)
    np.testing.assert_allclose(Z[A].T @ nu, th, atol=1e-12)
    gap = angle(svm, lp)
    traj, problem = long_flow(X, y, dd.Exponential, 2, 10.0, 3000.0, t_min=0.01)
    log_loss = np.asarray(dd.margin_along(traj, problem).log_loss)
    mid = int(np.argmin(np.abs(log_loss + 80)))
    to_l2 = [angle(t, svm) for t in traj.theta[1:]]
    to_l1 = [angle(t, lp) for t in traj.theta[1:]]
    assert to_l2[mid - 1] < 0.4 * gap < to_l1[mid - 1]
    assert to_l1[-1] < 0.15 * gap < to_l2[-1]
    assert to_l1[-1] < to_l1[mid - 1] and to_l2[-1] > to_l2[mid - 1]


@pytest.mark.parametrize("seed", (2, 6, 9))
@pytest.mark.parametrize("depth", (3, 4))
def test_max_margin_finds_every_kkt_vertex_and_the_global_minimum(seed, depth):
    X, y = separable(seed, 5, 4)
    brute = kkt_vertices(y[:, None] * X, depth)
    mm = dd.max_margin(X, y, depth=depth)
    objective = [np.sum(np.abs(v) ** (2 / depth)) for v in brute]
    assert mm.candidates.shape[0] == len(brute)
    np.testing.assert_allclose(float(mm.objectives[0]), min(objective), rtol=1e-10)
    np.testing.assert_allclose(float(mm.margin), min(objective) ** (-depth / 2), rtol=1e-10)
    for c in np.asarray(mm.candidates):
        assert min(np.max(np.abs(c - v)) for v in brute) < 1e-9


def test_reweighted_l1_search_reaches_kkt_points(getkey):
    # too large to enumerate (C(22, 12) vertex candidates): multi-start reweighted l1
    X, y = separable(3, 10, 12)
    Z = y[:, None] * X
    mm = dd.max_margin(X, y, depth=3, key=getkey(), num_starts=4)
    assert mm.method == "irl1-linprog-highs"
    l1 = l1_lp(X, y)
    assert float(mm.objectives[0]) <= np.sum(np.abs(l1) ** (2 / 3)) + 1e-12
    for th in np.asarray(mm.candidates):
        # the KKT conditions checked here: a vertex with multipliers >= 0
        S = np.abs(th) > 1e-9 * np.abs(th).max()
        A = Z @ th <= 1 + 1e-9
        assert np.min(Z @ th) >= 1 - 1e-10 and S.sum() == A.sum()
        lam = np.linalg.solve(
            Z[np.ix_(A, S)].T, (2 / 3) * np.sign(th[S]) * np.abs(th[S]) ** (-1 / 3)
        )
        assert np.all(lam >= -1e-10)


def test_margin_normalisation_and_residual_invariances():
    X, y = separable(1, 7, 4)
    th = np.asarray(dd.max_margin(X, y, depth=3).theta)
    Z = y[:, None] * X
    for L in (2, 3, 5):
        t = th + 0.01 * np.arange(4)
        m = float(dd.margin(t, X, y, L))
        quasi = np.sum(np.abs(t) ** (2 / L)) ** (L / 2)
        np.testing.assert_allclose(m, np.min(Z @ t) / quasi, rtol=1e-13)
        np.testing.assert_allclose(float(dd.margin(7.5 * t, X, y, L)), m, rtol=1e-13)
        # balanced layers u^j = sign |theta|^{1/L}: Lyu & Li's q_min / ||u||^L = m L^{-L/2}
        u = np.abs(t) ** (1 / L) * np.ones((L, 1))
        u[0] *= np.sign(t)
        np.testing.assert_allclose(
            np.min(Z @ np.prod(u, 0)) / np.sum(u**2) ** (L / 2), m * L ** (-L / 2), rtol=1e-12
        )
    assert dd.kkt_residual(th, X, y, 3) < 1e-12
    assert dd.kkt_residual(4.0 * th, 3.0 * X, y, 3) < 1e-12  # scale-invariant
    assert dd.kkt_residual(th + 0.05, X, y, 3) > 1e-3
    assert dd.kkt_residual(-th, X, y, 3) == np.inf  # does not separate


def test_errors():
    X = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    y = np.array([1.0, 1.0, -1.0])  # x and -x with the same label: not separable
    for kw in ({"depth": 2}, {"depth": 3}, {"depth": 2, "norm": "l2"}):
        with pytest.raises(ValueError, match="`X`, `y` are not linearly separable"):
            dd.max_margin(X, y, **kw)
    Xs, ys = separable(0, 6, 5)
    with pytest.raises(ValueError, match="`norm`"):
        dd.max_margin(Xs, ys, depth=2, norm="l3")
    with pytest.raises(ValueError, match="`depth`"):
        dd.max_margin(Xs, ys, depth=1)
    with pytest.raises(ValueError, match="labels"):
        dd.max_margin(Xs, 2 * ys, depth=2)
    with pytest.raises(TypeError, match="`problem`"):
        dd.margin_along(None, dd.LeastSquares(Xs, ys))
