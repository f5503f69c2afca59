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

from ._network import theta as product_theta

ACTIVE, DONE, CONVERGED, BUDGET, FAILED, EMPTY = 0, 1, 2, 3, 4, 5
_TABLEAU = dfx.Tsit5.tableau
_ERROR_ORDER = 4  # Tsit5's embedded error estimate (as diffrax's `error_order`)
# Tsit5 is first-same-as-last: its last stage is evaluated at the new point
assert np.allclose(_TABLEAU.b_sol[:-1], _TABLEAU.a_lower[-1]) and _TABLEAU.b_sol[-1] == 0


class Slots(eqx.Module):
    """The state of every slot (leading axis S)."""

    u: jax.Array  # (S, Lmax, d) layers
    xi: jax.Array  # (S, d)
    fu: jax.Array  # (S, Lmax, d) derivative at (t, u) (first-same-as-last)
    fxi: jax.Array  # (S, d)
    mask: jax.Array  # (S, Lmax, 1) 1 on real layers
    t: jax.Array  # (S,)
    dt: jax.Array  # (S,) proposed next step
    steps: jax.Array  # (S,) attempted steps
    save_i: jax.Array  # (S,) next save index
    status: jax.Array  # (S,)
    saves: jax.Array  # (S, T, d) theta at the save times
    gid: jax.Array  # (S,) grid index, -1 when empty
    problem: object  # batched problem pytree, or None when shared


def _exclusive_products(u):
    """prod_{k != j} u^k for every layer j, by prefix and suffix products (no division, exact
    at zeros): (S, L, d) -> (S, L, d)."""
    L = u.shape[1]
    pre = [jnp.ones_like(u[:, 0])]
    for j in range(L - 1):
        pre.append(pre[-1] * u[:, j])
    suf = [jnp.ones_like(u[:, 0])]
    for j in range(L - 1, 0, -1):
        suf.append(suf[-1] * u[:, j])
    suf = suf[::-1]
    return jnp.stack([pre[j] * suf[j] for j in range(L)], axis=1), pre[-1] * u[:, -1]


def _batched_rhs(u, mask, problem, batched: bool):
    """du^j = -(prod_{k != j} u^k) grad L(theta) on the real layers, xi' = -grad L."""
    excl, th = _exclusive_products(u)
    grad = jax.vmap(jax.grad(lambda p, t: p.loss(t), argnums=1),
                    in_axes=(0 if batched else None, 0))
    g = grad(problem, th)
    return -excl * g[:, None, :] * mask, -g


def _norm(eu, exi, mask, real):
    total = jnp.sum((eu * mask) ** 2, axis=(1, 2)) + jnp.sum(exi**2, axis=1)
    return jnp.sqrt(total / real)


def _initial_dt(u, xi, fu, fxi, mask, real, rtol, atol, span):
    """Hairer's heuristic (first half), as `_flow.initial_step`, per slot."""
    su, sx = atol + rtol * jnp.abs(u), atol + rtol * jnp.abs(xi)
    d0 = _norm(u / su, xi / sx, mask, real)
    d1 = _norm(fu / su, fxi / sx, mask, real)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-300))
    return jnp.clip(h0, span * 1e-12, span * 0.1)


def _pick(cond, a, b):
    return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)


@eqx.filter_jit
def refill(slots: Slots, replace, gid, u0, depth, problem_rows, shared_problem, t0, t1, ts,
           rtol, atol):
    """Put new trajectories into the slots where `replace` (host-built, fixed shapes). Slots
    with `replace` and `gid < 0` are emptied."""
    batched = problem_rows is not None
    problem = problem_rows if batched else shared_problem
    max_depth = u0.shape[1]
    mask = (jnp.arange(max_depth)[None, :] < depth[:, None]).astype(u0.dtype)[..., None]
    real = (depth + 1) * u0.shape[2]
    xi0 = jnp.zeros((u0.shape[0], u0.shape[2]), u0.dtype)
    fu, fxi = _batched_rhs(u0, mask, problem, batched)
    dt = _initial_dt(u0, xi0, fu, fxi, mask, real, rtol, atol, t1 - t0)
    at_t0 = ts[0] <= t0
    theta0 = jax.vmap(product_theta)(u0)
    saves = slots.saves.at[:, 0].set(jnp.where(at_t0, theta0, slots.saves[:, 0]))
    saves = _pick(replace, saves, slots.saves)
    status = jnp.where(gid >= 0, ACTIVE, EMPTY)
    new = Slots(
        u=u0, xi=xi0, fu=fu, fxi=fxi, mask=mask, t=jnp.full_like(dt, t0), dt=dt,
        steps=jnp.zeros_like(slots.steps), save_i=jnp.where(at_t0, 1, 0) + 0 * slots.save_i,
        status=status, saves=saves, gid=gid,
        problem=problem if batched else None,
    )
    return jax.tree_util.tree_map(lambda a, b: _pick(replace, a, b), new, slots)


