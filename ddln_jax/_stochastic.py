"""Continuous models of SGD and of momentum on the layers, solved with diffrax.

- Stochastic gradient flow (Pesme et al. 2021): the Itô SDE
  du = -grad_u L(u) dt + sqrt(eta) Sigma(u)^{1/2} dW, with Sigma the covariance of the
  minibatch gradient of `dd.train(..., batch_size=b)` (b rows drawn without replacement,
  rescaled by n/b). With g_i = grad_theta l_i(theta) the per-row gradients, G = [g_1 .. g_n]
  and P = I - 1 1^T / n,
      Cov_B = c G P G^T,   c = (n / b) (n - b) / (n - 1),
  so B = sqrt(eta c) J_u^T G P (an n-column factor, B B^T = eta Sigma_u) drives an
  n-dimensional Brownian motion: no matrix square root is formed. b = n gives no noise.
- Momentum gradient flow (heavy ball in continuous time, Papazov et al. 2024):
  u'' + gamma u' = -grad_u L(u). As gamma -> oo, u(t) -> u_GF(t / gamma).
"""

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._flow import DEFAULT_MAX_STEPS
from ._loss import check_batch_size, num_rows, row_problem
from ._network import theta as product_theta
from ._solve import diffeq, first_nonfinite, layer_vector_field, prepare_inputs, resolve_solver
from ._trajectory import (
    Trajectory,
    make_trajectory,
    result_code,
    warn_if_failed,
    warn_if_unreached,
)
from ._validate import (
    as_float_array,
    check_finite,
    check_gtol,
    check_positive,
    check_times,
    check_tolerances,
    is_traced,
)


def row_gradients(problem, th: Float[Array, " dim"]) -> Float[Array, "n dim"]:
    """Per-row gradients grad_theta l_i(theta) of a row-sum loss (least squares, logistic...)."""
    n = problem.X.shape[0]

    def row_loss(i):
        return row_problem(problem, jnp.array([i]), 1.0)

    return jax.vmap(lambda i: jax.grad(row_loss(i))(th))(jnp.arange(n))


def noise_factor(layers, problem, eta, batch_size: int, parameterization=None):
    """B with B B^T = eta * Cov(minibatch gradient w.r.t. the layers), columns indexed by
    the n rows: returns `(B_layers, B_theta)` with trailing axis n. See the module docstring."""
    parameterization = product_theta if parameterization is None else parameterization
    n = problem.X.shape[0]
    th, pullback = jax.vjp(parameterization, layers)
    G = row_gradients(problem, th)
    c = (n / batch_size) * (n - batch_size) / max(n - 1, 1)
    Bt = jnp.sqrt(eta * c) * (G - G.mean(axis=0)).T  # G^T P, (dim, n)
    Bu = jax.vmap(lambda col: pullback(col)[0], in_axes=1, out_axes=-1)(Bt)
    return Bu, Bt


@eqx.filter_jit
def _solve_sde(layers0, problem, eta, key, t0, t1, ts, dt, solver, batch_size, max_steps,
               parameterization):
    n = problem.X.shape[0]
    drift = layer_vector_field(parameterization)

    def diffusion(t, y, args):
        Bu, Bt = noise_factor(y[0], problem, eta, batch_size, parameterization)
        factor = (jax.tree_util.tree_map(jnp.negative, Bu), -Bt)
        return lx.PyTreeLinearOperator(factor, jax.eval_shape(lambda: y))

    bm = dfx.VirtualBrownianTree(t0, t1, tol=dt / 4, shape=(n,), key=key)
    terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))
    y0 = (layers0, jnp.zeros_like(parameterization(layers0)))
    sol = dfx.diffeqsolve(
        terms, solver, t0=t0, t1=t1, dt0=dt, y0=y0, args=problem, saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.ConstantStepSize(), max_steps=max_steps, throw=False,
    )
    traj = make_trajectory(ts, sol.ys, result_code(sol.result), sol.stats["num_steps"],
                           sol.result == dfx.RESULTS.successful, t1, layers0, problem,
                           parameterization)
    # an SDE path that blows up is not a solver failure for diffrax: mark it diverged
    result, ok, t_final = first_nonfinite(ts, traj.theta, traj.loss, traj.result, traj.ok, t1)
    return eqx.tree_at(lambda tr: (tr.result, tr.ok, tr.t_final), traj, (result, ok, t_final))


