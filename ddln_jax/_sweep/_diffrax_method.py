"""The sweep's diffrax method: every slot step is the solver's own `solver.step` and
`diffrax.PIDController.adapt_step_size`, `jax.vmap`ped over the slots of `_advance`'s loop.

The state of a slot is `y = (u, xi)`, layers `(Lmax, d)` padded with frozen unit layers
and xi `(d,)`; its vector field is the sweep's (`_fused._batched_rhs`, zero on the padded
layers) and the controller's norm is the RMS over the real layers and xi (`_fused._norm`),
so a padded trajectory takes the steps of an unpadded one. The solver's state (e.g. the
first-same-as-last derivative) and the controller's state are the method's carry, per slot.
No stiffness hand-over: the user chose the solver (an implicit one runs with diffrax's own
Newton solver throughout).
"""

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._solve import resolve_solver
from ._advance import Step
from ._fused import _batched_rhs, _norm
from ._slots import Slots


def diffrax_method(solver) -> "DiffraxMethod":
    """The diffrax method of `solver` (a name of `_solve.resolve_solver` or an adaptive
    diffrax ODE solver instance). Raises `ValueError`/`TypeError` naming `solver`."""
    solver = resolve_solver(solver)
    if not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise ValueError(f"`solver` must be an adaptive diffrax solver (one with an error "
                         f"estimate), got {type(solver).__name__}.")
    if solver.term_structure is not dfx.AbstractTerm:
        raise ValueError(f"`solver` must be a diffrax ODE solver (one term), got "
                         f"{type(solver).__name__}.")
    return DiffraxMethod(solver)


# The marker `diffeqsolve` looks for in a root finder's `rtol`/`atol`/`norm` (to fill them
# from the step size controller), taken from diffrax's public wrapper that sets it
_USE_STEPSIZE_TOL = dfx.with_stepsize_controller_tols(optx.Chord)().rtol


def _vector_field(t, y, args):
    """The sweep's layer vector field (`_fused._batched_rhs`) of one slot."""
    problem, mask = args
    u, xi = y
    fu, fxi = _batched_rhs(u[..., None], mask[..., None], problem, False)
    return fu[..., 0], fxi[..., 0]


_TERMS = dfx.ODETerm(_vector_field)


def _controller(rtol, atol, mask):
    """diffrax's PID controller (its defaults) whose norm is the RMS over one slot's real
    layers (`mask (Lmax, 1)`) and xi. A NaN norm counts as infinite: the step is rejected
    and shrunk (diffrax turns NaN errors to inf, but inf / inf in its scaling is NaN)."""
    def norm(error):
        eu, exi = error
        real = (jnp.sum(mask) + 1) * eu.shape[1]
        # padded layers have no error (and inf x 0 in the masked sum would be NaN)
        eu = jnp.where(mask > 0, eu, 0.0)
        err = _norm(eu[..., None], exi[..., None], mask[..., None], real)[0]
        return jnp.where(jnp.isnan(err), jnp.inf, err)

    return dfx.PIDController(rtol=rtol, atol=atol, norm=norm)


def _with_controller_tols(solver, controller):
    """As `diffeqsolve`: an implicit solver's root finder takes the tolerances and norm it
    leaves to the step size controller (`diffrax.with_stepsize_controller_tols`)."""
    if not isinstance(solver, dfx.AbstractImplicitSolver):
        return solver
    names = [a for a in ("rtol", "atol", "norm")
             if getattr(solver.root_finder, a) is _USE_STEPSIZE_TOL]
    return eqx.tree_at(lambda s: tuple(getattr(s.root_finder, a) for a in names), solver,
                       tuple(getattr(controller, a) for a in names))


class DiffraxMethod(eqx.Module):
    """A diffrax solver stepping every slot (see the module docstring). Carry per slot:
    `(solver_state, controller_state)`, slot axis last."""

    solver: dfx.AbstractAdaptiveSolver
    hands_over: ClassVar[bool] = False

    def init(self, s: Slots, problem, batched, rtol, atol):
        solver = self.solver

        def one(u, xi, mask, t, dt, problem):
            y0, args = (u, xi), (problem, mask)
            state = solver.init(_TERMS, t, t + dt, y0, args)
            _, control = _controller(rtol, atol, mask).init(
                _TERMS, t, t + dt, y0, dt, args, solver.func, solver.error_order(_TERMS))
            return state, jtu.tree_map(jnp.asarray, control)

        return jax.vmap(one, in_axes=(-1, -1, -1, 0, 0, 0 if batched else None),
                        out_axes=-1)(s.u, s.xi, s.mask, s.t, s.dt, problem)

    def step(self, s: Slots, h, t_new, problem, batched, rtol, atol, need_grad) -> Step:
        solver = self.solver

        def one(u, xi, mask, t0, t1, carry, problem):
            y0, args = (u, xi), (problem, mask)
            state, control = carry
            controller = _controller(rtol, atol, mask)
            y1, y_error, _, state1, _ = _with_controller_tols(solver, controller).step(
                _TERMS, t0, t1, y0, args, state, False)
            # as `diffeqsolve`: a NaN error (the vector field undefined there) is infinite
            y_error = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_error)
            keep, next_t0, next_t1, _, control, _ = controller.adapt_step_size(
                t0, t1, y0, y1, args, y_error, solver.error_order(_TERMS), control)
            state = jtu.tree_map(lambda a, b: jnp.where(keep, a, b), state1, state)
            finite = jnp.isfinite(jnp.sum(y1[0]) + jnp.sum(y1[1]))
            return y1, keep, next_t1 - next_t0, finite, (state, control)

        (u1, xi1), keep, dt, finite, carry = jax.vmap(
            one, in_axes=(-1, -1, -1, 0, 0, -1, 0 if batched else None), out_axes=-1)(
            s.u, s.xi, s.mask, s.t, t_new, s.carry, problem)
        # -grad L at the candidate, for the steady-state test (the layer part is dead code)
        fxi = _batched_rhs(u1, s.mask, problem, batched)[1] if need_grad else s.fxi
        return Step(u=u1, xi=xi1, fu=s.fu, fxi=fxi, keep=keep, dt=dt, finite=finite,
                    h_rho=jnp.zeros_like(h), carry=carry)
