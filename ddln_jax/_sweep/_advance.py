"""The slot loop: a fixed number of *slots* each hold one trajectory with its own time, step
size and save index; one iteration of a `lax.while_loop` (`advance`) advances every slot by
one adaptive step of a *method*, and the host retires finished slots and refills them with
the next grid points (`_drive`).

`diffrax.diffeqsolve` under `jax.vmap` steps a batch in lockstep: every member waits for the
slowest, and the per-step bookkeeping (saving by interpolation, events) is paid by the whole
batch. Here steps are clipped to land on the save times, so saved states are actual step ends
(no interpolation), and when a slot finishes (reaches t1, reaches the steady state
||grad L||_inf <= gtol, exhausts its step budget, or fails) it is refilled: the batch never
waits for its slowest member, and the lockstep efficiency (sum of own steps / (slots x
iterations)) stays near 1 until the queue runs dry.

A method is `init(slots, problem, batched, rtol, atol) -> carry` (its own per-slot state,
slot axis last, or None) and `step(slots, h, t_new, problem, batched, rtol, atol, need_grad)
-> Step` (a proposal, its acceptance and the next step size), with `hands_over` (whether
members may be marked STIFF). Two kinds: the fused steppers here (`Fused`: `_fused`'s Tsit5,
or its structured Kvaerno5 for stiff members) and any diffrax solver
(`_diffrax_method.DiffraxMethod`). Both control the step as diffrax's
`ClipStepSizeController(PIDController(rtol, atol), step_ts=ts)` does: an I-controller with
diffrax's defaults, whose next step is a factor times the step taken (also after a step
shortened to land on a save time).

Depths are padded to the largest one with frozen unit layers; the derivative and the error
norm are restricted to the real layers, so a padded trajectory takes the steps of an unpadded
one.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._xla import OptionJit, accepted_options
from ._fused import (
    _ERROR_ORDER,
    _batched_rhs,
    _initial_dt,
    _kvaerno5_stages,
    _norm,
    _tsit5_stages,
)
from ._slots import (
    ACTIVE,
    BUDGET,
    CONVERGED,
    DONE,
    EMPTY,
    FAILED,
    STIFF,
    Slots,
    _pick,
    _pick_slots,
    _theta,
)

# Tsit5's real stability boundary is h lambda ~ -3.4: a slot whose h rho stays above
# STIFF_H_RHO for STIFF_STEPS accepted steps in a row is stability-limited (Hairer & Wanner,
# IV.2, as in DOPRI5's stiffness test) and goes to the implicit solver
STIFF_H_RHO, STIFF_STEPS = 3.0, 32
# ... provided the whole trajectory would take more than this many explicit steps (those
# taken + the rest of the interval at the current size). A sweep lasts at least as many
# iterations as its longest member takes steps, so members 10-20x longer than the median
# set its wall time; Kvaerno5 takes ~10x fewer steps on them. Measured (depth 6, dim 8,
# second calls, B = 1024): 2^14 4.2-5.6 s against 5.6-7.6 s with the rest alone above 2^16
# on three random problems, 2.3-2.5 against 4.3-4.6 s on one whose longest member took 56k
# steps; B = 4096: 15.6-16.1 against 19.2 s. 2^15 is between; 2^13 and 2^12 hand over
# 170-900 members of 1024 and are slower again
STIFF_TOTAL_STEPS = 2**14


class Step(NamedTuple):
    """A method's proposal for one step of every slot (slot-last arrays)."""

    u: jax.Array  # (Lmax, d, S) the candidate state
    xi: jax.Array  # (d, S)
    fu: jax.Array  # (Lmax, d, S) what `Slots.fu` holds once the step is accepted
    fxi: jax.Array  # (d, S) -grad L at the candidate (when asked: `need_grad`)
    keep: jax.Array  # (S,) the controller accepts the step
    dt: jax.Array  # (S,) the next step size proposed
    finite: jax.Array  # (S,) the candidate's derivative is finite (else: FAILED if rejected)
    h_rho: jax.Array  # (S,) h times the estimated stiff eigenvalue (0: no estimate)
    carry: object  # the method's per-slot state after the step (slot axis last), or None


def _pid(err, error_order):
    """diffrax's `PIDController.adapt_step_size` with its defaults (an I-controller: safety
    0.9, factormin 0.2, factormax 10) for the scaled error norms `err`: (keep, factor), the
    next step being `factor` times the step taken. `err = inf` (a failed step) gives 0.2."""
    keep = err < 1
    factor = 0.9 * (1 / err) ** (1 / error_order)
    return keep, jnp.clip(factor, jnp.where(keep, 1.0, 0.2), jnp.where(keep, 10.0, 0.9))


