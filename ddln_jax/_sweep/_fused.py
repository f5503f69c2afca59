"""The maths of the sweep's fused steppers on slot-last arrays: the layer vector field (with
sums in a fixed order, so that a slot's bits do not depend on the array), the masked error
norm, Hairer's initial step, one Tsit5 step with Hairer's stiffness estimate, and one
Kvaerno5 step whose Newton systems are solved by a structured (Woodbury) chord solver."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

from .._loss import LeastSquares, _Classification
from ._slots import Slots

_TABLEAU = dfx.Tsit5.tableau
_ERROR_ORDER = 4  # Tsit5's embedded error estimate (as diffrax's `error_order`)
# Tsit5 is first-same-as-last: its last stage is evaluated at the new point
assert np.allclose(_TABLEAU.b_sol[:-1], _TABLEAU.a_lower[-1]) and _TABLEAU.b_sol[-1] == 0


def _exclusive_products(u):
    """prod_{k != j} u^k for every layer j, by prefix and suffix products (no division, exact
    at zeros), and the product of all: (L, d, S) -> (L, d, S), (d, S)."""
    L = u.shape[0]
    pre = [jnp.ones_like(u[0])]
    for j in range(L - 1):
        pre.append(pre[-1] * u[j])
    suf = [jnp.ones_like(u[0])]
    for j in range(L - 1, 0, -1):
        suf.append(suf[-1] * u[j])
    suf = suf[::-1]
    return jnp.stack([pre[j] * suf[j] for j in range(L)]), pre[-1] * u[-1]


def _gradient(problem):
    grad = getattr(problem, "grad", None)
    return grad if callable(grad) else jax.grad(problem.loss)


def _ordered_sum(x, axis: int = 0):
    """Sum over `axis` by adds in index order: elementwise operations, which XLA does not
    reorder. Its own reductions over a non-slot axis (and its matmuls) pick their order by
    the array size (on the CPU, from 128 slots on), which would make a trajectory's bits
    depend on the slot array it ran in."""
    x = jnp.moveaxis(x, axis, 0)
    if x.shape[0] > _UNROLL:
        return jax.lax.fori_loop(1, x.shape[0], lambda k, acc: acc + x[k], x[0])
    total = x[0]
    for k in range(1, x.shape[0]):
        total = total + x[k]
    return total


_UNROLL = 64  # longer ordered sums run as a loop (compile time)


def _runtime_one(mask):
    """1.0, not constant-folded by XLA (`mask` is finite). See `_linear_model_gradient`."""
    return 1.0 + 0.0 * mask[0, 0, 0]


def _linear_model_gradient(problem, th, batched: bool, one):
    """grad L of the library's linear-model losses (least squares, margin losses) for
    slot-last `th (d, S)`, with the sums over the data in a fixed order: (d, S).

    `one` is a runtime 1.0: XLA fuses cheap elementwise producers into their consumers and
    recomputes them there, which for these sums (each value used d or L times) cost 10x;
    it does not fuse an expensive op (a division) into a consumer that reuses its values,
    so dividing each stage (theta included) by `one` (exact) makes XLA compute it once."""
    X, y = problem.X, problem.y  # (n, d), (n,) or slot-first (S, n, d), (S, n)
    th = th / one
    if isinstance(problem, LeastSquares) and not batched and X.shape[1] <= 2 * X.shape[0]:
        # grad L = G theta - c with G = 2 X^T X, c = 2 X^T y: one sum of d terms, not two of
        # n and d (G and c do not depend on the slots: any order is the same for all)
        G, c = 2.0 * X.T @ X, 2.0 * X.T @ y
        return (_ordered_sum(G[:, :, None] * th[None], axis=1) - c[:, None]) / one
    if batched:
        X, y = jnp.transpose(X, (1, 2, 0)), y.T
    else:
        X, y = X[..., None], y[:, None]
    z = _ordered_sum(X * th[None], axis=1)  # (n, S): X theta
    if isinstance(problem, LeastSquares):
        w = 2.0 * (z - y)
    else:  # margins m = y X theta, dL/dz = y phi'(m) (phi elementwise)
        phi = problem.margin_loss
        w = y * jax.grad(lambda m: jnp.sum(phi(m)))(y * z)
    return _ordered_sum(X * (w / one)[:, None], axis=0) / one


def _batched_rhs(u, mask, problem, batched: bool):
    """du^j = -(prod_{k != j} u^k) grad L(theta) on the real layers, xi' = -grad L."""
    excl, th = _exclusive_products(u)
    if isinstance(problem, (LeastSquares, _Classification)):
        one = _runtime_one(mask)
        g = _linear_model_gradient(problem, th, batched, one)
    else:  # any other loss: its gradient, vmapped over the slots (slot-first)
        grad = jax.vmap(lambda p, t: _gradient(p)(t), in_axes=(0 if batched else None, 0))
        g = grad(problem, th.T).T
    return -excl * g[None] * mask, -g


