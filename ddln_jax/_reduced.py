"""The flow under Assumption (A) in fewer variables (Section 2.1, docs/maths.md): the mirror
flow in theta (d variables) and the flow of v^1 (eq 6), all layers rebuilt by the conservation
law (the reduced-variable maths lives in `_network.py`).
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._flow import DEFAULT_MAX_STEPS, gradient_flow
from ._loss import as_problem
from ._network import (
    check_assumption_a,
    layers_from_v1,
    metric_from_w,
    reduced_gap,
    reduced_init,
    theta_from_v1,
    v1_from_theta,
    w_from_theta,
)
from ._solve import check_problem_dim, diffeq, resolve_solver
from ._trajectory import Trajectory, make_trajectory, warn_if_failed, warn_if_unreached
from ._validate import check_gtol, check_layers, check_times, check_tolerances, is_traced


def _require_a(layers0, what):
    if is_traced(layers0):
        ok = check_assumption_a(layers0)
        return eqx.error_if(layers0, ~jnp.all(ok), f"{what} needs Assumption (A).")
    try:
        check_assumption_a(layers0, strict=True)
    except ValueError as e:
        raise ValueError(f"{what} needs Assumption (A). {e}") from None
    return layers0


def _mirror_field(t, y, args):
    theta, _ = y
    problem, red = args
    g = jax.grad(problem.loss)(theta)
    m = metric_from_w(w_from_theta(theta, red.deltas), red.deltas)
    return -m * g, -g


def _reduced_field(t, y, args):
    v1, _ = y
    problem, red = args
    g = jax.grad(problem.loss)(theta_from_v1(v1, red))
    return -red.s * jnp.prod(jnp.sqrt(v1**2 + red.deltas), axis=0) * g, -g


@eqx.filter_jit
def _solve_reduced(layers0, problem, t0, t1, ts, solver, rtol, atol, max_steps, mirror,
                   gtol):
    red = reduced_init(layers0)
    if mirror:
        field, y0 = _mirror_field, (theta_from_v1(red.a, red), jnp.zeros_like(red.a))
    else:
        field, y0 = _reduced_field, (red.a, jnp.zeros_like(red.a))
    (state, xi), result, num_steps, ok, t_final = diffeq(
        field, y0, (problem, red), t0=t0, t1=t1, ts=ts, solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps, gtol=gtol,
    )
    if mirror:
        theta = state
        v1 = jax.vmap(lambda th: v1_from_theta(th, red))(theta)
    else:
        v1 = state
        theta = jax.vmap(lambda v: theta_from_v1(v, red))(v1)
    layers = jax.vmap(lambda v: layers_from_v1(v, red))(v1)
    return make_trajectory(ts, (layers, xi), result, num_steps, ok, t_final, layers0, problem,
                           theta=theta)


def _prepare(layers0, problem, t0, t1, ts, rtol, atol, max_steps, what):
    problem = as_problem(problem)
    layers0 = check_layers(layers0)
    check_problem_dim(problem, layers0.shape[1])
    layers0 = _require_a(layers0, what)
    t0, t1, ts = check_times(t0, t1, ts)
    check_tolerances(rtol, atol, max_steps)
    return layers0, problem, t0, t1, ts


def mirror_flow(
    layers0: Float[Array, "depth dim"],
    problem,
    *,
    t1,
    ts,
    t0=0.0,
    solver=None,
    rtol=1e-8,
    atol=1e-10,
    max_steps: int = DEFAULT_MAX_STEPS,
    stop_when_converged=None,
) -> Trajectory:
    """The flow in theta-space, theta' = -M(theta) grad L(theta) (eq 10-11).

    Under (A), M_ii = sum_j prod_{k != j} (u^k_i)^2 depends on theta_i and the
    initialization alone: w = v1^2 solves w prod_{j>=2}(w + Delta_j) = theta^2 (see
    `w_from_theta`). The layers are rebuilt from theta. Arguments (`stop_when_converged`
    included) and result as `gradient_flow`.

    **Raises:** `ValueError` if `layers0` violates Assumption (A).
    """
    layers0, problem, t0, t1, ts = _prepare(
        layers0, problem, t0, t1, ts, rtol, atol, max_steps, "`mirror_flow`"
    )
    traj = _solve_reduced(
        layers0, problem, t0, t1, ts, resolve_solver(solver), jnp.asarray(rtol),
        jnp.asarray(atol), max_steps, True, check_gtol(stop_when_converged),
    )
    warn_if_failed(traj, "mirror_flow", rtol=rtol)
    warn_if_unreached(traj, check_gtol(stop_when_converged), "mirror_flow")
    return traj


def reduced_flow(
    layers0: Float[Array, "depth dim"],
    problem,
    *,
    t1,
    ts,
    t0=0.0,
    solver=None,
    rtol=1e-8,
    atol=1e-10,
    max_steps: int = DEFAULT_MAX_STEPS,
    stop_when_converged=None,
    gap_tol: float = 1e-4,
) -> Trajectory:
    """The d-dimensional flow of v^1 (eq 6), all layers rebuilt by the conservation law.

    dv1/dt = -s prod_{j>=2} sqrt(v1^2 + Delta_j) grad L(theta(v1)). When two layers start
    almost equal in |u_i(0)| (relative gap `reduced_gap(layers0) < gap_tol`) the square roots
    have a kink of width sqrt(Delta) where v1 crosses zero and the reduced ODE is nearly
    singular; then the full `gradient_flow` is solved instead, with a warning (outside of
    jit/vmap; under a trace no fall-back is possible and the reduced ODE is solved). Other
    arguments (`stop_when_converged` included) and result as `gradient_flow`.

    **Raises:** `ValueError` if `layers0` violates Assumption (A).
    """
    layers0, problem, t0, t1, ts = _prepare(
        layers0, problem, t0, t1, ts, rtol, atol, max_steps, "`reduced_flow`"
    )
    if not is_traced(layers0):
        gap = float(reduced_gap(layers0))
        if gap < gap_tol:
            warnings.warn(
                f"reduced_flow: two layers start almost equal in |u_i(0)| (relative gap "
                f"{gap:.2e} < gap_tol={gap_tol:g}); the reduced ODE is nearly singular, so the "
                "full layer flow (`gradient_flow`) is solved instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            return gradient_flow(
                layers0, problem, t1=t1, ts=ts, t0=t0, solver=solver, rtol=rtol, atol=atol,
                max_steps=max_steps, stop_when_converged=stop_when_converged,
            )
    traj = _solve_reduced(
        layers0, problem, t0, t1, ts, resolve_solver(solver), jnp.asarray(rtol),
        jnp.asarray(atol), max_steps, False, check_gtol(stop_when_converged),
    )
    warn_if_failed(traj, "reduced_flow", rtol=rtol)
    warn_if_unreached(traj, check_gtol(stop_when_converged), "reduced_flow")
    return traj
