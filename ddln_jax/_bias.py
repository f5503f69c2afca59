"""Implicit bias: where gradient flow ends, without simulating it (DESIGN §3).

If the flow interpolates, theta_inf = argmin_{X theta = y} D_Q(theta, theta0). Its dual:
theta = Psi(X^T omega) with omega minimising the convex phi(omega) = Q*(X^T omega) - <y, omega>,
whose gradient is X Psi(X^T omega) - y and Hessian X M X^T. Damped Newton with backtracking;
phi = +inf outside the (bounded, for L >= 3) domain of xi keeps iterates admissible.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int
from scipy.optimize import linprog

from ._loss import LeastSquares, _check_data
from ._mirror import AbstractMirrorMap, MirrorMap
from ._network import theta as product_theta
from ._validate import check_layers


class ImplicitBias(eqx.Module):
    """Result of `implicit_bias`.

    - `theta`: the predicted limit theta_inf.
    - `omega`: the dual variable (xi_inf = X^T omega).
    - `residual`: ||X theta - y||_2.
    - `iterations`: Newton iterations taken.
    - `converged`: residual <= max(tol (1 + ||y||), the round-off floor of float64 at this
        xi, 64 eps ||X|| ||M (|xi| + 1)||).
    """

    theta: Float[Array, " dim"]
    omega: Float[Array, " n"]
    residual: Float[Array, ""]
    iterations: Int[Array, ""]
    converged: Bool[Array, ""]


def implicit_bias(
    layers0, X, y, *, mirror: AbstractMirrorMap | None = None, tol=1e-12, max_iter: int = 200
) -> ImplicitBias:
    """theta_inf = argmin_{X theta = y} D_Q(theta, theta0) for the DDLN initialised at
    `layers0` (any depth, Assumption (A)), by damped Newton in the dual.

    **Arguments:**

    - `layers0`: initial layers `(depth, dim)`.
    - `X`, `y`: an underdetermined system (n <= dim, full row rank) that the flow interpolates.
    - `mirror`: a mirror map to use instead of `MirrorMap.from_layers(layers0)` (e.g. a
        closed form).
    - `tol`: stop when ||X theta - y|| <= tol (1 + ||y||).
    - `max_iter`: Newton iterations cap.

    **Returns:** an `ImplicitBias`. Check `.converged`: very small initializations in deep
    networks put xi_inf within round-off of the edge of its domain, where float64 cannot
    resolve Psi.
    """
    X, y = _check_data(X, y)
    if X.shape[0] > X.shape[1]:
        raise ValueError(
            f"`X` has n={X.shape[0]} > dim={X.shape[1]}: the flow does not interpolate in "
            "general. Use an underdetermined problem (n <= dim), or `dd.LeastSquares(X, y)"
            ".theta_ls` for the unique minimiser."
        )
    if mirror is None:
        layers0 = check_layers(layers0)
        mirror = MirrorMap.from_layers(layers0)
    if X.shape[1] != jnp.shape(mirror.grad_q(jnp.zeros(X.shape[1])))[0]:
        raise ValueError("`X` must have as many columns as the network has coordinates.")
    return _newton(mirror, X, y, jnp.asarray(tol), max_iter)


@eqx.filter_jit
def _newton(mirror, X, y, tol, max_iter):
    lo, hi = mirror.domain()
    ynorm = jnp.linalg.norm(y)

    def phi(omega):
        xi = X.T @ omega
        inside = jnp.all((xi > lo) & (xi < hi))
        xi_safe = jnp.where(inside, xi, 0.0)
        val = _dual(mirror, xi_safe) - y @ omega
        return jnp.where(inside, val, jnp.inf)

    def residual(omega):
        return X @ mirror.psi(X.T @ omega) - y

    eps = jnp.finfo(X.dtype).eps
    xnorm = jnp.linalg.norm(X)

    def attainable(omega):
        # rounding of xi (relative eps) moves theta by M eps |xi|, the residual by X of that
        xi = X.T @ omega
        m = mirror.metric(mirror.psi(xi))
        return 64 * eps * xnorm * jnp.linalg.norm(m * (jnp.abs(xi) + 1.0))

    def cond(carry):
        i, omega, r, stalled = carry
        target = jnp.maximum(tol * (1 + ynorm), attainable(omega))
        return (i < max_iter) & (jnp.linalg.norm(r) > target) & ~stalled

    def body(carry):
        i, omega, r, _ = carry
        theta = mirror.psi(X.T @ omega)
        m = mirror.metric(theta)
        hess = (X * m) @ X.T
        hess = hess + 1e-14 * jnp.trace(hess) / hess.shape[0] * jnp.eye(hess.shape[0])
        step = -jnp.linalg.solve(hess, r)
        f0 = phi(omega)
        slope = r @ step
        rnorm = jnp.linalg.norm(r)

        def ls_cond(c):
            t, k = c
            new = omega + t * step
            fn = phi(new)
            armijo = fn <= f0 + 1e-4 * t * slope
            # near the optimum phi stalls at round-off: accept a smaller residual instead
            better = jnp.isfinite(fn) & (jnp.linalg.norm(residual(new)) < rnorm)
            return (k < 60) & ~(armijo | better)

        def ls_body(c):
            t, k = c
            return 0.5 * t, k + 1

        # largest step keeping xi = X^T omega inside its domain (bounded for L >= 3)
        xi, dxi = X.T @ omega, X.T @ step
        room = jnp.where(dxi > 0, (hi - xi) / dxi, jnp.where(dxi < 0, (lo - xi) / dxi, jnp.inf))
        t0 = jnp.minimum(1.0, 0.99 * jnp.min(room))
        t, k = jax.lax.while_loop(ls_cond, ls_body, (t0, 0))
        stalled = k >= 60  # no step decreases phi or the residual: round-off floor reached
        omega = jnp.where(stalled, omega, omega + t * step)
        return i + 1, omega, residual(omega), stalled

    omega0 = jnp.zeros_like(y)
    i, omega, r, _ = jax.lax.while_loop(cond, body, (0, omega0, residual(omega0), False))
    theta = mirror.psi(X.T @ omega)
    rn = jnp.linalg.norm(X @ theta - y)
    ok = rn <= jnp.maximum(tol * (1 + ynorm), attainable(omega))
    return ImplicitBias(theta=theta, omega=omega, residual=rn, iterations=i, converged=ok)


def _dual(mirror, xi):
    """Q*(xi) = <xi, Psi(xi)> - Q(Psi(xi)) (exact formula where the map has one)."""
    if hasattr(mirror, "dual"):
        return mirror.dual(xi)
    theta = mirror.psi(xi)
    return jnp.sum(xi * theta) - mirror.q(theta)


def min_l2_interpolator(X, y) -> Float[Array, " dim"]:
    """argmin ||theta||_2 s.t. X theta = y (= pinv(X) y)."""
    X, y = _check_data(X, y)
    return jnp.linalg.pinv(X) @ y


def min_l1_interpolator(X, y) -> Float[Array, " dim"]:
    """argmin ||theta||_1 s.t. X theta = y, as a linear program (scipy HiGHS) in
    theta = p - q, p, q >= 0."""
    X, y = _check_data(X, y)
    Xn, yn = np.asarray(X, float), np.asarray(y, float)
    n, d = Xn.shape
    res = linprog(
        np.ones(2 * d), A_eq=np.hstack([Xn, -Xn]), b_eq=yn, bounds=(0, None), method="highs"
    )
    if not res.success:
        raise ValueError(f"min_l1_interpolator: the linear program failed ({res.message}).")
    return jnp.asarray(res.x[:d] - res.x[d:])


def theorem1_bound(layers0, problem, ts, *, mirror: AbstractMirrorMap | None = None):
    """D_Q(theta*, theta0) / t (eq 8), for every depth, with the minimiser theta* closest to
    theta0 in D_Q: the implicit-bias solution when the problem is underdetermined, else
    theta_LS. Infinite at t = 0.

    **Arguments:** `layers0` (A init), `problem` a `dd.LeastSquares`, `ts` times.
    """
    if not isinstance(problem, LeastSquares):
        raise TypeError("`problem` must be a `dd.LeastSquares` for `theorem1_bound`.")
    layers0 = check_layers(layers0)
    mirror = MirrorMap.from_layers(layers0) if mirror is None else mirror
    n, d = problem.X.shape
    if n < d:
        theta_star = implicit_bias(layers0, problem.X, problem.y, mirror=mirror).theta
    else:
        theta_star = problem.theta_ls
    dq = mirror.bregman(theta_star, product_theta(layers0))
    ts = jnp.asarray(ts)
    return jnp.where(ts > 0, dq / jnp.where(ts > 0, ts, 1.0), jnp.inf)

