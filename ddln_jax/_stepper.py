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

import threading
from concurrent.futures import ThreadPoolExecutor

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


_slots_at_jit = eqx.filter_jit(_slots_at)


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


def _kvaerno5_stages(s: Slots, h, problem, batched, rtol, atol):
    """One Kvaerno5 step (diffrax's tableau) of size h: every implicit stage
    z = c + h gamma f(z) is solved by chord iterations with the Jacobian of the layer vector
    field at the step start (jax.jacfwd, per slot) and one inverse of I - h gamma J per step.
    Returns the same as `_tsit5_stages`, with `converged` (False: reject the step)."""
    L, d, S = s.u.shape
    N = L * d

    def f_slot(u_flat, mask, prob):
        fu, _ = _batched_rhs(u_flat.reshape(L, d, 1), mask[..., None], prob, batched)
        return fu.reshape(N)

    probs_axis = 0 if batched else None
    probs1 = (jax.tree_util.tree_map(lambda x: x[:, None], problem) if batched else problem)
    u_rows = jnp.moveaxis(s.u, -1, 0).reshape(S, N)
    jac = jax.vmap(jax.jacfwd(f_slot), in_axes=(0, -1, probs_axis))(u_rows, s.mask, probs1)
    # one inverse per step (N = L d is small): each chord iteration is then a matvec
    inv = jnp.linalg.inv(jnp.eye(N) - (h * _GAMMA)[:, None, None] * jac)

    def solve(r):  # (L, d, S) -> (L, d, S) with (I - h gamma J)^-1 per slot
        rows = jnp.moveaxis(r, -1, 0).reshape(S, N)
        x = jnp.einsum("sij,sj->si", inv, rows)
        return jnp.moveaxis(x.reshape(S, L, d), 0, -1)

    scale = atol + rtol * jnp.abs(s.u)
    ku, kx = [s.fu], [s.fxi]
    converged = jnp.ones_like(h, bool)
    for ai, pi in zip(_KV.a_lower, _KV.a_predictor):
        c = s.u + h * sum(float(a) * k for a, k in zip(ai, ku))
        z0 = s.u + h * sum(float(a) * k for a, k in zip(pi, ku))

        def newton(carry, c=c):
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

        _, z, inc = jax.lax.while_loop(more, newton, (0, z0, jnp.full_like(h, jnp.inf)))
        converged = converged & (inc <= 1e-3)
        fu, fx = _batched_rhs(z, s.mask, problem, batched)
        ku.append(fu)
        kx.append(fx)
    xi1 = s.xi + h * sum(float(b) * k for b, k in zip(_KV.b_sol, kx))
    eu = h * sum(float(b) * k for b, k in zip(_KV.b_error, ku))
    ex = h * sum(float(b) * k for b, k in zip(_KV.b_error, kx))
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
        saves = s.saves.at[rows, col].set(
            jnp.where(hit[:, None], _theta(u), s.saves[rows, col]))
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


def run_queue(order, make_rows, *, num_slots: int, max_depth: int, dim: int, shared_problem,
              t0, t1, ts, rtol, atol, gtol, budget: int, on_retire, segment_iters: int = 256,
              tail_slots: int = 2, sharding=None, workers: int = 1, dtype=jnp.float64):
    """Run the grid indices `order` through `num_slots` slots (longest expected first is
    best). `make_rows(gids)` returns `(u0 (S, Lmax, d), depth (S,), problem_rows or None)` for
    `S` grid indices. `on_retire(gids, rows, work, slot_iters)` receives finished trajectories
    as numpy arrays, with the slot-steps done and the slot-iterations spent since the last
    call (calls are serialised).

    `workers > 1` splits the slots into that many independent slot arrays, each stepped by
    its own host thread on a fixed share of `order` (round robin, so the result does not
    depend on thread timing): XLA runs one small computation on one core, so on a CPU this
    is how the cores are used. Once a worker's queue is empty, its busy slots move to 4x
    smaller arrays (down to `tail_slots`) whenever three quarters of them are idle."""
    order = np.asarray(order, np.int64)
    per = num_slots // max(1, int(workers))  # slots per worker, before idle workers are dropped
    workers = max(1, min(int(workers), order.size))
    if workers == 1:
        _run_worker(order, make_rows, per, max_depth, dim, shared_problem, t0, t1, ts,
                    rtol, atol, gtol, budget, on_retire, segment_iters, tail_slots, sharding,
                    dtype)
        return
    lock = threading.Lock()

    def serialised(*args):
        with lock:
            on_retire(*args)

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_run_worker, order[w::workers], make_rows, per, max_depth, dim,
                               shared_problem, t0, t1, ts, rtol, atol, gtol, budget,
                               serialised, segment_iters, tail_slots, sharding, dtype)
                   for w in range(workers)]
        for f in futures:
            f.result()