class Fused(eqx.Module):
    """`_fused`'s steppers on whole slot arrays: Tsit5, or the structured Kvaerno5 when
    `implicit`, with `_pid` inline; `hands_over`: members may be marked STIFF."""

    implicit: bool = eqx.field(static=True)
    hands_over: bool = eqx.field(static=True)

    def init(self, s: Slots, problem, batched, rtol, atol):
        return None  # first-same-as-last: the derivative is `Slots.fu`, `Slots.fxi`

    def step(self, s: Slots, h, t_new, problem, batched, rtol, atol, need_grad) -> Step:
        if self.implicit:
            stages = _kvaerno5_stages(s, h, problem, batched, rtol, atol)
        else:
            stages = _tsit5_stages(s, h, problem, batched)
        u1, xi1, fu1, fx1, eu, ex, h_rho, solved = stages
        real = jnp.sum(s.mask[:, 0, :], axis=0) * s.u.shape[1] + s.u.shape[1]
        su = atol + rtol * jnp.maximum(jnp.abs(s.u), jnp.abs(u1))
        sx = atol + rtol * jnp.maximum(jnp.abs(s.xi), jnp.abs(xi1))
        err = _norm(eu / su, ex / sx, s.mask, real)
        # as diffrax: a non-finite error, or Newton not converged, is an infinite error
        err = jnp.where(jnp.isfinite(err) & solved, err, jnp.inf)
        keep, factor = _pid(err, _ERROR_ORDER + 1)  # diffrax's error_order: 5
        return Step(u=u1, xi=xi1, fu=fu1, fxi=fx1, keep=keep, dt=h * factor,
                    finite=jnp.isfinite(jnp.sum(fu1, axis=(0, 1))), h_rho=h_rho, carry=None)


TSIT5 = Fused(implicit=False, hands_over=True)
KVAERNO5 = Fused(implicit=True, hands_over=False)


def _slots_at(u, xi, t, steps, save_i, saves, gid, depth, problem_rows, shared_problem, t1,
              rtol, atol, method=TSIT5) -> Slots:
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
    s = Slots(u=u, xi=xi, fu=fu, fxi=fxi, mask=mask, t=t, dt=dt, steps=steps,
              save_i=save_i, status=jnp.where(gid >= 0, ACTIVE, EMPTY), saves=saves,
              gid=gid, stiff_run=jnp.zeros_like(steps),
              problem=problem if batched else None)
    return _with_carry(s, method.init(s, problem, batched, rtol, atol))


def _with_carry(s: Slots, carry) -> Slots:
    return eqx.tree_at(lambda x: x.carry, s, carry, is_leaf=lambda x: x is None)


def with_empty_carry(slots: Slots, method, shared_problem, rtol, atol) -> Slots:
    """`slots` (fresh from `empty_slots`) with zeros shaped as `method`'s carry."""
    problem = shared_problem if slots.problem is None else slots.problem
    shapes = jax.eval_shape(lambda s, p: method.init(s, p, slots.problem is not None, rtol,
                                                     atol), slots, problem)
    return _with_carry(slots, jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                     shapes))


@eqx.filter_jit
def refill(slots: Slots, replace, gid, u0, depth, problem_rows, shared_problem, t0, t1, ts,
           rtol, atol, method=TSIT5):
    """Put new trajectories into the slots where `replace` (host-built, fixed shapes; `u0` is
    slot-first (S, Lmax, d)). Slots with `replace` and `gid < 0` are emptied."""
    at_t0 = ts[0] <= t0
    theta0 = _theta(jnp.transpose(u0, (1, 2, 0)))
    saves = slots.saves.at[:, 0].set(jnp.where(at_t0, theta0, slots.saves[:, 0]))
    new = _slots_at(
        u0, jnp.zeros(u0.shape[::2], u0.dtype), jnp.full(gid.shape, t0, u0.dtype),
        jnp.zeros_like(slots.steps), jnp.where(at_t0, 1, 0) + 0 * slots.save_i, saves, gid,
        depth, problem_rows, shared_problem, t1, rtol, atol, method)
    return _pick_slots(replace, new, slots)


def _status(s: Slots, p: Step, accept, active, h, t, steps, stiff_run, rest_dt, t1, gtol,
            budget, hands_over: bool):
    status = jnp.where(accept & (t >= t1), DONE, s.status)
    if gtol is not None:
        conv = accept & (jnp.max(jnp.abs(p.fxi), axis=0) <= gtol)
        status = jnp.where(conv & (status == ACTIVE), CONVERGED, status)
    tiny = h <= 1e-14 * jnp.maximum(jnp.abs(s.t), 1.0)
    bad = active & (~p.finite | tiny) & ~accept
    status = jnp.where(bad & (status == ACTIVE), FAILED, status)
    if hands_over:
        # only when the stability limit makes the whole trajectory long for an explicit
        # solver (an implicit step costs ~50 explicit ones here)
        long_rest = (t1 - t) > (STIFF_TOTAL_STEPS - steps) * rest_dt
        status = jnp.where((status == ACTIVE) & (stiff_run >= STIFF_STEPS) & long_rest,
                           STIFF, status)
    return jnp.where((status == ACTIVE) & (steps >= budget), BUDGET, status)