def _norm(eu, exi, mask, real):
    """RMS over the real layers and xi. Summed coordinate by coordinate and layer by layer,
    in order, so that padded layers (zeros at the end) leave the result bitwise unchanged
    and the bits do not depend on the number of slots. The squares are divided by a runtime
    one: XLA's CPU backend contracts a multiply feeding an add into one fused multiply-add
    where both land in one kernel, which depends on the program (the padded depth, the slot
    count); a division in between leaves nothing to contract."""
    one = _runtime_one(mask)
    per_layer = _ordered_sum((eu * mask) ** 2 / one, axis=1)  # (L, S)
    return jnp.sqrt((_ordered_sum(exi**2 / one) + _ordered_sum(per_layer)) / real)


def _initial_dt(u, xi, fu, fxi, mask, real, rtol, atol, span):
    """Hairer's heuristic (first half), as `_flow.initial_step`, per slot."""
    su, sx = atol + rtol * jnp.abs(u), atol + rtol * jnp.abs(xi)
    d0 = _norm(u / su, xi / sx, mask, real)
    d1 = _norm(fu / su, fxi / sx, mask, real)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-300))
    return jnp.clip(h0, span * 1e-12, span * 0.1)


def _tsit5_stages(s: Slots, h, problem, batched):
    """One Tsit5 step of size h (slot-last): new state, its derivative (first-same-as-last),
    the error estimate, and h times Hairer's estimate of the stiff eigenvalue,
    ||k7 - k6|| / ||z7 - z6|| (the last two stages both sit at t + h)."""
    # Each stage and its derivative are divided by a runtime one (exact) so that XLA
    # computes them once: otherwise it fuses them into every later stage that uses them and
    # recomputes them there (1.36x the cost per slot-step at 128 slots, same bits).
    one = _runtime_one(s.mask)
    ku, kx, zs = [s.fu], [s.fxi], []
    for ai in _TABLEAU.a_lower:
        uu = (s.u + h * sum(float(a) * k for a, k in zip(ai, ku))) / one
        xx = s.xi + h * sum(float(a) * k for a, k in zip(ai, kx))
        fu, fx = _batched_rhs(uu, s.mask, problem, batched)
        ku.append(fu / one)
        kx.append(fx)
        zs.append(uu)
    # Tsit5's last stage is evaluated at the new point (FSAL): b_sol = a_lower[-1]
    eu = h * sum(float(b) * k for b, k in zip(_TABLEAU.b_error, ku))
    ex = h * sum(float(b) * k for b, k in zip(_TABLEAU.b_error, kx))
    num = _ordered_sum(_ordered_sum(((ku[-1] - ku[-2]) * s.mask) ** 2 / one))
    den = _ordered_sum(_ordered_sum(((zs[-1] - zs[-2]) * s.mask) ** 2 / one))
    h_rho = h * jnp.sqrt(num / jnp.where(den > 0, den, 1.0)) * (den > 0)
    return zs[-1], xx, ku[-1], kx[-1], eu, ex, h_rho, jnp.ones_like(h, bool)


_KV = dfx.Kvaerno5.tableau
_GAMMA = float(_KV.a_diagonal[1])
# ESDIRK: explicit first stage, constant diagonal; stiffly accurate (y1 = last stage)
assert _KV.a_diagonal[0] == 0 and np.allclose(_KV.a_diagonal[1:], _GAMMA)
assert np.allclose(_KV.b_sol, [*_KV.a_lower[-1], _GAMMA])
_NEWTON_ITERS = 10


