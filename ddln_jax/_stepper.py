"""A fused, batched explicit Runge–Kutta stepper for sweeps, with continuous batching.

`diffrax.diffeqsolve` under `jax.vmap` steps a batch in lockstep: every member waits for the
slowest, and the per-step bookkeeping (saving by interpolation, events, controller state) is
paid by the whole batch. Here a fixed number of *slots* each hold one trajectory with its own
time, step size and save index; one iteration of a `lax.while_loop` advances every slot by one
adaptive Tsit5 step (diffrax's tableau, an I-controller with diffrax's PID defaults). Steps
are clipped to land on the save times, so saved states are actual step ends (no
interpolation). When a slot finishes (reaches t1, reaches the steady state
||grad L||_inf <= gtol, exhausts its step budget, or fails) the host retires it and refills the
slot with the next grid point: the batch never waits for its slowest member, and the lockstep
efficiency (sum of own steps / (slots x iterations)) stays near 1 until the queue runs dry.

Depths are padded to the largest one with frozen unit layers; the derivative and the error
norm are restricted to the real layers, so a padded trajectory takes the steps of an unpadded
one.
"""


import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

ACTIVE, DONE, CONVERGED, BUDGET, FAILED, EMPTY, STIFF = 0, 1, 2, 3, 4, 5, 6
# Tsit5's real stability boundary is h lambda ~ -3.4: a slot whose h rho stays above
# STIFF_H_RHO for STIFF_STEPS accepted steps in a row is stability-limited (Hairer & Wanner,
# IV.2, as in DOPRI5's stiffness test) and goes to the implicit solver
STIFF_H_RHO, STIFF_STEPS = 3.0, 32
# ... provided the rest of the interval would take more than this many steps at that size
STIFF_REST_STEPS = 2**16
# Slot arrays (per device) hold a multiple of this many slots: XLA's CPU kernels treat the
# last few columns of a vectorised loop or matmul differently, and with whole blocks a
# trajectory's bits do not depend on its slot or on the array size (so padding, resuming
# and migrating between slot arrays change nothing).
SLOT_QUANTUM = 8
_TABLEAU = dfx.Tsit5.tableau
_ERROR_ORDER = 4  # Tsit5's embedded error estimate (as diffrax's `error_order`)
# Tsit5 is first-same-as-last: its last stage is evaluated at the new point
assert np.allclose(_TABLEAU.b_sol[:-1], _TABLEAU.a_lower[-1]) and _TABLEAU.b_sol[-1] == 0


class Slots(eqx.Module):
    """The state of every slot. The solver state is stored slot-last (the slot axis is the
    contiguous one, which XLA vectorises best); bookkeeping is slot-first."""

    u: jax.Array  # (Lmax, d, S) layers
    xi: jax.Array  # (d, S)
    fu: jax.Array  # (Lmax, d, S) derivative at (t, u) (first-same-as-last)
    fxi: jax.Array  # (d, S)
    mask: jax.Array  # (Lmax, 1, S) 1 on real layers
    t: jax.Array  # (S,)
    dt: jax.Array  # (S,) proposed next step
    steps: jax.Array  # (S,) attempted steps
    save_i: jax.Array  # (S,) next save index
    status: jax.Array  # (S,)
    saves: jax.Array  # (S, T, d) theta at the save times
    gid: jax.Array  # (S,) grid index, -1 when empty
    stiff_run: jax.Array  # (S,) accepted steps in a row at the stability boundary
    problem: object  # batched problem pytree (leading axis S), or None when shared


_SLOT_LAST = ("u", "xi", "fu", "fxi", "mask")


def slot_axis(name: str) -> int:
    return -1 if name in _SLOT_LAST else 0


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


def _batched_rhs(u, mask, problem, batched: bool):
    """du^j = -(prod_{k != j} u^k) grad L(theta) on the real layers, xi' = -grad L."""
    excl, th = _exclusive_products(u)
    # the gradient is taken slot-first (rows of a matmul); with slot counts that are
    # multiples of `SLOT_QUANTUM` every slot gets the same bits wherever it sits
    grad = jax.vmap(lambda p, t: _gradient(p)(t), in_axes=(0 if batched else None, 0))
    g = grad(problem, th.T).T
    return -excl * g[None] * mask, -g


def _norm(eu, exi, mask, real):
    """RMS over the real layers and xi. Summed layer by layer, in order, so that padded
    layers (zeros at the end) leave the result bitwise unchanged."""
    per_layer = jnp.sum((eu * mask) ** 2, axis=1)  # (L, S)
    total = jnp.sum(exi**2, axis=0)
    for j in range(per_layer.shape[0]):
        total = total + per_layer[j]
    return jnp.sqrt(total / real)