@eqx.filter_jit
def advance(slots: Slots, shared_problem, t1, ts, rtol, atol, gtol, budget, max_iters,
            retire_at, method=TSIT5):
    """Step every active slot with `method` until `max_iters` iterations, or `retire_at`
    slots have finished, or none is active. Returns (iterations, sum of active slots over
    them, slots).

    With `method.hands_over` (the fused Tsit5) a slot is marked STIFF when h times the
    estimated stiff eigenvalue stays at the stability boundary for `STIFF_STEPS` accepted
    steps in a row (`KVAERNO5`, implicit and L-stable, is for those)."""
    batched = slots.problem is not None
    T = ts.shape[0]

    def step(s: Slots) -> Slots:
        problem = s.problem if batched else shared_problem
        active = s.status == ACTIVE
        target = jnp.where(s.save_i < T, ts[jnp.minimum(s.save_i, T - 1)], t1)
        # the step ends at t + dt, or at the next save time if that is sooner (as diffrax's
        # `ClipStepSizeController(step_ts=ts)`), and its size is the difference of its ends
        t_new = s.t + s.dt
        clipped = t_new >= target
        t_new = jnp.where(active, jnp.where(clipped, target, t_new), s.t)
        h = t_new - s.t
        p = method.step(s, h, t_new, problem, batched, rtol, atol, gtol is not None)
        accept = active & p.keep
        new_dt = jnp.where(active, p.dt, s.dt)
        # a step shortened to land on a save time does not shrink the next one (unlike
        # diffrax's `ClipStepSizeController`, whose rule made a trajectory's bits ~100x more
        # sensitive to round-off after each save: 1.9e-9 against 3e-11 between programs)
        new_dt = jnp.where(accept & clipped, jnp.maximum(new_dt, s.dt), new_dt)
        t = jnp.where(accept, t_new, s.t)
        u, xi, fu, fxi = (_pick(accept, a, b, -1) for a, b in
                          ((p.u, s.u), (p.xi, s.xi), (p.fu, s.fu), (p.fxi, s.fxi)))
        carry = jax.tree_util.tree_map(lambda a, b: _pick(active, a, b, -1), p.carry, s.carry)
        hit = accept & clipped & (s.save_i < T)
        rows = jnp.arange(s.t.shape[0])
        col = jnp.minimum(s.save_i, T - 1)
        # slots without a save write out of bounds (dropped): no read of the saves
        saves = s.saves.at[rows, jnp.where(hit, col, T)].set(_theta(u), mode="drop")
        steps = s.steps + active
        # stiffness (Hairer's test): accepted steps in a row at the stability boundary
        counted = accept & ~clipped  # steps shortened to land on a save time are neutral
        stiff_run = jnp.where(counted, jnp.where(p.h_rho > STIFF_H_RHO, s.stiff_run + 1, 0),
                              s.stiff_run)
        status = _status(s, p, accept, active, h, t, steps, stiff_run, new_dt, t1, gtol,
                         budget, method.hands_over)
        return Slots(u=u, xi=xi, fu=fu, fxi=fxi, mask=s.mask, t=t, dt=new_dt, steps=steps,
                     save_i=s.save_i + hit, status=status, saves=saves, gid=s.gid,
                     stiff_run=stiff_run, problem=s.problem, carry=carry)

    def finished(s):
        return jnp.sum((s.gid >= 0) & (s.status != ACTIVE))

    def cond(carry):
        it, _, s = carry
        return (it < max_iters) & jnp.any(s.status == ACTIVE) & (finished(s) < retire_at)

    def body(carry):
        it, work, s = carry
        return it + 1, work + jnp.sum(s.status == ACTIVE), step(s)

    return jax.lax.while_loop(cond, body, (jnp.asarray(0), jnp.asarray(0), slots))


@eqx.filter_jit
def _refill_states(slots: Slots, replace, u, xi, t, steps, save_i, saves, gid, depth,
                   problem_rows, shared_problem, t1, rtol, atol, method=KVAERNO5):
    """Put handed-over trajectories (slot-first states) into the slots where `replace`."""
    new = _slots_at(u, xi, t, steps, save_i, saves, gid, depth, problem_rows, shared_problem,
                    t1, rtol, atol, method)
    return _pick_slots(replace, new, slots)


# XLA's CPU compiler builds the Kvaerno5 programs faster, and they run faster, with its older
# kernels than with its fusion emitters (jaxlib 0.10.2, 4 slots, the bench problem: `advance`
# compiles in 1.8-2.0 s against 2.7-2.9 s alone, 3.0 against 4.8-5.1 s in a sweep's first
# call, and iterates in 174-178 against 261-286 us; the same bits). Tsit5's 128-slot
# iterations are 30 % slower with them: it keeps the default. jaxlib >= 0.11 has no such
# option (only its emitters): there the default programs are used (`_xla` probes it).
_OLDER_KERNELS = {"xla_cpu_use_fusion_emitters": False}
_advance_older = OptionJit(advance.__wrapped__, _OLDER_KERNELS, "cpu")
_refill_states_older = OptionJit(_refill_states.__wrapped__, _OLDER_KERNELS, "cpu")


def compiled_for(method, platform: str):
    """(`advance`, `_refill_states`) as compiled for `method` on `platform` ("cpu", "gpu",
    ...)."""
    if (platform == "cpu" and isinstance(method, Fused) and method.implicit
            and accepted_options(_OLDER_KERNELS, "cpu")):
        return _advance_older, _refill_states_older
    return advance, _refill_states
