"""Gradient flow on the layers (eq 2-3), solved with diffrax, and the `Trajectory` result.

The right-hand side is reverse-mode autodiff of `loss(parameterization(layers))` with respect
to the layer pytree; the mirror coordinate xi(t) = -int_0^t grad L(theta(s)) ds is integrated
alongside (xi' = -grad L, xi(0) = 0).
"""

import warnings
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._loss import as_problem
from ._network import theta as product_theta
from ._validate import as_float_array, check_finite, check_layers, check_positive, is_traced

DEFAULT_MAX_STEPS = 2**20
# Result code of a discrete run (`dd.train`) stopped because its loss blew up; diffrax's own
# codes are small integers.
DIVERGED = 100

_SOLVERS = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "kvaerno5": dfx.Kvaerno5,
}


class Trajectory(eqx.Module):
    """A solved flow, saved at `ts`. Every flow of the library returns this type.

    **Fields:**

    - `ts`: save times `(T,)`.
    - `layers`: layers at `ts`, `(T, depth, dim)` (or the parameterization's pytree).
    - `theta`: effective parameter at `ts`, `(T, dim)`.
    - `xi`: mirror coordinate xi(t) = -int_0^t grad L, `(T, dim)`.
    - `loss`: L(theta(t)), `(T,)`.
    - `layers0`: the initial layers.
    - `result`: diffrax result code (int; 0 = successful). See `result_message`.
    - `num_steps`: accepted + rejected solver steps.
    - `ok`: True when the solve reached `t1` (or a requested steady-state stop) successfully.
    - `t_final`: where the solve ended: `t1`, or the time of a steady-state stop; saved
        values at `ts > t_final` hold the final state.

    Under `jax.vmap` every field gains a leading batch axis, so failures are reported per
    trajectory.
    """

    ts: Float[Array, " T"]
    layers: PyTree
    theta: Float[Array, "T dim"]
    xi: Float[Array, "T dim"]
    loss: Float[Array, " T"]
    layers0: PyTree
    result: Int[Array, ""]
    num_steps: Int[Array, ""]
    ok: Bool[Array, ""]
    t_final: Float[Array, ""]


def result_message(code) -> str:
    """The diffrax message behind a result code of `Trajectory.result`."""
    code = int(code)
    if code == DIVERGED:
        return "diverged: the loss became non-finite or exceeded `blowup` times its start"
    for name, item in dfx.RESULTS._name_to_item.items():
        if int(item._value) == code:
            msg = dfx.RESULTS[item]
            return name if not msg else f"{name}: {msg}"
    return f"unknown result code {code}"


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
    return jnp.concatenate([jnp.zeros((1,)), logs]) + t0


def resolve_solver(solver):
    """`None` -> Tsit5; a name in {"tsit5", "dopri5", "dopri8", "kvaerno5"}; or any diffrax
    solver instance."""
    if solver is None:
        return dfx.Tsit5()
    if isinstance(solver, str):
        try:
            return _SOLVERS[solver.lower()]()
        except KeyError:
            raise ValueError(
                f"`solver` must be one of {sorted(_SOLVERS)} or a diffrax solver, got {solver!r}."
            ) from None
    if isinstance(solver, dfx.AbstractSolver):
        return solver
    raise TypeError(f"`solver` must be a diffrax solver or a name, got {type(solver).__name__}.")


def check_times(t0, t1, ts):
    """Static checks of t0 < t1 and of increasing save times inside [t0, t1]."""
    t0 = as_float_array("t0", t0)
    t1 = as_float_array("t1", t1)
    ts = as_float_array("ts", ts)
    if t0.ndim != 0 or t1.ndim != 0:
        raise ValueError("`t0` and `t1` must be scalars.")
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"`ts` must be a 1-D array of save times, got shape {tuple(ts.shape)}.")
    if not any(is_traced(x) for x in (t0, t1, ts)):
        t0n, t1n, tsn = float(t0), float(t1), np.asarray(ts)
        if not np.isfinite(t0n) or not np.isfinite(t1n) or not t1n > t0n:
            raise ValueError(f"`t1` must be finite and > `t0`, got t0={t0n}, t1={t1n}.")
        if not np.all(np.isfinite(tsn)):
            raise ValueError("`ts` contains NaN or Inf.")
        if np.any(np.diff(tsn) <= 0):
            raise ValueError("`ts` must be strictly increasing.")
        if tsn[0] < t0n or tsn[-1] > t1n:
            raise ValueError(
                f"`ts` must lie in [t0, t1] = [{t0n}, {t1n}], got [{tsn[0]}, {tsn[-1]}]."
            )
    else:
        bad = (ts[0] < t0) | (ts[-1] > t1) | jnp.any(jnp.diff(ts) <= 0) | ~(t1 > t0)
        ts = eqx.error_if(ts, bad, "`ts` must be strictly increasing and inside [t0, t1].")
    return t0, t1, ts


def initial_step(vector_field, t0, y0, args, rtol, atol, span, norm=None):
    """A first step from the size of the right-hand side (Hairer's heuristic, first half):
    diffrax's automatic `dt0` was seen rejecting every Tsit5 step on random deep problems."""
    f0 = vector_field(t0, y0, args)
    norm = _rms if norm is None else norm
    scale = jax.tree_util.tree_map(lambda y: atol + rtol * jnp.abs(y), y0)
    d0 = norm(jax.tree_util.tree_map(jnp.divide, y0, scale))
    d1 = norm(jax.tree_util.tree_map(jnp.divide, f0, scale))
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-300))
    return jnp.clip(h0, span * 1e-12, span * 0.1)