def _initial_dt(u, xi, fu, fxi, mask, real, rtol, atol, span):
    """Hairer's heuristic (first half), as `_flow.initial_step`, per slot."""
    su, sx = atol + rtol * jnp.abs(u), atol + rtol * jnp.abs(xi)
    d0 = _norm(u / su, xi / sx, mask, real)
    d1 = _norm(fu / su, fxi / sx, mask, real)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-300))
    return jnp.clip(h0, span * 1e-12, span * 0.1)


def _pick(cond, a, b, axis=0):
    """`where(cond, a, b)` with `cond` (S,) along the slot axis `axis` (0 or -1) of a, b."""
    if axis == 0:
        return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)
    return jnp.where(cond, a, b)


def _pick_slots(cond, new: Slots, old: Slots) -> Slots:
    fields = {f: _pick(cond, getattr(new, f), getattr(old, f), slot_axis(f))
              for f in Slots.__dataclass_fields__ if f != "problem"}
    problem = jax.tree_util.tree_map(lambda a, b: _pick(cond, a, b), new.problem, old.problem)
    return Slots(**fields, problem=problem)


def _theta(u):
    """theta of slot-last layers: (L, d, S) -> (S, d)."""
    return jnp.prod(u, axis=0).T


def _slots_at(u, xi, t, steps, save_i, saves, gid, depth, problem_rows, shared_problem, t1,
              rtol, atol) -> Slots:
    """Slots holding trajectories at the states `u (S, Lmax, d)`, `xi (S, d)` at times `t`
    (slot-first inputs): new ones, or ones handed over mid-way. `gid < 0`: empty."""
    batched = problem_rows is not None
    problem = problem_rows if batched else shared_problem
    u = jnp.transpose(u, (1, 2, 0))
    xi = xi.T
    max_depth, dim = u.shape[0], u.shape[1]
    mask = (jnp.arange(max_depth)[:, None] < depth[None, :]).astype(u.dtype)[:, None, :]
    fu, fxi = _batched_rhs(u, mask, problem, batched)
    dt = _initial_dt(u, xi, fu, fxi, mask, (depth + 1) * dim, rtol, atol, t1 - t)
    return Slots(u=u, xi=xi, fu=fu, fxi=fxi, mask=mask, t=t, dt=dt, steps=steps,
                 save_i=save_i, status=jnp.where(gid >= 0, ACTIVE, EMPTY), saves=saves,
                 gid=gid, stiff_run=jnp.zeros_like(steps),
                 problem=problem if batched else None)


@eqx.filter_jit
def refill(slots: Slots, replace, gid, u0, depth, problem_rows, shared_problem, t0, t1, ts,
           rtol, atol):
    """Put new trajectories into the slots where `replace` (host-built, fixed shapes; `u0` is
    slot-first (S, Lmax, d)). Slots with `replace` and `gid < 0` are emptied."""
    at_t0 = ts[0] <= t0
    theta0 = _theta(jnp.transpose(u0, (1, 2, 0)))
    saves = slots.saves.at[:, 0].set(jnp.where(at_t0, theta0, slots.saves[:, 0]))
    new = _slots_at(
        u0, jnp.zeros(u0.shape[::2], u0.dtype), jnp.full(gid.shape, t0, u0.dtype),
        jnp.zeros_like(slots.steps), jnp.where(at_t0, 1, 0) + 0 * slots.save_i, saves, gid,
        depth, problem_rows, shared_problem, t1, rtol, atol)
    return _pick_slots(replace, new, slots)


def empty_slots(num: int, max_depth: int, dim: int, num_saves: int, dtype, problem_rows=None):
    z = jnp.zeros
    return Slots(
        u=jnp.ones((max_depth, dim, num), dtype), xi=z((dim, num), dtype),
        fu=z((max_depth, dim, num), dtype), fxi=z((dim, num), dtype),
        mask=z((max_depth, 1, num), dtype), t=z((num,), dtype), dt=jnp.ones((num,), dtype),
        steps=z((num,), jnp.int32), save_i=z((num,), jnp.int32),
        status=jnp.full((num,), EMPTY, jnp.int32), saves=z((num, num_saves, dim), dtype),
        gid=jnp.full((num,), -1, jnp.int32), stiff_run=z((num,), jnp.int32),
        problem=problem_rows,
    )