def _lower_rows(rows, width):
    return np.array([list(r) + [0.0] * (width - len(r)) for r in rows], float)


# the tableau as arrays over the stages (row i: implicit stage i + 1)
_KV_A = _lower_rows(_KV.a_lower, 7)
_KV_PRED = _lower_rows(_KV.a_predictor, 7)
_KV_B = np.asarray(_KV.b_sol, float)
_KV_ERR = np.asarray(_KV.b_error, float)
assert _KV_A.shape == (6, 7) and _KV_B.shape == _KV_ERR.shape == (7,)


# blocks up to this size are inverted by Gauss-Jordan on slot-last arrays (elementwise);
# larger ones by `jnp.linalg.inv`
_SMALL_INV = 12


def _small_inv(a):
    """Inverses of the matrices `a[:, :, ...]` (the matrix axes first, any batch axes after),
    by Gauss-Jordan with partial pivoting, one whole-array update per column in a loop
    (XLA's CPU batched LU is slow for many small matrices; unrolled, this compiles slowly)."""
    n = a.shape[0]
    if n > _SMALL_INV:
        return jnp.moveaxis(jnp.linalg.inv(jnp.moveaxis(a, (0, 1), (-2, -1))), (-2, -1), (0, 1))
    extra = (1,) * (a.ndim - 2)
    eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype).reshape((n, n) + extra), a.shape)
    rows = jnp.arange(n).reshape((n,) + extra)

    def column(k, aug):  # (n, 2n, ...)
        col = jax.lax.dynamic_index_in_dim(aug, k, axis=1, keepdims=False)
        is_best = rows == jnp.argmax(jnp.where(rows >= k, jnp.abs(col), -1.0), axis=0)
        pivot = jnp.sum(jnp.where(is_best[:, None], aug, 0.0), axis=0)
        row_k = jax.lax.dynamic_index_in_dim(aug, k, axis=0, keepdims=True)
        aug = jnp.where(is_best[:, None], row_k, aug)  # the pivot row takes row k's place
        pivot = pivot / jax.lax.dynamic_index_in_dim(pivot, k, axis=0, keepdims=False)
        aug = jnp.where((rows == k)[:, None], pivot[None], aug)
        factor = jnp.where(rows == k, 0.0, jax.lax.dynamic_index_in_dim(aug, k, axis=1,
                                                                          keepdims=False))
        return aug - factor[:, None] * pivot[None]

    aug = jax.lax.fori_loop(0, n, column, jnp.concatenate([a, eye], axis=1))
    return aug[:, n:]


def _hessians(theta, problem, batched):
    """Hessian of the loss at every slot's theta (S, d) -> (d, d, S)."""
    hess = jax.vmap(lambda p, t: jax.jacfwd(_gradient(p))(t),
                    in_axes=(0 if batched else None, 0))
    return jnp.transpose(hess(problem, theta), (1, 2, 0))


def _pair_products(u):
    """e_jk = prod_{m != j, k} u^m for every pair of layers: (L, d, S) -> (L, L, d, S), by
    whole-array products in layer order (the L^2 prefix-suffix products, unrolled, took
    seconds to compile)."""
    L = u.shape[0]
    layer = np.arange(L)
    out = jnp.ones((L, L) + u.shape[1:], u.dtype)
    for m in range(L):
        skip = jnp.asarray((layer[:, None] == m) | (layer[None, :] == m))[:, :, None, None]
        out = out * jnp.where(skip, 1.0, u[m][None, None])
    return out


