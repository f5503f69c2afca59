"""Lie-algebra rank, conservation-law counts and commuting checks (DESIGN §7).

Every reference is derived by hand and written in numpy: the known counts, and the gradients
of explicit conservation laws, whose span must equal the normal space the code returns.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import layer_rhs_numpy, random_layers, random_problem

import ddln_jax as dd

SUBSPACE_TOL = 1e-10  # float64 round-off in SVDs of O(1) well-conditioned matrices


def _rng(seed):
    return np.random.default_rng(20_000 + seed)


def _subspace_distance(A, B):
    """||P_A - P_B||_2 for the row spaces of A and B (both of full row rank)."""
    qa, _ = np.linalg.qr(np.asarray(A).T)
    qb, _ = np.linalg.qr(np.asarray(B).T)
    if qa.shape[1] != qb.shape[1]:
        return np.inf
    return np.linalg.norm(qa @ qa.T - qb @ qb.T, 2)


def _uv(params):
    """U V^T, U (n, r), V (m, r): the two-layer linear network."""
    U, V = params
    return (U @ V.T).ravel()


def _relu_region(params):
    """A two-layer ReLU network sum_j v_j relu(<u_j, x>) on a region of fixed activations is
    determined by G(u, v) = (v_j u_j)_j (positive homogeneity): u (r, p), v (r,)."""
    u, v = params
    return (v[:, None] * u).ravel()


def _ddln_law_gradients(u):
    """Gradients of (u^j_i)^2 - (u^1_i)^2, j = 2..L, i = 1..d (Prop 1), flattened."""
    L, d = u.shape
    rows = []
    for j in range(1, L):
        for i in range(d):
            g = np.zeros((L, d))
            g[j, i], g[0, i] = 2 * u[j, i], -2 * u[0, i]
            rows.append(g.ravel())
    return np.array(rows)


@pytest.mark.parametrize("depth,dim", [(2, 1), (3, 4), (4, 3), (6, 8)])
def test_ddln_laws_and_commuting(depth, dim):
    u = random_layers(depth * 10 + dim, depth, dim)
    laws = dd.count_conservation_laws(dd.theta, u)
    assert laws.count == dim * (depth - 1) and laws.dimension == depth * dim
    # disjoint coordinates commute and grad theta_i != 0: W(u) is already a Lie algebra
    assert laws.lie.bracket_depth == 0 and laws.lie.agreement == 1.0
    assert _subspace_distance(laws.normal, _ddln_law_gradients(u)) <= SUBSPACE_TOL
    com = dd.is_commuting(dd.theta, u)
    assert com.commuting and com.regular and com.jacobian_rank == dim


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_tied_has_no_law(depth):
    u = _rng(depth).standard_normal(4)
    assert dd.count_conservation_laws(dd.tied(depth), u).count == 0
    com = dd.is_commuting(dd.tied(depth), u)
    assert com.commuting and com.jacobian_rank == 4


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_difference_laws(depth):
    """theta_i = u_i^L - v_i^L: one field per pair (u_i, v_i), X_i = L(u_i^(L-1), -v_i^(L-1)),
    the pairs are disjoint, so Lie(W) = W of rank d and there are d laws. Per pair,
    h(u, v) = f(u) + g(v) with f'(u) u^(L-1) = g'(v) v^(L-1): h = u^(2-L) + v^(2-L) (L >= 3),
    h = log|u v| (L = 2); grad h is parallel to (u^(1-L), v^(1-L)) in both cases."""
    d = 3
    rng = _rng(depth)
    u, v = rng.standard_normal(d), rng.standard_normal(d)
    laws = dd.count_conservation_laws(dd.difference(depth), (u, v))
    assert laws.count == d
    grads = np.zeros((d, 2 * d))
    fields = np.zeros((d, 2 * d))
    for i in range(d):
        grads[i, i], grads[i, d + i] = u[i] ** (1 - depth), v[i] ** (1 - depth)
        fields[i, i], fields[i, d + i] = depth * u[i] ** (depth - 1), -depth * v[i] ** (depth - 1)
    np.testing.assert_allclose(grads @ fields.T, 0.0, atol=1e-12)  # the laws are laws
    assert _subspace_distance(laws.normal, grads) <= SUBSPACE_TOL
    assert dd.is_commuting(dd.difference(depth), (u, v)).commuting


def _uv_law_gradients(U, V):
    """Gradients of (U^T U - V^T V)_ab, a <= b, flattened as (U, V)."""
    r = U.shape[1]
    rows = []
    for a in range(r):
        for b in range(a, r):
            gU, gV = np.zeros_like(U), np.zeros_like(V)
            gU[:, a] += U[:, b]
            gU[:, b] += U[:, a]
            gV[:, a] -= V[:, b]
            gV[:, b] -= V[:, a]
            rows.append(np.concatenate([gU.ravel(), gV.ravel()]))
    return np.array(rows)


@pytest.mark.parametrize("n,m,r", [(2, 3, 1), (4, 3, 2), (2, 2, 3)])
def test_matrix_factorization(n, m, r):
    """U V^T: r(r + 1)/2 laws (U^T U - V^T V). The fields are the linear maps
    [[0, E], [E^T, 0]] of (U; V); their brackets add the block-diagonal so(n) + so(m) part,
    so brackets are needed (depth 1) exactly when r >= 2 (rank J_G = (n + m) r - r^2 for
    r <= min(n, m) is below D - r(r + 1)/2 iff r > 1)."""
    rng = _rng(100 * n + 10 * m + r)
    U, V = rng.standard_normal((n, r)), rng.standard_normal((m, r))
    laws = dd.count_conservation_laws(_uv, (U, V))
    assert laws.count == r * (r + 1) // 2 and laws.dimension == (n + m) * r
    if r <= min(n, m):
        assert laws.lie.bracket_depth == (1 if r >= 2 else 0)
    assert _subspace_distance(laws.normal, _uv_law_gradients(U, V)) <= SUBSPACE_TOL
    assert not dd.is_commuting(_uv, (U, V)).commuting


@pytest.mark.parametrize("r,p", [(3, 1), (2, 4)])
def test_relu_neurons(r, p):
    """r laws ||u_j||^2 - v_j^2. Each neuron's fields (v e_k, u_k) already span the p-dim
    tangent space of its hyperboloid (rank J_G = r p), so no bracket is needed; they commute
    only when p = 1 (for p >= 2, [X_k, X_l] rotates u in the (k, l) plane)."""
    rng = _rng(10 * r + p)
    u, v = rng.standard_normal((r, p)), rng.standard_normal(r)
    laws = dd.count_conservation_laws(_relu_region, (u, v))
    assert laws.count == r and laws.lie.bracket_depth == 0
    grads = np.zeros((r, r * p + r))
    for j in range(r):
        grads[j, j * p : (j + 1) * p] = 2 * u[j]
        grads[j, r * p + j] = -2 * v[j]
    assert _subspace_distance(laws.normal, grads) <= SUBSPACE_TOL
    com = dd.is_commuting(_relu_region, (u, v))
    assert com.commuting == (p == 1) and com.jacobian_rank == r * p


def test_laws_along_a_flow():
    """Along a DDLN flow: the explicit laws stay constant (to the solver tolerance), the
    hand-written velocity is orthogonal to the normal basis at every sampled time (exactly:
    it lies in W(u); only round-off), the normal basis is spanned by the laws' gradients, and
    the commuting DDLN's mirror map reproduces theta(t) = Psi(xi(t))."""
    depth, d = 3, 4
    X, y = random_problem(3, 8, d)
    u0 = random_layers(3, depth, d)
    ts = np.linspace(0.0, 2.0, 5)
    traj = dd.gradient_flow(jnp.asarray(u0), dd.LeastSquares(X, y), t1=2.0, ts=ts,
                            rtol=1e-10, atol=1e-12)
    assert bool(traj.ok)
    layers = np.asarray(traj.layers)
    sq = layers**2
    drift = (sq[:, 1:] - sq[:, :1]) - (sq[0, 1:] - sq[0, :1])
    assert np.max(np.abs(drift)) <= 1e-7  # rtol 1e-10 over t in [0, 2], O(1) values
    rhs = layer_rhs_numpy(X, y)
    for u in layers:
        normal = np.asarray(dd.count_conservation_laws(dd.theta, u).normal)
        vel = rhs(0.0, u.ravel(), depth, d)
        assert np.max(np.abs(normal @ vel)) <= 1e-12 * np.linalg.norm(vel)
        assert _subspace_distance(normal, _ddln_law_gradients(u)) <= SUBSPACE_TOL
    assert dd.is_commuting(dd.theta, u0).commuting
    mirror = dd.MirrorMap.from_layers(jnp.asarray(u0))
    theta = np.asarray(jax.vmap(mirror.psi)(traj.xi))
    # solver rtol 1e-10 on xi and theta, mirror map accurate to ~1e-12
    np.testing.assert_allclose(theta, np.asarray(traj.theta), rtol=1e-7, atol=1e-9)


def test_bad_max_depth():
    u = random_layers(0, 3, 2)
    with pytest.raises(ValueError, match="`max_depth`"):
        dd.lie_rank(dd.theta, u, max_depth=-1)


def test_warnings():
    with pytest.warns(RuntimeWarning, match="not generic"):
        res = dd.lie_rank(dd.theta, np.zeros((3, 2)))  # every field vanishes at 0
    assert res.rank == 0 and res.agreement < 1 and list(np.asarray(res.ranks)[1:]) == [2, 2]
    rng = _rng(7)
    with pytest.warns(RuntimeWarning, match="max_depth"):
        dd.lie_rank(_uv, (rng.standard_normal((4, 2)), rng.standard_normal((3, 2))),
                    max_depth=0)  # U V^T with r = 2 needs one bracket
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a generic point: no warning
        dd.lie_rank(dd.theta, random_layers(2, 3, 2))
