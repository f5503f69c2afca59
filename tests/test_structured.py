"""Kvaerno5's structured Newton solve for the layer flow (`ddln_jax/_structured.py`): the
Woodbury solve against a dense solve with the autodiff Jacobian, the flow against scipy and
against diffrax's own (dense) Kvaerno5."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import random_layers, random_problem, scipy_layers

import ddln_jax as dd
from ddln_jax import _flow
from ddln_jax._solve import layer_vector_field
from ddln_jax._structured import LayerNewton, layer_factors, structured_kvaerno5


@pytest.mark.parametrize(
    "depth, kind", [(2, "least_squares"), (5, "least_squares"), (3, "logistic")]
)
def test_woodbury_solve_equals_dense_solve(depth, kind):
    d, n = 4, 3
    X, y = random_problem(depth, n, d)
    p = dd.LeastSquares(X, y) if kind == "least_squares" else dd.Logistic(X, np.sign(y))
    u = random_layers(depth, depth, d)
    vf = layer_vector_field(dd.theta)

    def flat(z):  # the vector field on the flattened state (u, xi)
        du, dxi = vf(0.0, (z[: depth * d].reshape(depth, d), z[depth * d :]), p)
        return jnp.concatenate([du.ravel(), dxi])

    J = jax.jacfwd(flat)(jnp.concatenate([u.ravel(), jnp.zeros(d)]))
    r = np.random.default_rng(depth).standard_normal((depth + 1) * d)
    for gh in (1e-3, 0.4, 30.0):  # up to a strongly implicit step
        want = np.linalg.solve(np.eye(r.size) - gh * np.asarray(J), r)
        du, dxi = layer_factors(jnp.asarray(u), p, gh).solve(
            (jnp.asarray(r[: depth * d].reshape(depth, d)), jnp.asarray(r[depth * d :]))
        )
        got = np.concatenate([np.ravel(du), dxi])
        # a direct solve of the same system: agreement to round-off times its condition
        cond = np.linalg.cond(np.eye(r.size) - gh * np.asarray(J))
        np.testing.assert_allclose(got, want, atol=1e-13 * cond * np.abs(want).max())


def test_kvaerno5_flow_against_scipy_and_diffrax_dense():
    X, y = random_problem(7, 5, 4)
    u0 = random_layers(7, 3, 4, scale=1.5)
    p, ts = dd.LeastSquares(X, y), jnp.linspace(0.0, 5.0, 6)
    kv = dd.gradient_flow(u0, p, t1=5.0, ts=ts, solver="kvaerno5", rtol=1e-10, atol=1e-12)
    assert bool(kv.ok)
    ref = scipy_layers(X, y, u0, np.asarray(ts))  # DOP853 at rtol 1e-12
    # rtol 1e-10 over a short flow: agreement to ~100 rtol
    np.testing.assert_allclose(kv.layers, ref, rtol=0, atol=1e-8)
    # diffrax's Kvaerno5 with its own (dense) Newton solve: the same iteration up to the
    # round-off of another linear solve, which the Newton iterations (stopped at rtol 1e-10)
    # carry on: the same steps, values to 10 rtol (measured: 6e-12)
    dense, _ = _flow._solve_layers(
        u0,
        p,
        0.0,
        5.0,
        ts,
        dfx.Kvaerno5(),
        jnp.asarray(1e-10),
        jnp.asarray(1e-12),
        2**16,
        dd.theta,
        None,
    )
    assert int(dense.num_steps) == int(kv.num_steps)
    np.testing.assert_allclose(kv.theta, dense.theta, rtol=0, atol=1e-9)


def test_structured_only_for_the_default_kvaerno5_of_the_product():
    s = structured_kvaerno5(dfx.Kvaerno5(), dd.theta, dd.theta)
    assert isinstance(s.root_finder, LayerNewton)
    for solver, param in [
        (dfx.Tsit5(), dd.theta),
        (dfx.Kvaerno5(), dd.tied(3)),
        (dfx.Kvaerno5(root_finder=optx.Newton(1e-6, 1e-6)), dd.theta),
    ]:
        assert structured_kvaerno5(solver, param, dd.theta) is solver
