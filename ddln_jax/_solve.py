"""The diffrax wrapper shared by every flow: the solver table, the initial step, the layer
vector field (eq 2-3) and `diffeq`, a `diffeqsolve` with the library's defaults.
"""

import warnings
from collections.abc import Callable

import diffrax as dfx
import jax
import jax.numpy as jnp

from ._loss import FunctionLoss, as_problem, scaled_gradient
from ._network import theta as product_theta
from ._trajectory import RESULTS, result_code
from ._validate import as_float_array, check_finite, check_layers, is_traced

_SOLVERS = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "kvaerno5": dfx.Kvaerno5,
}


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


def initial_step(vector_field, t0, y0, args, rtol, atol, span, norm=None):
    """A first step from the size of the right-hand side (the first half of Hairer's
    heuristic): diffrax's automatic `dt0` also takes a trial step, which on deep random
    problems lands far outside the stability region and is rejected repeatedly."""
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
    stop_on=None,
    stop_when=None,
):
    """`diffrax.diffeqsolve` with the library's defaults: adaptive PID step sizes, our own
    `dt0`, save at `ts`, `throw=False` (failures are result codes, per trajectory).

    With `gtol`, the solve stops once ||xi'||_inf = ||grad L||_inf <= gtol (a steady state;
    xi' is the last component of the state) — or, with `stop_on`, once every leaf of
    `stop_on(derivative)` is <= gtol in absolute value — and the save times after the stop
    are filled with the final state. `stop_when(t, y, args) -> bool` is one more stop of
    the same kind (e.g. the loss reached). Returns `(ys, result, num_steps, ok, t_final)`.
    """
    if controller is None:
        controller = dfx.PIDController(rtol=rtol, atol=atol)
    dt0 = initial_step(vector_field, t0, y0, args, rtol, atol, t1 - t0, controller.norm)
    event = None
    if gtol is not None:

        watched = (lambda f: f[-1]) if stop_on is None else stop_on

        def cond_fn(t, y, args, **kwargs):
            leaves = jax.tree_util.tree_leaves(watched(vector_field(t, y, args)))
            return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves])) <= gtol

        event = dfx.Event(cond_fn if stop_when is None else (cond_fn, stop_when))
    elif stop_when is not None:
        event = dfx.Event(stop_when)
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
    return ys, result_code(sol.result), sol.stats["num_steps"], ok, t_final


def layer_vector_field(parameterization: Callable):
    """du/dt = -grad_u L(G(u)) and xi' = -grad L(G(u)), by autodiff through G."""

    def vector_field(t, y, problem):
        layers, _ = y
        th, pullback = jax.vjp(parameterization, layers)
        g = jax.grad(problem.loss)(th)
        (du,) = pullback(g)
        return jax.tree_util.tree_map(jnp.negative, du), -g

    return vector_field


def log_time_vector_field(parameterization: Callable):
    """The layer flow in log time tau = log(1 + t): dy/dtau = (1 + t) dy/dt = e^tau dy/dt,
    with e^tau grad L computed as exp(tau + log L) grad log L where the loss has a
    `log_loss` (no overflow of e^tau, no underflow of L: tau ~ log(1/L) ~ 10^4 is fine)."""

    def vector_field(tau, y, problem):
        layers, _ = y
        th, pullback = jax.vjp(parameterization, layers)
        g = scaled_gradient(problem, th, tau)
        (du,) = pullback(g)
        return jax.tree_util.tree_map(jnp.negative, du), -g

    return vector_field


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
        layers0 = jax.tree_util.tree_map(
            lambda x: check_finite("layers0", as_float_array("layers0", x)), layers0)
    if isinstance(problem, FunctionLoss):
        check_scalar_loss(problem, jax.eval_shape(parameterization, layers0))
    return layers0, problem, parameterization


def check_scalar_loss(problem, theta) -> None:
    """A callable problem maps theta (an array or its `ShapeDtypeStruct`) to a scalar
    (checked by tracing: nothing runs)."""
    out = jax.eval_shape(problem.loss, theta)
    shape = getattr(out, "shape", None)
    if shape != ():
        got = f"shape {shape}" if shape is not None else type(out).__name__
        raise TypeError(f"`problem` must return a scalar loss L(theta), got {got} for theta of "
                        f"shape {tuple(theta.shape)}: reduce it (e.g. with `jnp.sum`).")



def dense_solution(vector_field, y0, args, t0, t1, rtol, atol, max_steps: int = 2**16):
    """A `diffrax.Solution` with dense output on [t0, t1] (Dopri8, for root refinement)."""
    return dfx.diffeqsolve(
        dfx.ODETerm(vector_field), dfx.Dopri8(), t0=t0, t1=t1, dt0=None, y0=y0, args=args,
        saveat=dfx.SaveAt(dense=True),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
    )


def first_nonfinite(ts, theta, loss, result, ok, t_final):
    """A run whose saved state or loss is non-finite has diverged, whatever the solver said:
    `(result, ok, t_final)` with `RESULTS.diverged` and `t_final` the first save time at
    which the non-finite value was seen."""
    bad = ~jnp.isfinite(loss) | jnp.any(~jnp.isfinite(theta.reshape(theta.shape[0], -1)), -1)
    any_bad = jnp.any(bad)
    first = jnp.argmax(bad)
    result = jnp.where(any_bad & ok, result_code(RESULTS.diverged), result)
    t_final = jnp.where(any_bad & ok, ts[first], t_final)
    return result, ok & ~any_bad, t_final


def stationary_signal(layers0, problem, parameterization):
    """`(max |du/dt|, max |grad L|)` at `layers0` (traceable): the flow cannot move from
    `layers0` when the first is 0 while the second is not (a saddle, e.g. two zero layers in
    a coordinate, or an all-zero initialization). Computed inside the solve's program, so the
    check costs no eager work; `warn_if_stationary` reads it afterwards."""
    field = layer_vector_field(parameterization)
    th0 = parameterization(layers0)
    du, g = field(0.0, (layers0, jnp.zeros_like(th0)), problem)
    du_max = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(du)]))
    return du_max, jnp.max(jnp.abs(g))


def warn_if_stationary(signal, what: str) -> None:
    """Outside of jit: warn when `stationary_signal` says the flow cannot move from
    `layers0` (zero gradient with respect to the layers while grad L(theta0) is not zero)."""
    du_max, g_max = signal
    if is_traced(du_max):
        return
    if float(du_max) == 0.0 and float(g_max) > 0.0:
        warnings.warn(
            f"{what}: `layers0` is a stationary point (the gradient with respect to the layers "
            "is exactly 0 while grad L(theta0) is not): the flow stays at this saddle forever. "
            "Start from an initialization with at most one zero layer per coordinate "
            "(e.g. `dd.init_gaussian`, `dd.init_zero_first`).",
            RuntimeWarning,
            stacklevel=3,
        )