def empty_slots(num: int, max_depth: int, dim: int, num_saves: int, dtype, problem_rows=None):
    z = jnp.zeros
    return Slots(
        u=jnp.ones((num, max_depth, dim), dtype), xi=z((num, dim), dtype),
        fu=z((num, max_depth, dim), dtype), fxi=z((num, dim), dtype),
        mask=z((num, max_depth, 1), dtype), t=z((num,), dtype), dt=jnp.ones((num,), dtype),
        steps=z((num,), jnp.int32), save_i=z((num,), jnp.int32),
        status=jnp.full((num,), EMPTY, jnp.int32), saves=z((num, num_saves, dim), dtype),
        gid=jnp.full((num,), -1, jnp.int32), problem=problem_rows,
    )


@eqx.filter_jit
def advance(slots: Slots, shared_problem, t1, ts, rtol, atol, gtol, budget, max_iters,
            retire_at):
    """Step every active slot until `max_iters` iterations, or `retire_at` slots have
    finished, or none is active. Returns (iterations, sum of active slots over them, slots)."""
    batched = slots.problem is not None
    T = ts.shape[0]
    a_lower, b_err = _TABLEAU.a_lower, _TABLEAU.b_error
    use_gtol = gtol is not None

    def step(s: Slots) -> Slots:
        problem = s.problem if batched else shared_problem
        active = s.status == ACTIVE
        real = jnp.sum(s.mask[:, :, 0], axis=1) * s.u.shape[2] + s.u.shape[2]
        target = jnp.where(s.save_i < T, ts[jnp.minimum(s.save_i, T - 1)], t1)
        room = target - s.t
        clipped = s.dt >= room
        h = jnp.where(clipped, room, s.dt)
        h = jnp.where(active, h, 0.0)
        hb = h[:, None, None]
        ku, kx = [s.fu], [s.fxi]
        for i, ai in enumerate(a_lower):
            uu = s.u + hb * sum(float(a) * k for a, k in zip(ai, ku))
            xx = s.xi + h[:, None] * sum(float(a) * k for a, k in zip(ai, kx))
            fu, fx = _batched_rhs(uu, s.mask, problem, batched)
            ku.append(fu)
            kx.append(fx)
        # Tsit5's last stage is evaluated at the new point (FSAL): b_sol = a_lower[-1]
        u1, xi1 = uu, xx
        fu1, fx1 = ku[-1], kx[-1]
        eu = hb * sum(float(b) * k for b, k in zip(b_err, ku))
        ex = h[:, None] * sum(float(b) * k for b, k in zip(b_err, kx))
        su = atol + rtol * jnp.maximum(jnp.abs(s.u), jnp.abs(u1))
        sx = atol + rtol * jnp.maximum(jnp.abs(s.xi), jnp.abs(xi1))
        err = _norm(eu / su, ex / sx, s.mask, real)
        finite = jnp.isfinite(err)
        accept = active & (err <= 1.0) & finite
        safe_err = jnp.where(finite & (err > 0), err, 1e-10)
        factor = 0.9 * safe_err ** (-1.0 / (_ERROR_ORDER + 1))
        factor = jnp.where(err <= 1.0, jnp.clip(factor, 1.0, 10.0), jnp.clip(factor, 0.2, 0.9))
        factor = jnp.where(finite, factor, 0.2)
        new_dt = h * factor
        new_dt = jnp.where(accept & clipped, jnp.maximum(new_dt, s.dt), new_dt)
        new_dt = jnp.where(active, new_dt, s.dt)
        t_new = jnp.where(clipped, target, s.t + h)
        t = jnp.where(accept, t_new, s.t)
        u = _pick(accept, u1, s.u)
        xi = _pick(accept, xi1, s.xi)
        fu = _pick(accept, fu1, s.fu)
        fxi = _pick(accept, fx1, s.fxi)
        hit = accept & clipped & (s.save_i < T)
        th = jax.vmap(product_theta)(u)
        rows = jnp.arange(s.u.shape[0])
        col = jnp.minimum(s.save_i, T - 1)
        saves = s.saves.at[rows, col].set(jnp.where(hit[:, None], th, s.saves[rows, col]))
        save_i = s.save_i + hit
        steps = s.steps + active
        status = s.status
        status = jnp.where(accept & (t >= t1), DONE, status)
        if use_gtol:
            conv = accept & (jnp.max(jnp.abs(fx1), axis=1) <= gtol)
            status = jnp.where(conv & (status == ACTIVE), CONVERGED, status)
        tiny = h <= 1e-14 * jnp.maximum(jnp.abs(s.t), 1.0)
        bad = active & (~jnp.isfinite(jnp.sum(fu1, axis=(1, 2))) | tiny) & ~accept
        status = jnp.where(bad & (status == ACTIVE), FAILED, status)
        status = jnp.where((status == ACTIVE) & (steps >= budget), BUDGET, status)
        return Slots(u=u, xi=xi, fu=fu, fxi=fxi, mask=s.mask, t=t, dt=new_dt, steps=steps,
                     save_i=save_i, status=status, saves=saves, gid=s.gid, problem=s.problem)

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
def _gather(slots, idx):
    return jax.tree_util.tree_map(lambda x: x[idx], slots)


