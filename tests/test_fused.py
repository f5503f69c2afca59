"""The sweep's fused maths against independent references: the layer vector field with
ordered sums against `jax.grad` of the loss; the structured (Woodbury) solve with I - c J
against `jax.jacfwd` of the layer vector field and a dense solve; the small-matrix inverse
against numpy."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd
from ddln_jax._sweep import _advance, _fused
from ddln_jax._sweep._slots import empty_slots


def _slots(problem, u, depth):
    S, _, d = u.shape
    z = jnp.zeros
    return _advance._slots_at(u, z((S, d)), z(S), z(S, jnp.int32), z(S, jnp.int32),
                              z((S, 2, d)), jnp.arange(S, dtype=jnp.int32), depth, None,
                              problem, 1.0, 1e-8, 1e-10)


@pytest.mark.parametrize("loss", ["ls_gram", "ls_two_stage", "logistic", "exponential"])
@pytest.mark.parametrize("batched", [False, True])
def test_vector_field_equals_autodiff(loss, batched):
    # the ordered sums (Gram form when d <= 2n) against jax.grad of the loss itself,
    # per slot, with padded layers frozen
    S, L, d = 16, 4, 6
    n = 2 if loss == "ls_two_stage" else 9
    kx, ky, ku = jr.split(jr.key(4), 3)
    X, y = jr.normal(kx, (S, n, d)), jr.normal(ky, (S, n))
    make = {"logistic": dd.Logistic, "exponential": dd.Exponential}.get(loss, dd.LeastSquares)
    if loss in ("logistic", "exponential"):
        y = jnp.sign(y)
    problems = [make(X[s], y[s]) for s in range(S)] if batched else [make(X[0], y[0])] * S
    problem = jax.vmap(make)(X, y) if batched else problems[0]
    u = 0.5 * jr.normal(ku, (L, d, S))
    depth = 2 + jnp.arange(S) % 3
    mask = (jnp.arange(L)[:, None] < depth[None, :]).astype(u.dtype)[:, None, :]
    u = jnp.where(mask > 0, u, 1.0)
    fu, fxi = _fused._batched_rhs(u, mask, problem, batched)
    for s in range(S):
        g = jax.grad(problems[s].loss)(jnp.prod(u[:, :, s], axis=0))
        np.testing.assert_allclose(fxi[:, s], -g, rtol=1e-12, atol=1e-12)
        for j in range(L):
            want = -jnp.prod(jnp.delete(u[:, :, s], j, axis=0), axis=0) * g * mask[j, 0, s]
            np.testing.assert_allclose(fu[j, :, s], want, rtol=1e-12, atol=1e-12)


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
    x = _fused._chord_solver(slots, c, problem, False)(r)

    def field(u_flat, mask):
        fu, _ = _fused._batched_rhs(u_flat.reshape(L, d, 1), mask[..., None], problem,
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
    inv = np.asarray(_fused._small_inv(jnp.asarray(a)))
    ref = np.linalg.inv(np.moveaxis(a, (0, 1), (-2, -1)))
    np.testing.assert_allclose(np.moveaxis(inv, (0, 1), (-2, -1)), ref, rtol=1e-9,
                               atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("loss", ["least_squares", "logistic"])
def test_kvaerno5_steps_do_not_depend_on_the_slot_or_the_array_size(loss):
    # The stiff members' array (4 slots on CPUs, not a multiple of the explicit arrays' 8)
    # takes members in the order they are handed over, which depends on thread timing: a
    # member's steps must be the same bits in any slot, beside any neighbours, in 4 or 8 slots
    kx, ky, ku = jr.split(jr.key(5), 3)
    X = jr.normal(kx, (10, 6))
    if loss == "least_squares":
        problem = dd.LeastSquares(X, jr.normal(ky, (10,)))
    else:
        problem = dd.Logistic(X, jnp.sign(jr.normal(ky, (10,))))
    L, d, T, t1 = 5, 6, 5, 20.0
    members = 2.0 * jr.normal(ku, (8, L, d))  # large inits: stiff after the transient
    depth = jnp.array([5, 3, 4, 5, 2, 5, 3, 4])
    ts = jnp.linspace(0.0, t1, T)

    # the program the sweep runs here (on CPUs compiled with XLA's older kernels)
    sweeps_advance, _ = _advance.compiled_for(_advance.KVAERNO5, jax.default_backend())

    def run(order, advance=sweeps_advance):
        S = len(order)
        slots = _advance.with_empty_carry(empty_slots(S, L, d, T, jnp.float64),
                                          _advance.KVAERNO5, problem, 1e-8, 1e-10)
        order = np.asarray(order)
        slots = _advance.refill(slots, jnp.ones(S, bool), jnp.asarray(order, jnp.int32),
                                members[order], depth[order], None, problem, 0.0, t1, ts,
                                1e-8, 1e-10, _advance.KVAERNO5)
        _, _, out = advance(slots, problem, t1, ts, 1e-8, 1e-10, None, jnp.asarray(10**6),
                            jnp.asarray(60), jnp.asarray(S + 1), _advance.KVAERNO5)
        got = {}
        for slot, m in enumerate(order):
            got[int(m)] = (np.asarray(out.u[..., slot]), np.asarray(out.saves[slot]),
                           float(out.t[slot]), int(out.steps[slot]), float(out.dt[slot]))
        return got

    runs = [run([0, 1, 2, 3]), run([3, 2, 1, 0]), run([2, 0, 3, 1]),
            run([4, 5, 6, 7, 0, 1, 2, 3]), run([1, 7, 3, 5, 0, 6, 2, 4]),
            run([0, 1, 2, 3], _advance.advance)]  # and as compiled by default: same bits
    first = runs[0]
    assert all(0 < first[m][2] < t1 for m in first)  # mid-way after 60 implicit steps
    for other in runs[1:]:
        for m in first:
            for a, b in zip(first[m], other[m]):
                np.testing.assert_array_equal(a, b)