def _rms(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    total = sum(jnp.sum(x**2) for x in leaves)
    return jnp.sqrt(total / sum(x.size for x in leaves))


def diffeq(
    vector_field,
    y0,
    args,
    *,
    t0,
    t1,
    ts,
    solver,
    rtol,
    atol,
    max_steps: int,
    gtol=None,
    controller=None,
):
    """`diffrax.diffeqsolve` with the library's defaults: adaptive PID step sizes, our own
    `dt0`, save at `ts`, `throw=False` (failures are result codes, per trajectory).

    With `gtol`, the solve stops once ||xi'||_inf = ||grad L||_inf <= gtol (a steady state),
    and the save times after the stop are filled with the final state.
    Returns `(ys, result, num_steps, t_final)`.
    """
    if controller is None:
        controller = dfx.PIDController(rtol=rtol, atol=atol)
    dt0 = initial_step(vector_field, t0, y0, args, rtol, atol, t1 - t0, controller.norm)
    event = None
    if gtol is not None:

        def cond_fn(t, y, args, **kwargs):
            return jnp.max(jnp.abs(vector_field(t, y, args)[1])) <= gtol

        event = dfx.Event(cond_fn)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        solver,
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=dfx.SaveAt(ts=ts, t1=True),
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
        event=event,
    )
    # After an event diffrax saves the final state in the slot after the last reached save
    # time and leaves inf behind it; on success the last slot holds t1.
    last = jnp.sum(jnp.isfinite(sol.ts)) - 1
    t_final = jnp.where(last >= 0, sol.ts[jnp.maximum(last, 0)], t0)
    # only a steady-state stop fills later saves; a failed solve keeps diffrax's inf there
    after = (ts > t_final) & (sol.result == dfx.RESULTS.event_occurred)

    def fill(y):
        mask = after.reshape((-1,) + (1,) * (y.ndim - 1))
        return jnp.where(mask, y[jnp.maximum(last, 0)][None], y[:-1])

    ys = jax.tree_util.tree_map(fill, sol.ys)
    ok = (sol.result == dfx.RESULTS.successful) | (sol.result == dfx.RESULTS.event_occurred)
    return ys, sol.result._value, sol.stats["num_steps"], ok, t_final


def layer_vector_field(parameterization: Callable):
    """du/dt = -grad_u L(G(u)) and xi' = -grad L(G(u)), by autodiff through G."""

    def vector_field(t, y, problem):
        layers, _ = y
        th, pullback = jax.vjp(parameterization, layers)
        g = jax.grad(problem.loss)(th)
        (du,) = pullback(g)
        return jax.tree_util.tree_map(jnp.negative, du), -g

    return vector_field


def make_trajectory(ts, ys, result, num_steps, ok, t_final, layers0, problem, parameterization):
    layers_ts, xi_ts = ys
    theta_ts = jax.vmap(parameterization)(layers_ts)
    return Trajectory(
        ts=ts,
        layers=layers_ts,
        theta=theta_ts,
        xi=xi_ts,
        loss=jax.vmap(problem.loss)(theta_ts),
        layers0=layers0,
        result=result,
        num_steps=num_steps,
        ok=ok,
        t_final=t_final,
    )


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
    return make_trajectory(ts, *out, layers0, problem, parameterization)


def warn_if_failed(traj: Trajectory, what: str = "gradient_flow", hint: str | None = None) -> None:
    """Outside of jit/vmap: warn, with the reason and the fix, when a solve failed."""
    if is_traced(traj.ok):
        return
    ok = np.asarray(traj.ok)
    if ok.all():
        return
    codes = np.asarray(traj.result).reshape(-1)[~ok.reshape(-1)]
    reasons = sorted({result_message(c) for c in codes})
    hint = hint or (
        "Increase `max_steps`, shorten `t1`, or use `solver='kvaerno5'` for stiff (large) "
        "initializations."
    )
    warnings.warn(
        f"{what}: {int((~ok).sum())} trajectory(ies) failed ({'; '.join(reasons)}). "
        f"Their values after the failure time are not valid. {hint}",
        RuntimeWarning,
        stacklevel=3,
    )


def check_tolerances(rtol, atol, max_steps):
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise TypeError(f"`max_steps` must be an int, got {max_steps!r}.")
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}.")


def _gtol(stop_when_converged):
    if stop_when_converged is None or stop_when_converged is False:
        return None
    check_positive("stop_when_converged", stop_when_converged)
    return jnp.asarray(stop_when_converged, dtype=float)


def check_problem_dim(problem, dim):
    pdim = getattr(problem, "dim", None)
    if pdim is not None and pdim != dim:
        raise ValueError(
            f"`layers0` has dim {dim} but the problem's `X` has {pdim} columns: they must match."
        )


def prepare_inputs(layers0, problem, parameterization):
    """Shared checks of the flows and of `train`: the problem as a loss object; with the
    product parameterization (default) `(depth, dim)` layers matching the problem's dim,
    otherwise any finite pytree."""
    problem = as_problem(problem)
    if parameterization is None:
        parameterization = product_theta
        layers0 = check_layers(layers0)
        check_problem_dim(problem, layers0.shape[1])
    else:
        layers0 = jax.tree_util.tree_map(lambda x: check_finite("layers0", jnp.asarray(x)), layers0)
    return layers0, problem, parameterization


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
    gtol = _gtol(stop_when_converged)
    traj = _solve_layers(
        layers0, problem, t0, t1, ts, resolve_solver(solver), jnp.asarray(rtol),
        jnp.asarray(atol), max_steps, parameterization, gtol,
    )
    warn_if_failed(traj)
    return traj