def _run_worker(order, make_rows, S, max_depth, dim, shared_problem, t0, t1, ts, rtol, atol,
                gtol, budget, on_retire, segment_iters, tail_slots, sharding, dtype):
    T = ts.shape[0]
    put, put_slots = _placer(sharding)
    n_dev = 1 if sharding is None else sharding.mesh.size
    q = SLOT_QUANTUM * n_dev
    if S % q:
        raise ValueError(f"slot arrays must hold a multiple of {q} slots, got {S}.")
    tail_slots = -(-max(tail_slots, q) // q) * q
    placeholder = int(order[0]) if order.size else 0
    _, _, rows0 = make_rows(jnp.full((S,), placeholder))
    slots = put_slots(empty_slots(S, max_depth, dim, T, dtype, rows0))
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
        small = max(tail_slots, -(-(S // 4) // q) * q)
        if pos == order.size and small < S and occupied.sum() <= S // 4:
            # The queue is empty and a quarter of the slots are busy (long, often stiff
            # trajectories): move them to a 4x smaller slot array, whose iterations are
            # cheaper. Down to `tail_slots`.
            keep = np.flatnonzero(occupied)
            spare = np.flatnonzero(~occupied)[: small - keep.size]
            idx = np.concatenate([keep, spare])
            slots = put_slots(_gather(slots, jnp.asarray(idx)))
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
            on_retire(gids[fin], host_rows(slots, fin), work, iters * S)
            work, iters = 0, 0
            occupied[fin] = False
            freed[fin] = True


def run_implicit(rows: dict, gids, depth, problem_rows, *, shared_problem, t1, ts, rtol, atol,
                 gtol, budget: int, segment_iters: int = 512, sharding=None):
    """Continue the handed-over trajectories `rows` (numpy, slot-first, as `on_retire`
    gives them) with Kvaerno5 in one slot array, every slot with its own step size, until
    all are finished. Returns the finished rows and the slot-iterations spent."""
    n = len(gids)
    n_dev = 1 if sharding is None else sharding.mesh.size
    q = SLOT_QUANTUM * n_dev
    S = -(-n // q) * q
    put, put_slots = _placer(sharding)

    def pad(x, fill=0):
        x = np.asarray(x)
        return jnp.asarray(np.concatenate([x, np.full((S - n,) + x.shape[1:], fill, x.dtype)]))

    u = pad(rows["u"], 1)
    g = pad(np.asarray(gids, np.int32), -1)
    d = pad(depth, 1)
    if problem_rows is not None:
        problem_rows = jax.tree_util.tree_map(lambda x: pad(x), problem_rows)
    t = pad(rows["t"], float(t1))
    slots = put_slots(_slots_at_jit(
        u, pad(rows["xi"]), t, pad(rows["steps"]), pad(rows["save_i"]), pad(rows["saves"]),
        g, d, problem_rows, shared_problem, t1, rtol, atol))
    iters = 0
    while True:
        it, _, slots = advance(slots, shared_problem, t1, ts, rtol, atol, gtol,
                               jnp.asarray(budget), jnp.asarray(segment_iters),
                               jnp.asarray(S + 1), method="kvaerno5")
        iters += int(it)
        if not np.any(np.asarray(slots.status) == ACTIVE):
            break
    return host_rows(slots, slice(0, n)), iters * S
