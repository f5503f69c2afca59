"""Gradient flow on the layers (eq 2-3), solved with diffrax.

The right-hand side is reverse-mode autodiff of `loss(parameterization(layers))` with respect
to the layer pytree; the mirror coordinate xi(t) = -int_0^t grad L(theta(s)) ds is integrated
alongside (xi' = -grad L, xi(0) = 0).
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._solve import (
    diffeq,
    layer_vector_field,
    prepare_inputs,
    resolve_solver,
    stationary_signal,
    warn_if_stationary,
)
from ._trajectory import Trajectory, make_trajectory, warn_if_failed
from ._validate import check_gtol, check_times, check_tolerances, is_traced

DEFAULT_MAX_STEPS = 2**20


def log_times(t1, num: int = 200, t_min=None, t0: float = 0.0) -> Float[Array, " num"]:
    """Save times `[t0, then log-spaced from t0 + t_min to t1]`: plateaus and fast phases
    of DDLN flows span many decades of time.

    **Arguments:**

    - `t1`: final time (> t0).
    - `num`: number of save times (>= 2), t0 included.
    - `t_min`: first positive offset (default `(t1 - t0) * 1e-6`).
    """
    if num < 2:
        raise ValueError(f"`num` must be >= 2, got {num}.")
    span = t1 - t0
    if not is_traced(span) and not span > 0:
        raise ValueError(f"`t1` must be > `t0`, got t0={t0}, t1={t1}.")
    t_min = span * 1e-6 if t_min is None else t_min
    logs = jnp.logspace(jnp.log10(t_min), jnp.log10(span), num - 1)
    # 10**log10(x) + t0 may exceed t1 by a rounding unit: the last save time is t1 exactly
    return (jnp.concatenate([jnp.zeros((1,)), logs]) + t0).at[-1].set(t1)


@eqx.filter_jit
def _solve_layers(
    layers0, problem, t0, t1, ts, solver, rtol, atol, max_steps, parameterization, gtol
):
    vf = layer_vector_field(parameterization)
    y0 = (layers0, jnp.zeros_like(parameterization(layers0)))
    out = diffeq(
        vf, y0, problem, t0=t0, t1=t1, ts=ts, solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps, gtol=gtol,
    )
    traj = make_trajectory(ts, *out, layers0, problem, parameterization)
    # in the same program: a public call is one compiled program, no eager work around it
    return traj, stationary_signal(layers0, problem, parameterization)


def gradient_flow(
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
    parameterization: Callable | None = None,
    stop_when_converged=None,
) -> Trajectory:
    """Gradient flow on the layers, du^j/dt = -(prod_{k != j} u^k) ⊙ grad L(theta) (eq 2-3).

    **Arguments:**

    - `layers0`: initial layers `(depth, dim)`, depth >= 2 (or, with `parameterization`,
        any pytree that it maps to theta).
    - `problem`: a loss object (`dd.LeastSquares(X, y)`, `dd.Logistic`, ...) or any
        differentiable callable theta -> scalar.
    - `t1`, `ts`: final time and save times (strictly increasing, inside [t0, t1]).
    - `solver`: diffrax solver or name; default `Tsit5`. Use `"kvaerno5"` for large
        (stiff) initializations, `"dopri8"` for tight tolerances.
    - `rtol`, `atol`: tolerances of the `PIDController`.
    - `max_steps`: step cap; the default 2^20 is far above diffrax's 4096 (DDLN flows take
        10^3-10^5 steps).
    - `parameterization`: the map layers -> theta (default: the product, eq 1).
    - `stop_when_converged`: a gradient tolerance `gtol`; stop once ||grad L||_inf <= gtol
        (converged flows of large initializations are stiff and would otherwise cost
        T * lambda_max / 3.3 explicit steps). Later save times hold the final state and
        `traj.t_final` says when the solve stopped.

    **Returns:** a `Trajectory`. Jit- and vmap-compatible; numeric arguments are passed as
    arrays, so new values do not recompile.

    **Raises:** `ValueError`/`TypeError` on bad shapes, depth < 2, non-finite data,
    non-positive tolerances, bad `ts`. A failed solve is not an exception: `traj.ok` is False
    and (outside jit/vmap) a `RuntimeWarning` says why.
    """
    layers0, problem, parameterization = prepare_inputs(layers0, problem, parameterization)
    t0, t1, ts = check_times(t0, t1, ts)
    check_tolerances(rtol, atol, max_steps)
    gtol = check_gtol(stop_when_converged)
    traj, stationary = _solve_layers(
        layers0, problem, t0, t1, ts, resolve_solver(solver), jnp.asarray(rtol),
        jnp.asarray(atol), max_steps, parameterization, gtol,
    )
    warn_if_stationary(stationary, "gradient_flow")
    warn_if_failed(traj)
    return traj
