"""The gradient fields and Lie brackets of a parameterization (`_brackets`): the bracket
values against matrix commutators written in numpy, and the argument checks shared by
`lie_rank` and `is_commuting`."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import random_layers

import ddln_jax as dd
from ddln_jax._brackets import evaluate_words


def _uv(params):
    """U V^T, U (n, r), V (m, r): the two-layer linear network."""
    U, V = params
    return (U @ V.T).ravel()


@pytest.mark.parametrize("seed", [0, 1])
def test_brackets_of_linear_fields(seed):
    """G_i(u) = u^T A_i u / 2 with A_i symmetric: X_i = A_i u. Linear fields X = P u,
    Y = Q u have [X, Y] = DY X - DX Y = (Q P - P Q) u, so [X_j, X_k] = M u with
    M = A_k A_j - A_j A_k and [X_i, [X_j, X_k]] = (M A_i - A_i M) u, scale
    |M A_i u| + |A_i M u|."""
    rng = np.random.default_rng(seed)
    D, d = 4, 3
    A = rng.standard_normal((d, D, D))
    A = A + A.transpose(0, 2, 1)
    u = rng.standard_normal(D)
    spec = (jtu.tree_structure(0), ((D,),))

    def G(w):
        return jnp.einsum("i,kij,j->k", w, jnp.asarray(A), w) / 2

    vals, scales = evaluate_words(G, spec, u, [(0,), (2,)], d)
    X = np.stack([A[0] @ u, A[2] @ u], axis=1)
    np.testing.assert_allclose(vals * scales, X, rtol=1e-12)  # float64 round-off
    np.testing.assert_allclose(scales, np.linalg.norm(X, axis=0), rtol=1e-12)

    vals, scales = evaluate_words(G, spec, u, [(0, 1, 2), (2, 0, 1)], d)
    for col, (i, j, k) in enumerate([(0, 1, 2), (2, 0, 1)]):
        M = A[k] @ A[j] - A[j] @ A[k]
        dy_x, dx_y = M @ A[i] @ u, A[i] @ M @ u
        # the terms cancel in part: round-off ~1e-15 relative to the scale, not to the value
        np.testing.assert_allclose(
            vals[:, col] * scales[col], dy_x - dx_y, atol=1e-12 * scales[col]
        )
        np.testing.assert_allclose(
            scales[col], np.linalg.norm(dy_x) + np.linalg.norm(dx_y), rtol=1e-12
        )


def test_bad_inputs():
    u = random_layers(0, 3, 2)
    with pytest.raises(TypeError, match="`parameterization`"):
        dd.lie_rank(3, u)
    with pytest.raises(ValueError, match="`parameterization` must return a 1-D"):
        dd.lie_rank(lambda p: p[0] @ p[1].T, (np.ones((3, 2)), np.ones((4, 2))))
    with pytest.raises(ValueError, match="`u`"):
        dd.lie_rank(dd.theta, np.ones(5))  # a vector where (depth, dim) is expected
    with pytest.raises(ValueError, match="`u`"):
        dd.lie_rank(_uv, (np.ones((3, 2)), np.ones((4, 3))))  # inner sizes differ
    with pytest.raises(ValueError, match="`parameterization` has a zero Jacobian"):
        dd.lie_rank(lambda w: jnp.round(w).ravel(), u)
    with pytest.raises(TypeError, match="`parameterization` must be traceable"):
        dd.lie_rank(lambda w: jnp.asarray(np.asarray(w) ** 2).ravel(), u)
    with pytest.raises(TypeError, match="`parameterization`"):
        dd.lie_rank(lambda w: jnp.arange(3), u)
    with pytest.raises(ValueError, match="`u`"):
        dd.lie_rank(dd.theta, np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="`u`"):
        dd.lie_rank(dd.theta, ())
    with pytest.raises(ValueError, match="`num_points`"):
        dd.lie_rank(dd.theta, u, num_points=0)
    with pytest.raises(ValueError, match="`rtol`"):
        dd.is_commuting(dd.theta, u, rtol=0.0)


def test_float64_off_warns():
    with jax.enable_x64(False):
        with pytest.warns(RuntimeWarning, match="float64 is off"):
            dd.lie_rank(dd.theta, random_layers(1, 2, 2).astype(np.float32))