def stochastic_flow(
    layers0,
    problem,
    *,
    eta,
    key: PRNGKeyArray,
    t1,
    ts,
    dt,
    batch_size: int = 1,
    t0=0.0,
    solver=None,
    max_steps: int | None = None,
    parameterization: Callable | None = None,
) -> Trajectory:
    """Stochastic gradient flow: the Itô SDE du = -grad_u L dt + sqrt(eta) Sigma(u)^{1/2} dW
    whose noise is that of SGD with step `eta` and minibatches of `batch_size` rows (drawn
    without replacement, as `dd.train`). Solved with diffrax at a constant step `dt` on a
    `VirtualBrownianTree` (same key, same path, whatever `dt`).

    **Arguments:**

    - `layers0`, `problem`: as `gradient_flow`; the problem needs data rows (`X`, `y`).
    - `eta`: the SGD step size that sets the noise level (>= 0; 0 gives gradient flow).
    - `key`: PRNG key of the Brownian motion.
    - `t1`, `ts`: final time and save times.
    - `dt`: the constant step of the SDE solver.
    - `batch_size`: minibatch size b (1 <= b <= n; b = n has no noise).
    - `solver`: an Itô diffrax solver; default `diffrax.Euler()` (Euler–Maruyama, strong
        order 1/2, order 1 for the drift). `diffrax.SRA1` is *not* valid (the noise is not
        additive).
    - `max_steps`: default (t1 - t0) / dt + 16, rounded up to a power of two.

    **Returns:** a `Trajectory` (`xi` = -int (grad L dt + noise), the integrated stochastic
    gradient). A path whose state or loss becomes non-finite has `ok=False`,
    `result = dd.Result.diverged` and `t_final` the first save time where it was seen; any
    failure warns (outside jit/vmap).
    """
    layers0, problem, parameterization = prepare_inputs(layers0, problem, parameterization)
    num_rows(problem)
    batch_size = check_batch_size(problem, batch_size)
    t0, t1, ts = check_times(t0, t1, ts)
    eta = jnp.asarray(eta, dtype=jnp.result_type(float))
    if not is_traced(eta) and not float(eta) >= 0:
        raise ValueError(f"`eta` must be >= 0, got {float(eta)}.")
    check_positive("dt", dt)
    dt = jnp.asarray(dt, dtype=jnp.result_type(float))
    if max_steps is None:
        if is_traced(dt) or is_traced(t1) or is_traced(t0):
            max_steps = DEFAULT_MAX_STEPS
        else:
            # rounded up to a power of two, so that nearby `dt` share one compilation
            steps = int(np.ceil(float((t1 - t0) / dt))) + 16
            max_steps = 1 << (steps - 1).bit_length()
    check_tolerances(1.0, 1.0, max_steps)
    solver = dfx.Euler() if solver is None else resolve_solver(solver)
    traj = _solve_sde(layers0, problem, eta, key, t0, t1, ts, dt, solver, batch_size,
                      max_steps, parameterization)
    warn_if_failed(traj, "stochastic_flow", "Decrease `dt` or `eta`.")
    return traj


@eqx.filter_jit
def _solve_momentum(layers0, velocity0, problem, damping, t0, t1, ts, solver, rtol, atol,
                    max_steps, parameterization, gtol):
    def vector_field(t, y, args):
        layers, velocity, _ = y
        th, pullback = jax.vjp(parameterization, layers)
        g = jax.grad(problem.loss)(th)
        (gu,) = pullback(g)
        accel = jax.tree_util.tree_map(lambda v, gg: -damping * v - gg, velocity, gu)
        return velocity, accel, -g

    y0 = (layers0, velocity0, jnp.zeros_like(parameterization(layers0)))
    ys, result, num_steps, ok, t_final = diffeq(
        vector_field, y0, problem, t0=t0, t1=t1, ts=ts, solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps, gtol=gtol, stop_on=lambda f: (f[0], f[-1]),
    )
    layers_ts, _, xi_ts = ys
    return make_trajectory(ts, (layers_ts, xi_ts), result, num_steps, ok, t_final, layers0,
                           problem, parameterization)


def momentum_flow(
    layers0,
    problem,
    *,
    damping,
    t1,
    ts,
    velocity0=None,
    t0=0.0,
    solver=None,
    rtol=1e-8,
    atol=1e-10,
    max_steps: int = DEFAULT_MAX_STEPS,
    parameterization: Callable | None = None,
    stop_when_converged=None,
) -> Trajectory:
    """Momentum gradient flow u'' + gamma u' = -grad_u L(u) (heavy ball in continuous time),
    as a first-order system in (u, u', xi) solved adaptively with diffrax.

    **Arguments:**

    - `damping`: gamma > 0. Large gamma is overdamped: u(t) ~ u_GF(t / gamma) with an error
        O(1 / gamma^2); small gamma oscillates.
    - `velocity0`: u'(0), default 0 (a heavy ball started at rest).
    - `stop_when_converged`: stop once both ||u'||_inf and ||grad L||_inf are <= this
        tolerance (the ball is at rest at a critical point).
    - the others as `gradient_flow`.

    **Returns:** a `Trajectory` (`xi` = -int grad_theta L dt).
    """
    layers0, problem, parameterization = prepare_inputs(layers0, problem, parameterization)
    t0, t1, ts = check_times(t0, t1, ts)
    check_tolerances(rtol, atol, max_steps)
    check_positive("damping", damping)
    if velocity0 is None:
        velocity0 = jax.tree_util.tree_map(jnp.zeros_like, layers0)
    else:
        velocity0 = jax.tree_util.tree_map(
            lambda x: check_finite("velocity0", as_float_array("velocity0", x)), velocity0
        )
        same = jax.tree_util.tree_structure(velocity0) == jax.tree_util.tree_structure(layers0)
        shapes = [x.shape for x in jax.tree_util.tree_leaves(velocity0)]
        if not same or shapes != [x.shape for x in jax.tree_util.tree_leaves(layers0)]:
            raise ValueError("`velocity0` must have the structure and shapes of `layers0`.")
    traj = _solve_momentum(
        layers0, velocity0, problem, jnp.asarray(damping, dtype=jnp.result_type(float)), t0, t1,
        ts, resolve_solver(solver), jnp.asarray(rtol), jnp.asarray(atol), max_steps,
        parameterization, check_gtol(stop_when_converged),
    )
    warn_if_failed(traj, "momentum_flow", rtol=rtol)
    warn_if_unreached(traj, check_gtol(stop_when_converged), "momentum_flow")
    return traj