def _tsit5_stages(s: Slots, h, problem, batched):
    """One Tsit5 step of size h (slot-last): new state, its derivative (first-same-as-last),
    the error estimate, and h times Hairer's estimate of the stiff eigenvalue,
    ||k7 - k6|| / ||z7 - z6|| (the last two stages both sit at t + h)."""
    ku, kx, zs = [s.fu], [s.fxi], []
    for ai in _TABLEAU.a_lower:
        uu = s.u + h * sum(float(a) * k for a, k in zip(ai, ku))
        xx = s.xi + h * sum(float(a) * k for a, k in zip(ai, kx))
        fu, fx = _batched_rhs(uu, s.mask, problem, batched)
        ku.append(fu)
        kx.append(fx)
        zs.append(uu)
    # Tsit5's last stage is evaluated at the new point (FSAL): b_sol = a_lower[-1]
    eu = h * sum(float(b) * k for b, k in zip(_TABLEAU.b_error, ku))
    ex = h * sum(float(b) * k for b, k in zip(_TABLEAU.b_error, kx))
    num = jnp.sum(((ku[-1] - ku[-2]) * s.mask) ** 2, axis=(0, 1))
    den = jnp.sum(((zs[-1] - zs[-2]) * s.mask) ** 2, axis=(0, 1))
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
    ones = jnp.ones_like(s.u[0])
    P = []
    for j in range(L):
        pair, _ = _exclusive_products(s.u.at[j].set(ones))  # pair[k] = e_jk for k != j
        P.append([jnp.where(j == k, ones, c * g * pair[k] * m[j] * m[k]) for k in range(L)])
    Pinv = _small_inv(jnp.stack([jnp.stack(r) for r in P]))  # (L, L, d, S)

    def p_solve(r):
        return jnp.stack([sum(Pinv[j, k] * r[k] for k in range(L)) for j in range(L)])

    K = sum(e[j] * p_solve(e)[j] for j in range(L))  # (d, S)
    cH = c * _hessians(theta.T, problem, batched)  # (d, d, S)
    M = jnp.eye(d)[:, :, None] + cH * K[None]
    Q = jnp.einsum("iks,kjs->ijs", _small_inv(M), cH)  # (I + c H K)^-1 c H

    def solve(r):
        y = p_solve(r)
        q = jnp.einsum("ijs,js->is", Q, sum(e[j] * y[j] for j in range(L)))
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