def run_queue(order, make_rows, *, num_slots: int, max_depth: int, dim: int, shared_problem,
              t0, t1, ts, rtol, atol, gtol, budget: int, on_retire, segment_iters: int = 256,
              tail_slots: int = 16, sharding=None, dtype=jnp.float64):
    """Run the grid indices `order` through `num_slots` slots (longest expected first is
    best). `make_rows(gids)` returns `(u0 (S, Lmax, d), depth (S,), problem_rows or None)` for
    `S` grid indices. `on_retire(gids, rows, work, slot_iters)` receives finished trajectories
    as numpy arrays, with the slot-steps done and the slot-iterations spent since the last
    call. Once the queue is empty, the busy slots move to 4x smaller arrays (down to
    `tail_slots`) whenever three quarters of the slots are idle."""
    S = num_slots
    T = ts.shape[0]
    tail_slots = min(S, tail_slots)

    def put(x):
        return x if sharding is None or x is None else jax.device_put(x, sharding)

    order = np.asarray(order, np.int64)
    placeholder = int(order[0]) if order.size else 0
    _, _, rows0 = make_rows(jnp.full((S,), placeholder))
    slots = jax.tree_util.tree_map(put, empty_slots(S, max_depth, dim, T, dtype, rows0))
    occupied = np.zeros(S, bool)
    freed = np.ones(S, bool)
    pos, work, iters = 0, 0, 0
    while True:
        free_idx = np.flatnonzero(~occupied)
        n_new = min(free_idx.size, order.size - pos)
        if freed.any() or n_new:
            gid = np.full(S, -1, np.int64)
            take = free_idx[:n_new]
            gid[take] = order[pos:pos + n_new]
            pos += n_new
            replace = freed.copy()
            replace[take] = True
            u0, depth, rows = make_rows(jnp.asarray(np.where(gid >= 0, gid, placeholder)))
            slots = refill(slots, put(jnp.asarray(replace)), put(jnp.asarray(gid, jnp.int32)),
                           put(u0), put(depth), put(rows), shared_problem, t0, t1, ts, rtol,
                           atol)
            occupied[take] = True
            freed[:] = False
        if not occupied.any():
            break
        if pos == order.size and S > tail_slots and occupied.sum() <= S // 4:
            # The queue is empty and a quarter of the slots are busy (long, often stiff
            # trajectories): move them to a 4x smaller slot array, whose iterations are
            # about 4x cheaper. Down to `tail_slots`.
            small = max(tail_slots, S // 4)
            keep = np.flatnonzero(occupied)
            spare = np.flatnonzero(~occupied)[: small - keep.size]
            idx = np.concatenate([keep, spare])
            slots = _gather(slots, jnp.asarray(idx))
            slots = jax.tree_util.tree_map(put, slots)
            occupied, freed = occupied[idx], freed[idx]
            S = small
            continue
        retire_at = max(1, S // 8) if pos < order.size else S + 1
        it, w, slots = advance(slots, shared_problem, t1, ts, rtol, atol, gtol,
                               jnp.asarray(budget), jnp.asarray(segment_iters),
                               jnp.asarray(retire_at))
        iters += int(it)
        work += int(w)
        status = np.asarray(slots.status)
        gids = np.asarray(slots.gid)
        fin = (gids >= 0) & (status != ACTIVE)
        if fin.any():
            rows_np = {
                "saves": np.asarray(slots.saves)[fin], "u": np.asarray(slots.u)[fin],
                "xi": np.asarray(slots.xi)[fin], "t": np.asarray(slots.t)[fin],
                "steps": np.asarray(slots.steps)[fin], "status": status[fin],
                "save_i": np.asarray(slots.save_i)[fin],
            }
            on_retire(gids[fin], rows_np, work, iters * S)
            work, iters = 0, 0
            occupied[fin] = False
            freed[fin] = True
