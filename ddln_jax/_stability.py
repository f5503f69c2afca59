"""Stability of gradient descent at an interpolator (docs/maths.md, "Discrete time: GD and
SGD limits"): the sharpness in closed form, and the step size at which the limit `gd_bias`
predicts stops being linearly stable (GD converges near a minimum only if its sharpness is
<= 2 / gamma)."""

import warnings

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float
from scipy.optimize import brentq

from ._bias import implicit_bias
from ._gd_bias import _check_problem, _flow_gains, _layer_rhs, _predict
from ._loss import LeastSquares
from ._network import check_assumption_a
from ._solve import resolve_solver
from ._validate import check_int, check_layers, check_tolerances, is_traced


class StableStep(eqx.Module):
    """Result of `max_stable_step`.

    - `step_size`: gamma*, the largest step at which the predicted GD limit is linearly
        stable: gamma* lambda_max(theta_inf(gamma*)) = 2.
    - `sharpness`: lambda_max of the layer Hessian at that limit (= 2 / gamma*).
    - `theta`: the predicted GD limit at gamma* (`gd_bias` ahead of time).
    - `flow_step`: 2 / lambda_max at the gradient flow's limit (the gamma -> 0 estimate).
    - `converged`: the root was bracketed and found, and the predictions converged.
    """

    step_size: Float[Array, ""]
    sharpness: Float[Array, ""]
    theta: Float[Array, " dim"]
    flow_step: Float[Array, ""]
    converged: Bool[Array, ""]


def interpolator_sharpness(layers, problem) -> Float[Array, ""]:
    """The sharpness lambda_max(nabla^2_u L(theta(u))) at an interpolator, in closed form:
    where grad L = 0 the layer Hessian is J^T (2 X^T X) J (J = d theta / d u), whose non-zero
    eigenvalues are those of 2 D X^T X D with D = diag(sqrt(M)), M_ii = sum_j prod_{l != j}
    (u^l_i)^2 the metric (eq 11). Valid only where X theta = y (elsewhere the Hessian has
    the extra term sum_i dL/dtheta_i nabla^2 theta_i)."""
    if not isinstance(problem, LeastSquares):
        raise TypeError("`problem` must be a `dd.LeastSquares(X, y)`.")
    layers = check_layers(layers, "layers")
    if not is_traced(layers):
        r = float(jnp.linalg.norm(problem.X @ jnp.prod(layers, axis=0) - problem.y))
        if r > 1e-6 * (1.0 + float(jnp.linalg.norm(problem.y))):
            warnings.warn(
                f"interpolator_sharpness: `layers` is not at an interpolator (residual "
                f"{r:.3g}); the value is only the Gauss-Newton part of the Hessian there. "
                "Use `dd.sharpness` away from interpolators.",
                RuntimeWarning,
                stacklevel=2,
            )
    prods = -_layer_rhs(layers, jnp.ones(layers.shape[1], layers.dtype))
    return _top_eig(jnp.sum(prods**2, axis=0), problem.X)


def _top_eig(metric, X):
    r = jnp.sqrt(metric)
    return jnp.linalg.eigvalsh(2.0 * (r[:, None] * (X.T @ X)) * r[None, :])[-1]


def max_stable_step(
    layers0,
    problem,
    *,
    t1=1e6,
    rtol=1e-10,
    atol=1e-12,
    gtol=1e-8,
    solver=None,
    max_steps: int = 2**20,
    xtol=1e-10,
) -> StableStep:
    """The predicted largest step size at which gradient descent from `layers0` converges to
    the limit `gd_bias` predicts: the root of gamma lambda_max(theta_inf(gamma)) = 2, with
    lambda_max the sharpness (`interpolator_sharpness`) at the predicted limit and the
    effective invariants. One gradient flow serves every gamma (the drift is linear in
    gamma to first order); the root is found by Brent's method (scipy).

    Linear stability only: GD above gamma* can still converge after an unstable phase
    (edge of stability) to a flatter minimum, far from the predicted one.

    **Arguments:** as `gd_bias`; `xtol` the relative tolerance on gamma*.
    """
    _check_problem(problem, "max_stable_step")
    layers0 = check_layers(layers0)
    check_assumption_a(layers0, strict=True)
    check_tolerances(rtol, atol, max_steps)
    red, _, acc_a, acc_c, flow_ok = _flow_gains(
        layers0,
        problem,
        None,
        jnp.asarray(t1, float),
        resolve_solver(solver),
        jnp.asarray(rtol),
        jnp.asarray(atol),
        check_int("max_steps", max_steps),
        jnp.asarray(gtol),
    )

    def at(gamma):
        m, _, exists = _predict(red, acc_a, acc_c, jnp.asarray(gamma))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bias = implicit_bias(problem=problem, mirror=m)
        lam = _top_eig(m.metric(bias.theta), problem.X)
        return bias.theta, lam, exists & bias.converged

    _, lam0, ok0 = at(0.0)
    flow_step = 2.0 / lam0
    f = lambda g: float(g * at(g)[1]) - 2.0  # noqa: E731
    lo, hi, found = 0.0, float(flow_step), False
    for _ in range(40):  # the predicted limit flattens with gamma: expand until unstable
        if f(hi) > 0:
            found = True
            break
        lo, hi = hi, 2 * hi
    gamma = brentq(f, lo, hi, xtol=xtol * hi) if found else hi
    theta, lam, ok = at(gamma)
    converged = flow_ok & ok0 & ok & found
    if not bool(converged):
        warnings.warn(
            "max_stable_step: not converged (the flow, the prediction or the root search "
            "failed); the step size returned is not reliable.",
            RuntimeWarning,
            stacklevel=2,
        )
    return StableStep(
        step_size=jnp.asarray(gamma),
        sharpness=lam,
        theta=theta,
        flow_step=flow_step,
        converged=converged,
    )