@eqx.filter_jit
def advance(slots: Slots, shared_problem, t1, ts, rtol, atol, gtol, budget, max_iters,
            retire_at, method: str = "tsit5"):
    """Step every active slot until `max_iters` iterations, or `retire_at` slots have
    finished, or none is active. Returns (iterations, sum of active slots over them, slots).

    `method="tsit5"` (explicit) marks a slot STIFF when h times the estimated stiff
    eigenvalue stays at the stability boundary for `STIFF_STEPS` accepted steps in a row;
    `method="kvaerno5"` (implicit, L-stable) is for those."""
    batched = slots.problem is not None
    T = ts.shape[0]
    use_gtol = gtol is not None

    def step(s: Slots) -> Slots:
        problem = s.problem if batched else shared_problem
        active = s.status == ACTIVE
        dim = s.u.shape[1]
        real = jnp.sum(s.mask[:, 0, :], axis=0) * dim + dim
        target = jnp.where(s.save_i < T, ts[jnp.minimum(s.save_i, T - 1)], t1)
        room = target - s.t
        clipped = s.dt >= room
        h = jnp.where(clipped, room, s.dt)
        h = jnp.where(active, h, 0.0)
        if method == "tsit5":
            u1, xi1, fu1, fx1, eu, ex, h_rho, solved = _tsit5_stages(s, h, problem, batched)
        else:
            u1, xi1, fu1, fx1, eu, ex, h_rho, solved = _kvaerno5_stages(
                s, h, problem, batched, rtol, atol)
        su = atol + rtol * jnp.maximum(jnp.abs(s.u), jnp.abs(u1))
        sx = atol + rtol * jnp.maximum(jnp.abs(s.xi), jnp.abs(xi1))
        err = _norm(eu / su, ex / sx, s.mask, real)
        finite = jnp.isfinite(err)
        accept = active & (err <= 1.0) & finite & solved
        safe_err = jnp.where(finite & (err > 0), err, 1e-10)
        factor = 0.9 * safe_err ** (-1.0 / (_ERROR_ORDER + 1))
        factor = jnp.where(err <= 1.0, jnp.clip(factor, 1.0, 10.0), jnp.clip(factor, 0.2, 0.9))
        factor = jnp.where(finite, factor, 0.2)
        factor = jnp.where(solved, factor, 0.3)  # Newton did not converge: a smaller step
        new_dt = h * factor
        new_dt = jnp.where(accept & clipped, jnp.maximum(new_dt, s.dt), new_dt)
        new_dt = jnp.where(active, new_dt, s.dt)
        t_new = jnp.where(clipped, target, s.t + h)
        t = jnp.where(accept, t_new, s.t)
        u = jnp.where(accept, u1, s.u)
        xi = jnp.where(accept, xi1, s.xi)
        fu = jnp.where(accept, fu1, s.fu)
        fxi = jnp.where(accept, fx1, s.fxi)
        hit = accept & clipped & (s.save_i < T)
        rows = jnp.arange(s.t.shape[0])
        col = jnp.minimum(s.save_i, T - 1)
        # slots without a save write out of bounds (dropped): no read of the saves
        saves = s.saves.at[rows, jnp.where(hit, col, T)].set(_theta(u), mode="drop")
        save_i = s.save_i + hit
        steps = s.steps + active
        # stiffness (Hairer's test): accepted steps in a row at the stability boundary
        counted = accept & ~clipped  # steps shortened to land on a save time are neutral
        stiff_run = jnp.where(counted, jnp.where(h_rho > STIFF_H_RHO, s.stiff_run + 1, 0),
                              s.stiff_run)
        status = s.status
        status = jnp.where(accept & (t >= t1), DONE, status)
        if use_gtol:
            conv = accept & (jnp.max(jnp.abs(fx1), axis=0) <= gtol)
            status = jnp.where(conv & (status == ACTIVE), CONVERGED, status)
        tiny = h <= 1e-14 * jnp.maximum(jnp.abs(s.t), 1.0)
        bad = active & (~jnp.isfinite(jnp.sum(fu1, axis=(0, 1))) | tiny) & ~accept
        status = jnp.where(bad & (status == ACTIVE), FAILED, status)
        # hand over only when the stability limit makes the rest of the interval long for
        # an explicit solver (an implicit step costs ~50 explicit ones here)
        long_rest = (t1 - t) > STIFF_REST_STEPS * new_dt
        status = jnp.where((status == ACTIVE) & (stiff_run >= STIFF_STEPS) & long_rest, STIFF,
                           status)
        status = jnp.where((status == ACTIVE) & (steps >= budget), BUDGET, status)
        return Slots(u=u, xi=xi, fu=fu, fxi=fxi, mask=s.mask, t=t, dt=new_dt, steps=steps,
                     save_i=save_i, status=status, saves=saves, gid=s.gid,
                     stiff_run=stiff_run, problem=s.problem)

    def finished(s):
        return jnp.sum((s.gid >= 0) & (s.status != ACTIVE))

    def cond(carry):
        it, _, s = carry
        return (it < max_iters) & jnp.any(s.status == ACTIVE) & (finished(s) < retire_at)

    def body(carry):
        it, work, s = carry
        return it + 1, work + jnp.sum(s.status == ACTIVE), step(s)

    return jax.lax.while_loop(cond, body, (jnp.asarray(0), jnp.asarray(0), slots))


@jax.jit
def _gather(slots: Slots, idx) -> Slots:
    fields = {f: jnp.take(getattr(slots, f), idx, axis=slot_axis(f))
              for f in Slots.__dataclass_fields__ if f != "problem"}
    problem = jax.tree_util.tree_map(lambda x: x[idx], slots.problem)
    return Slots(**fields, problem=problem)


def _placer(sharding):
    """Functions putting slot-first arrays and `Slots` on the devices of `sharding` (a 1-D
    `NamedSharding` over the slot axis), or leaving them where they are."""
    if sharding is None:
        return (lambda x: x), (lambda s: s)
    mesh, name = sharding.mesh, sharding.spec[0]

    def put(x):
        return None if x is None else jax.device_put(x, sharding)

    def put_slots(s: Slots) -> Slots:
        fields = {}
        for f in Slots.__dataclass_fields__:
            x = getattr(s, f)
            if f == "problem":
                fields[f] = jax.tree_util.tree_map(put, x)
            else:
                spec = [None] * x.ndim
                spec[slot_axis(f)] = name
                fields[f] = jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
        return Slots(**fields)

    return put, put_slots


def host_rows(slots: Slots, sel) -> dict:
    """The slots `sel` (a mask or slice) as slot-first numpy arrays."""
    return {
        "saves": np.asarray(slots.saves)[sel],
        "u": np.moveaxis(np.asarray(slots.u), -1, 0)[sel],
        "xi": np.asarray(slots.xi).T[sel], "t": np.asarray(slots.t)[sel],
        "steps": np.asarray(slots.steps)[sel], "status": np.asarray(slots.status)[sel],
        "save_i": np.asarray(slots.save_i)[sel],
    }


