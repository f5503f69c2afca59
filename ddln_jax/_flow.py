"""Gradient flow on the layers (eq 2-3), solved with diffrax.

The right-hand side is reverse-mode autodiff of `loss(parameterization(layers))` with respect
to the layer pytree; the mirror coordinate xi(t) = -int_0^t grad L(theta(s)) ds is integrated
alongside (xi' = -grad L, xi(0) = 0).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._network import theta as product_theta
from ._solve import (
    diffeq,
    layer_vector_field,
    log_time_vector_field,
    prepare_inputs,
    resolve_solver,
    stationary_signal,
    warn_if_stationary,
)
from ._structured import structured_kvaerno5
from ._trajectory import (
    RESULTS,
    Trajectory,
    make_trajectory,
    result_code,
    warn_if_failed,
    warn_if_unreached,
)
from ._validate import check_gtol, check_positive, check_times, check_tolerances, is_traced

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
    layers0, problem, t0, t1, ts, solver, rtol, atol, max_steps, parameterization, gtol,
    log_stop=None, log_time=False,
):
    vf = (log_time_vector_field if log_time else layer_vector_field)(parameterization)
    y0 = (layers0, jnp.zeros_like(parameterization(layers0)))
    stop_when = None
    if log_stop is not None:

        def stop_when(t, y, args, **kwargs):
            return _log_loss(args, parameterization(y[0])) <= log_stop

    ys, result, num_steps, ok, t_final = diffeq(
        vf, y0, problem, t0=t0, t1=t1, ts=ts, solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps, gtol=gtol, stop_when=stop_when,
    )
    if log_stop is not None:
        # the loss stop was asked for: reaching t1 above it is not a success
        last = jax.tree_util.tree_map(lambda y: y[-1], ys[0])
        missed = ok & (_log_loss(problem, parameterization(last)) > log_stop)
        result = jnp.where(missed, result_code(RESULTS.stop_not_reached), result)
        ok = ok & ~missed
    traj = make_trajectory(ts, ys, result, num_steps, ok, t_final, layers0, problem,
                           parameterization)
    # in the same program: a public call is one compiled program, no eager work around it
    return traj, stationary_signal(layers0, problem, parameterization)


def _log_loss(problem, th):
    log_loss = getattr(problem, "log_loss", None)
    return log_loss(th) if log_loss is not None else jnp.log(problem.loss(th))


def _check_stop_at_loss(stop_at_loss):
    if stop_at_loss is None:
        return None
    check_positive("stop_at_loss", stop_at_loss)
    return jnp.log(jnp.asarray(stop_at_loss, dtype=jnp.result_type(float)))


def _check_time(time):
    if time not in ("linear", "log"):
        raise ValueError(f"`time` must be 'linear' or 'log', got {time!r}.")
    return time == "log"


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
    stop_at_loss=None,
    time: str = "linear",
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
        `traj.t_final` says when the solve stopped. This is a steady-state stop, *not* a
        stop on the loss reached: for a classification loss the gradient tends to 0 with
        the loss (use `stop_at_loss`).
    - `stop_at_loss`: a loss level eps > 0; stop once L(theta) <= eps (compared as
        log L <= log eps, with the losses' stable `log_loss` where they have one). The
        stop for losses that only tend to 0 (`dd.Logistic`, `dd.Exponential` on separable
        data). A run that reaches `t1` above eps has `ok = False` and result
        `dd.Result.stop_not_reached`; a run that met it has `event_occurred`.
    - `time`: `"linear"` (default) or `"log"`. With `"log"` the solver's variable is
        tau = log(1 + t): `t0`, `t1`, `ts` (and `traj.ts`, `traj.t_final`) are values of
        tau, and e^tau grad L is computed without overflow or underflow. Long
        classification flows need it: the loss ~ 1/t, so a loss of 1e-300 is t ~ 1e300
        (tau ~ 690) and tau = 10^4 reaches losses of ~e^{-10^4}, which `traj.loss`
        stores as 0 (use `dd.margin_along(traj, ...).log_loss`).

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
    log_stop, log_time = _check_stop_at_loss(stop_at_loss), _check_time(time)
    traj, stationary = _solve_layers(
        layers0, problem, t0, t1, ts,
        # (the structured Newton solve is the linear-time field's)
        resolve_solver(solver) if log_time else structured_kvaerno5(
            resolve_solver(solver), parameterization, product_theta),
        jnp.asarray(rtol), jnp.asarray(atol), max_steps, parameterization, gtol, log_stop,
        log_time,
    )
    warn_if_stationary(stationary, "gradient_flow")
    warn_if_failed(traj, hint=None if log_stop is None else (
        "A run that ended above `stop_at_loss` needs a larger `t1` (with `time='log'`, t1 "
        "is log(1 + t): t1 = 700 is t ~ 1e304); otherwise increase `max_steps` or use "
        "`solver='kvaerno5'`."), rtol=rtol)
    warn_if_unreached(traj, gtol)
    return traj