def _chord_solver(s: Slots, c, problem, batched):
    """x -> (I - c J)^-1 x per slot (slot-last (L, d, S)), J the Jacobian of the masked layer
    vector field at the slot's state, without forming the (L d) x (L d) matrix.

    With e_j = prod_{k != j} u^k, e_jk = prod_{m != j, k} u^m and g, H the gradient and the
    Hessian of the loss at theta, -J = A + E H E^T, where A couples the layers of one
    coordinate (A_jk = g e_jk for j != k, a d-fold block diagonal of L x L blocks) and
    E = [diag(e_1); ...; diag(e_L)]. With P = I + c A and K = E^T P^-1 E (diagonal),
    (P + c E H E^T)^-1 = P^-1 - P^-1 E (I + c H K)^-1 c H E^T P^-1 (push-through Woodbury,
    H need not be invertible). Padded layers: rows and columns masked, P = I there."""
    L, d, S = s.u.shape
    m = s.mask  # (L, 1, S)
    excl, theta = _exclusive_products(s.u)
    e = excl * m
    g = -s.fxi  # the derivative of xi is -grad L(theta) at the slot's state
    off_diagonal = jnp.asarray(~np.eye(L, dtype=bool))[:, :, None, None]
    P = jnp.where(off_diagonal, c * g * _pair_products(s.u) * (m[:, None] * m[None, :]), 1.0)
    Pinv = _small_inv(P)  # (L, L, d, S)

    def p_solve(r):  # whole-array operations, few of them (compile time)
        return sum(Pinv[:, k] * r[k] for k in range(L))

    K = _ordered_sum(e * p_solve(e))  # (d, S)
    cH = c * _hessians(theta.T, problem, batched)  # (d, d, S)
    M = jnp.eye(d)[:, :, None] + cH * K[None]
    Q = jnp.einsum("iks,kjs->ijs", _small_inv(M), cH)  # (I + c H K)^-1 c H

    def solve(r):
        y = p_solve(r)
        q = jnp.einsum("ijs,js->is", Q, _ordered_sum(e * y))
        return y - p_solve(e * q[None])

    return solve


def _kvaerno5_stages(s: Slots, h, problem, batched, rtol, atol):
    """One Kvaerno5 step (diffrax's tableau) of size h: every implicit stage
    z = c + h gamma f(z) is solved by chord iterations with the Jacobian of the layer vector
    field at the step start (`_chord_solver`: its structure, O(L^2 d + d^2) per solve).
    Returns the same as `_tsit5_stages`, with `converged` (False: reject the step)."""
    solve = _chord_solver(s, h * _GAMMA, problem, batched)

    scale = atol + rtol * jnp.abs(s.u)
    n_stages = len(_KV.a_lower) + 1
    ku = jnp.zeros((n_stages,) + s.u.shape, s.u.dtype).at[0].set(s.fu)
    kx = jnp.zeros((n_stages,) + s.xi.shape, s.xi.dtype).at[0].set(s.fxi)

    def combine(w, k):  # sum_j w_j k_j over the stages (elementwise: fuses)
        w = jnp.asarray(w, k.dtype)
        return sum(w[j] * k[j] for j in range(n_stages))

    tab_a, tab_pred = jnp.asarray(_KV_A, s.u.dtype), jnp.asarray(_KV_PRED, s.u.dtype)

    def stage(i, carry):  # the implicit stage i + 1: one traced copy for all of them
        ku, kx, _, converged = carry
        c = s.u + h * combine(tab_a[i], ku)

        def newton(carry):
            it, z, last = carry
            fz, _ = _batched_rhs(z, s.mask, problem, batched)
            dz = solve(z - c - h * _GAMMA * fz)
            inc = jnp.max(jnp.abs(dz * s.mask) / scale, axis=(0, 1))
            # a converged slot stays as it is: its result does not depend on its neighbours
            going = last > 1e-3
            return it + 1, jnp.where(going, z - dz, z), jnp.where(going, inc, last)

        def more(carry):  # until every slot's last increment is 1e-3 of the tolerance
            it, _, inc = carry
            return (it < _NEWTON_ITERS) & jnp.any(inc > 1e-3)

        z0 = s.u + h * combine(tab_pred[i], ku)
        _, z, inc = jax.lax.while_loop(more, newton, (0, z0, jnp.full_like(h, jnp.inf)))
        fu, fx = _batched_rhs(z, s.mask, problem, batched)
        return ku.at[i + 1].set(fu), kx.at[i + 1].set(fx), z, converged & (inc <= 1e-3)

    ku, kx, z, converged = jax.lax.fori_loop(
        0, n_stages - 1, stage, (ku, kx, s.u, jnp.ones_like(h, bool)))
    xi1 = s.xi + h * combine(_KV_B, kx)  # stiffly accurate: u1 = z, the last stage
    eu = h * combine(_KV_ERR, ku)
    ex = h * combine(_KV_ERR, kx)
    return z, xi1, ku[-1], kx[-1], eu, ex, jnp.zeros_like(h), converged