def _run_worker(queue, placeholder, make_rows, S, max_depth, dim, shared_problem, t0, t1, ts,
                rtol, atol, gtol, budget, on_retire, segment_iters, tail_slots, sharding,
                dtype):
    T = ts.shape[0]
    put, put_slots = _placer(sharding)
    _, _, rows0 = make_rows(jnp.full((S,), placeholder))
    slots = put_slots(empty_slots(S, max_depth, dim, T, dtype, rows0))

    def fill(slots, place, new):  # new trajectories from t0
        S = slots.t.shape[0]
        gid = np.full(S, -1, np.int64)
        gid[place] = new
        replace = np.zeros(S, bool)
        replace[place] = True
        u0, depth, rows = make_rows(np.where(gid >= 0, gid, placeholder))
        slots = refill(slots, put(jnp.asarray(replace)), put(jnp.asarray(gid, jnp.int32)),
                       put(u0), put(depth), put(rows), shared_problem, t0, t1, ts, rtol, atol)
        return slots, new

    def step(slots, retire_at):
        return advance(slots, shared_problem, t1, ts, rtol, atol, gtol, jnp.asarray(budget),
                       jnp.asarray(segment_iters), jnp.asarray(retire_at))

    _drive(slots, queue, fill, step, on_retire, tail_slots, sharding)


def _drive(slots: Slots, queue, fill, step, on_retire, tail_slots: int, sharding):
    """Step `slots` until `queue` is empty and every slot finished: free slots take the next
    items of `queue` (`fill(slots, place, items) -> (slots, grid indices)`), `step(slots,
    retire_at)` runs `advance`, finished slots go to `on_retire`. Once the queue is empty,
    busy slots move to 4x smaller arrays (down to `tail_slots`) when 3/4 of them are idle."""
    put_slots = _placer(sharding)[1]
    n_dev = 1 if sharding is None else sharding.mesh.size
    q = SLOT_QUANTUM * n_dev
    S = slots.t.shape[0]
    if S % q:
        raise ValueError(f"slot arrays must hold a multiple of {q} slots, got {S}.")
    tail_slots = -(-max(tail_slots, q) // q) * q
    occupied = np.zeros(S, bool)
    gid_host = np.full(S, -1, np.int64)
    work, iters = 0, 0
    while True:
        free_idx = np.flatnonzero(~occupied)
        new = queue.take(free_idx.size)
        if new.size:
            # finished slots not refilled keep their status (not stepped) and are skipped
            # below: a refill is only needed for new trajectories
            place = free_idx[:new.size]
            slots, gids = fill(slots, place, new)
            occupied[place] = True
            gid_host[place] = gids
        if not occupied.any():
            break
        small = max(tail_slots, -(-(S // 4) // q) * q)
        drained = queue.empty()
        if drained and small < S and occupied.sum() <= S // 4:
            # The queue is empty and a quarter of the slots are busy (long, often stiff
            # trajectories): move them to a 4x smaller slot array, whose iterations are
            # cheaper. Down to `tail_slots`.
            keep = np.flatnonzero(occupied)
            spare = np.flatnonzero(~occupied)[: small - keep.size]
            idx = np.concatenate([keep, spare])
            slots = put_slots(_gather(slots, jnp.asarray(idx)))
            occupied, gid_host = occupied[idx], gid_host[idx]
            S = small
            continue
        # `advance` counts every finished slot, also those already reported
        reported = int(np.sum((gid_host >= 0) & ~occupied))
        it, w, slots = step(slots, reported + (max(1, S // 8) if not drained else S + 1))
        iters += int(it)
        work += int(w)
        fin = occupied & (np.asarray(slots.status) != ACTIVE)
        if fin.any():
            on_retire(gid_host[fin], host_rows(slots, fin), work, iters * S)
            work, iters = 0, 0
            occupied[fin] = False


@eqx.filter_jit
def _refill_states(slots: Slots, replace, u, xi, t, steps, save_i, saves, gid, depth,
                   problem_rows, shared_problem, t1, rtol, atol):
    """Put handed-over trajectories (slot-first states) into the slots where `replace`."""
    new = _slots_at(u, xi, t, steps, save_i, saves, gid, depth, problem_rows, shared_problem,
                    t1, rtol, atol)
    return _pick_slots(replace, new, slots)
