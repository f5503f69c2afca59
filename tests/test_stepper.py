"""The sweep stepper's implicit linear algebra against dense references: the structured
(Woodbury) solve with I - c J against `jax.jacfwd` of the layer vector field and a dense
solve, the small-matrix inverse against numpy."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd
from ddln_jax import _stepper


def _slots(problem, u, depth):
    S, _, d = u.shape
    z = jnp.zeros
    return _stepper._slots_at(u, z((S, d)), z(S), z(S, jnp.int32), z(S, jnp.int32),
                              z((S, 2, d)), jnp.arange(S, dtype=jnp.int32), depth, None,
                              problem, 1.0, 1e-8, 1e-10)


@pytest.mark.parametrize("loss", ["least_squares", "logistic"])
def test_chord_solve_equals_dense_jacobian_solve(loss):
    kx, ky, ku, kr = jr.split(jr.key(3), 4)
    X = jr.normal(kx, (10, 5))
    if loss == "least_squares":
        problem = dd.LeastSquares(X, jr.normal(ky, (10,)))
    else:
        problem = dd.Logistic(X, jnp.sign(jr.normal(ky, (10,))))
    S, L, d = 16, 5, 5
    depth = jnp.array([2, 3, 4, 5] * 4)
    u = jr.normal(ku, (S, L, d))
    u = u.at[3, 1, 2].set(0.0)  # a zero entry: products without division
    u = jnp.where(jnp.arange(L)[None, :, None] < depth[:, None, None], u, 1.0)
    slots = _slots(problem, u, depth)
    c = jnp.logspace(-3, 3, S)  # h * gamma, from non-stiff to very stiff
    r = jr.normal(kr, (L, d, S)) * slots.mask
    x = _stepper._chord_solver(slots, c, problem, False)(r)

    def field(u_flat, mask):
        fu, _ = _stepper._batched_rhs(u_flat.reshape(L, d, 1), mask[..., None], problem,
                                      False)
        return fu.reshape(L * d)

    jac = jax.jit(jax.jacfwd(field))
    for i in range(S):
        J = jac(slots.u[..., i].reshape(-1), slots.mask[..., i])
        dense = np.linalg.solve(np.eye(L * d) - float(c[i]) * np.asarray(J),
                                np.asarray(r[..., i]).reshape(-1))
        np.testing.assert_allclose(np.asarray(x[..., i]).reshape(-1), dense,
                                   rtol=1e-10, atol=1e-10 * np.abs(dense).max())
        # padded layers are left alone
        assert np.all(np.asarray(x[int(depth[i]):, :, i]) == 0.0)


@pytest.mark.parametrize("n", [1, 3, 8, 13])
def test_small_inverse_equals_numpy(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, n, 4, 8))
    if n > 1:
        a[0, 0] = 0.0  # needs pivoting
        a[:, :, 1, 2] = np.eye(n)[::-1]  # a permutation: every pivot is off the diagonal
    inv = np.asarray(_stepper._small_inv(jnp.asarray(a)))
    ref = np.linalg.inv(np.moveaxis(a, (0, 1), (-2, -1)))
    np.testing.assert_allclose(np.moveaxis(inv, (0, 1), (-2, -1)), ref, rtol=1e-9,
                               atol=1e-9 * np.abs(ref).max())
