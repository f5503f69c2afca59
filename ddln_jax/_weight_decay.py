"""Weight decay: where min_u L(theta(u)) + (lambda/2) sum_j ||u^j||^2 ends (docs/maths.md,
"Discrete time: GD and SGD limits").

sum_j (u^j_i)^2 >= L |theta_i|^{2/L} (AM-GM, equality iff the layers are balanced,
|u^j_i| = |theta_i|^{1/L}), so the problem is min_theta L(theta) + (lambda L / 2)
sum_i |theta_i|^{2/L}: at depth 2 the Lasso ||X theta - y||^2 + lambda ||theta||_1 (convex:
solved exactly), at depth >= 3 a non-convex l_{2/L} penalty whose stationary point is the one
the layer flow with weight decay reaches from the init (then polished by Newton on its support).
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ._gd_bias import _layer_rhs
from ._loss import LeastSquares
from ._solve import diffeq, resolve_solver
from ._validate import check_int, check_layers, check_positive


class WeightDecayLimit(eqx.Module):
    """Result of `weight_decay_limit`.

    - `theta`: the minimiser (depth 2) or stationary point (depth >= 3) of
        ||X theta - y||^2 + (lambda L / 2) sum_i |theta_i|^{2/L}.
    - `layers`: balanced layers `(depth, dim)` with product `theta` (|u^j_i| = |theta_i|^{1/L},
        the signs of the flow's end point).
    - `support`: the coordinates with theta_i != 0.
    - `residual`: the first-order residual: on the support max |2 X_i^T r + lambda sign(theta_i)
        |theta_i|^{2/L - 1}|; at depth 2 also the Lasso's off-support violation
        max(|2 X_i^T r| - lambda, 0) (at depth >= 3 theta_i = 0 is always stationary).
    - `balance`: max_{i, j, k} |(u^j_i)^2 - (u^k_i)^2| at the end of the layer flow with weight
        decay from `layers0` (0 at depth 2, where no flow is run).
    - `converged`: `residual` <= `tol` (1 + ||y||) and the flow (depth >= 3) converged.
    """

    theta: Float[Array, " dim"]
    layers: Float[Array, "depth dim"]
    support: Bool[Array, " dim"]
    residual: Float[Array, ""]
    balance: Float[Array, ""]
    converged: Bool[Array, ""]


def _residual(X, y, theta, lam, depth):
    c = 2.0 * X.T @ (X @ theta - y)
    on = theta != 0
    a = jnp.abs(jnp.where(on, theta, 1.0))
    pen = lam * jnp.sign(theta) * a ** (2.0 / depth - 1.0)
    inside = jnp.max(jnp.where(on, jnp.abs(c + pen), 0.0))
    if depth == 2:
        return jnp.maximum(inside, jnp.max(jnp.where(on, 0.0, jnp.maximum(jnp.abs(c) - lam, 0))))
    return inside


@eqx.filter_jit
def _lasso(X, y, lam, iterations):
    """FISTA on ||X theta - y||^2 + lam ||theta||_1 (step 1 / (2 ||X||_2^2))."""
    step = 1.0 / (2.0 * jnp.linalg.norm(X, 2) ** 2)

    def prox(z):
        return jnp.sign(z) * jnp.maximum(jnp.abs(z) - step * lam, 0.0)

    def body(_, c):
        theta, z, t = c
        new = prox(z - step * 2.0 * X.T @ (X @ z - y))
        t_new = 0.5 * (1 + jnp.sqrt(1 + 4 * t * t))
        return new, new + (t - 1) / t_new * (new - theta), t_new

    zero = jnp.zeros(X.shape[1], X.dtype)
    theta, _, _ = jax.lax.fori_loop(0, iterations, body, (zero, zero, jnp.asarray(1.0, X.dtype)))
    return theta


def _polish_lasso(X, y, theta, lam):
    """The exact Lasso solution on the support and signs of `theta`:
    2 X_S^T (X_S theta_S - y) + lam sign_S = 0, solved in closed form (least squares)."""
    Xn, yn, th = np.asarray(X), np.asarray(y), np.asarray(theta)
    on = np.abs(th) > 0
    if not on.any():
        return jnp.zeros_like(theta)
    sign = np.sign(th[on])
    XS = Xn[:, on]
    sol = np.linalg.lstsq(XS.T @ XS, XS.T @ yn - 0.5 * lam * sign, rcond=None)[0]
    out = np.zeros_like(th)
    out[on] = sol
    if np.any(np.sign(sol) != sign):  # the support guess was not exact: keep FISTA's point
        return theta
    return jnp.asarray(out)


@eqx.filter_jit
def _decay_flow(layers0, problem, lam, t1, solver, rtol, atol, max_steps, gtol):
    def field(t, u, args):
        g = problem.grad(jnp.prod(u, axis=0))
        return _layer_rhs(u, g) - lam * u

    ys, result, steps, ok, t_final = diffeq(
        field,
        layers0,
        None,
        t0=0.0,
        t1=t1,
        ts=jnp.asarray([t1]),
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        gtol=gtol,
        stop_on=lambda f: f,
    )
    return ys[-1], ok


def _newton_support(X, y, theta, lam, depth, iterations=60):
    """Newton on the support of 2 X_S^T (X_S th - y) + lam sign(th) |th|^{2/L-1} = 0."""
    Xn, yn = np.asarray(X), np.asarray(y)
    th = np.asarray(theta).copy()
    on = th != 0
    if not on.any():
        return jnp.asarray(th)
    XS, p = Xn[:, on], 2.0 / depth - 1.0
    t = th[on]
    for _ in range(iterations):
        f = 2 * XS.T @ (XS @ t - yn) + lam * np.sign(t) * np.abs(t) ** p
        J = 2 * XS.T @ XS + np.diag(lam * p * np.abs(t) ** (p - 1))
        step = np.linalg.solve(J, f)
        new = t - step
        # stay on the same side of 0 (the penalty is singular there)
        shrink = 1.0
        while np.any(np.sign(t - shrink * step) != np.sign(t)) and shrink > 1e-12:
            shrink *= 0.5
        new = t - shrink * step
        if np.max(np.abs(new - t)) <= 1e-15 * (1 + np.max(np.abs(t))):
            t = new
            break
        t = new
    th[on] = t
    return jnp.asarray(th)


def weight_decay_limit(
    layers0,
    problem,
    weight_decay,
    *,
    depth: int | None = None,
    t1=1e6,
    rtol=1e-10,
    atol=1e-12,
    gtol=1e-8,
    solver=None,
    max_steps: int = 2**20,
    tol=1e-10,
    support_tol=1e-6,
) -> WeightDecayLimit:
    """Where gradient descent with weight decay `weight_decay` = lambda (small steps, e.g.
    `optax.chain(optax.add_decayed_weights(lambda), optax.sgd(gamma))`) ends on
    L(theta) = ||X theta - y||^2: the minimiser of L(theta) + (lambda L / 2) sum_i
    |theta_i|^{2/L}, with balanced layers.

    Depth 2: the Lasso ||X theta - y||^2 + lambda ||theta||_1, by FISTA then the exact
    solution on its support and signs (independent of `layers0`, which may be `None`; give
    `depth=2`). Depth >= 3: the layer flow du^j/dt = -P_j ⊙ grad L - lambda u^j from
    `layers0` to stationarity (Tsit5, stopped once every |du/dt| <= `gtol`), then Newton on
    the support {i: |theta_i|^{1/L} > support_tol max |layers0|} (coordinates off it decay
    to 0 as e^{-L lambda t}; 0 is always a stationary value of a coordinate at depth >= 3).

    **Raises:** `ValueError` for `weight_decay` <= 0, a `depth` that does not match
    `layers0`, or a problem that is not a `dd.LeastSquares`.
    """
    if not isinstance(problem, LeastSquares):
        raise TypeError("`problem` must be a `dd.LeastSquares(X, y)` for `weight_decay_limit`.")
    lam = np.asarray(weight_decay, float)
    if lam.ndim != 0 or not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"`weight_decay` must be a finite number > 0, got {weight_decay!r}.")
    lam = float(lam)
    if layers0 is None:
        if depth != 2:
            raise ValueError("`layers0` is needed for depth >= 3 (pass `depth=2` for the Lasso).")
    else:
        layers0 = check_layers(layers0)
        if depth is not None and depth != layers0.shape[0]:
            raise ValueError(f"`depth` ({depth}) does not match `layers0` ({layers0.shape[0]}).")
        depth = layers0.shape[0]
    X, y = problem.X, problem.y
    if depth == 2:
        theta = _polish_lasso(X, y, _lasso(X, y, lam, 20_000), lam)
        balance, flow_ok, signs = jnp.asarray(0.0), True, None
    else:
        check_positive("gtol", gtol)
        u, flow_ok = _decay_flow(
            layers0,
            problem,
            jnp.asarray(lam),
            jnp.asarray(t1, float),
            resolve_solver(solver),
            jnp.asarray(rtol),
            jnp.asarray(atol),
            check_int("max_steps", max_steps),
            jnp.asarray(gtol),
        )
        sq = u**2
        balance = jnp.max(jnp.max(sq, axis=0) - jnp.min(sq, axis=0))
        th = jnp.prod(u, axis=0)
        root = jnp.abs(th) ** (1.0 / depth)
        on = root > support_tol * jnp.max(jnp.abs(layers0))
        theta = _newton_support(X, y, jnp.where(on, th, 0.0), lam, depth)
        signs = jnp.where(u >= 0, 1.0, -1.0)
    root = jnp.abs(theta) ** (1.0 / depth)
    if signs is None:  # depth 2: u^1 carries the sign
        signs = jnp.ones((2, theta.shape[0])).at[0].set(jnp.where(theta >= 0, 1.0, -1.0))
    else:  # keep the flow's signs, the last layer fixing the product's sign
        signs = signs.at[-1].set(jnp.sign(theta) * jnp.prod(signs[:-1], axis=0))
        signs = jnp.where(signs == 0, 1.0, signs)
    residual = _residual(X, y, theta, lam, depth)
    converged = jnp.asarray(flow_ok) & (residual <= tol * (1 + jnp.linalg.norm(y)))
    if not bool(converged):
        warnings.warn(
            f"weight_decay_limit: not converged (first-order residual {float(residual):.3g}"
            + (
                ""
                if bool(flow_ok)
                else "; the layer flow did not reach stationarity: raise `t1` or `max_steps`"
            )
            + ").",
            RuntimeWarning,
            stacklevel=2,
        )
    return WeightDecayLimit(
        theta=theta,
        layers=signs * root[None],
        support=theta != 0,
        residual=residual,
        balance=balance,
        converged=converged,
    )
