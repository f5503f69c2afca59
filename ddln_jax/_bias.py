"""Implicit bias: where gradient flow ends, without simulating it (docs/maths.md: mirror maps).

If the flow interpolates, theta_inf = argmin_{X theta = y} D_Q(theta, theta0). Its dual:
theta = Psi(X^T omega) with omega minimising the convex phi(omega) = Q*(X^T omega) - <y, omega>,
whose gradient is X Psi(X^T omega) - y and Hessian X M X^T. Damped Newton with backtracking;
phi = +inf outside the (bounded, for L >= 3) domain of xi keeps iterates admissible.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._loss import LeastSquares, _check_data
from ._mirror import AbstractMirrorMap, MirrorMap, TiedMirrorMap
from ._network import theta as product_theta
from ._parameterize import _difference, _tied
from ._validate import (
    as_float_array,
    check_finite,
    check_int,
    check_layers,
    check_positive,
    is_traced,
)


class ImplicitBias(eqx.Module):
    """Result of `implicit_bias`.

    - `theta`: the predicted limit theta_inf.
    - `omega`: the dual variable (xi_inf = X^T omega; for `dd.difference`, of the lifted
        problem [X, -X]).
    - `residual`: ||X theta - y||_2.
    - `iterations`: Newton iterations taken.
    - `converged`: residual <= tol (1 + ||y||), or, in float64, at most the round-off floor
        at this xi, 64 eps ||X|| ||M (|xi| + 1)|| (in float32 that floor, ~1e-5, is not
        accepted as convergence).
    """

    theta: Float[Array, " dim"]
    omega: Float[Array, " n"]
    residual: Float[Array, ""]
    iterations: Int[Array, ""]
    converged: Bool[Array, ""]


def implicit_bias(
    layers0=None,
    problem=None,
    y=None,
    *,
    parameterization=None,
    mirror: AbstractMirrorMap | None = None,
    tol=1e-12,
    max_steps: int = 200,
) -> ImplicitBias:
    """theta_inf = argmin_{X theta = y} D_Q(theta, theta0): where gradient flow from `layers0`
    ends on an underdetermined least-squares problem, by damped Newton in the dual.

    **Arguments:**

    - `layers0`: initial layers, as for `gradient_flow` with the same `parameterization`:
        `(depth, dim)` for the product network (any depth, Assumption (A)); `u0` `(dim,)`
        for `dd.tied(L)`; `(u0, v0)` for `dd.difference(L)`. Not needed with `mirror`.
    - `problem`: a `dd.LeastSquares(X, y)`, or the matrix `X` with `y` as third argument.
        The system X theta = y must be consistent (the flow interpolates).
    - `parameterization`: `None` (the product), `dd.tied(L)` (theta = u^{⊙L}, u0 > 0) or
        `dd.difference(L)` (theta = u^{⊙L} - v^{⊙L}, u0, v0 > 0: the tied map on the lifted
        problem [X, -X]).
    - `mirror`: a mirror map to use instead of the one built from `layers0` (e.g. a closed
        form); then `layers0` may be omitted.
    - `tol`: stop when ||X theta - y|| <= tol (1 + ||y||).
    - `max_steps`: Newton iterations cap.

    **Returns:** an `ImplicitBias`; a `RuntimeWarning` when `.converged` is False (very small
    initializations in deep networks put xi_inf within round-off of the edge of its domain,
    where float64 cannot resolve Psi; float32 cannot reach a small `tol`).

    **Raises:** `ValueError` for an inconsistent system (no theta solves X theta = y), more
    rows than columns, shapes that do not match, or an unsupported `parameterization`.
    """
    X, y = _problem_data(problem, y)
    max_steps = check_int("max_steps", max_steps)
    check_positive("tol", tol)
    lift = False
    if mirror is None:
        # built on the host (numpy): no program is compiled for the mirror map's fields
        mirror, lift = _mirror_for(layers0, parameterization, X.shape[1])
    elif parameterization is not None:
        raise ValueError("pass either `mirror` or `parameterization`, not both.")
    else:
        # the map's width without running it (nothing compiled)
        probe = jax.ShapeDtypeStruct((X.shape[1],), jnp.result_type(float))
        width = eqx.filter_eval_shape(lambda m, t: m.grad_q(t), mirror, probe).shape[0]
        if X.shape[1] != width:
            raise ValueError(
                f"`X` has {X.shape[1]} columns but the network has {width} coordinates: "
                "they must match."
            )
    Xr, U = _independent_rows(X, y)
    exact = X.dtype == jnp.float64
    tol = (jnp if is_traced(tol) else np).asarray(tol, X.dtype)  # (np: nothing compiled)
    res = _solve(mirror, X, y, Xr, U, tol, max_steps, exact, lift)
    if not is_traced(res.converged) and not bool(res.converged):
        warnings.warn(
            f"implicit_bias: not converged (residual ||X theta - y|| = {float(res.residual):.3g}"
            f" after {int(res.iterations)} Newton steps). "
            + ("" if exact else "float32 cannot reach `tol`: turn on float64 "
               "(`jax.config.update('jax_enable_x64', True)`) or raise `tol`. ")
            + "For very small initializations xi_inf sits at the edge of the mirror map's "
            "domain: a larger scale, or `gradient_flow` for the limit.",
            RuntimeWarning,
            stacklevel=2,
        )
    return res


def _problem_data(problem, y):
    if isinstance(problem, LeastSquares):
        if y is not None:
            raise ValueError("pass `y` inside the `dd.LeastSquares` problem, not separately.")
        X, y = problem.X, problem.y
    elif problem is None or y is None:
        raise TypeError(
            "`implicit_bias` needs a `dd.LeastSquares(X, y)` problem, or `X` and `y`."
        )
    else:
        X, y = problem, y
    X, y = _check_data(X, y)
    if X.shape[0] > X.shape[1]:
        raise ValueError(
            f"`X` has n={X.shape[0]} > dim={X.shape[1]}: the flow does not interpolate in "
            "general. Use an underdetermined problem (n <= dim), or `dd.LeastSquares(X, y)"
            ".theta_ls` for the unique minimiser."
        )
    return X, y


def _independent_rows(X, y):
    """An equivalent full-row-rank system: `(X_r, U_r)` with X_r = S_r V_r^T (and y_r =
    U_r^T y), or `(None, None)` when X has full row rank (or is traced); a `ValueError` when
    X theta = y has no solution. On the host (numpy's SVD)."""
    if is_traced(X) or is_traced(y):
        return None, None
    Xn, yn = np.asarray(X, float), np.asarray(y, float)
    U, S, Vt = np.linalg.svd(Xn, full_matrices=False)
    eps = np.finfo(np.asarray(X).dtype).eps
    r = int(np.sum(S > S[0] * max(Xn.shape) * eps)) if S.size and S[0] > 0 else 0
    if r == 0:
        raise ValueError("`X` is zero: every theta is a minimiser; there is no implicit bias.")
    gap = np.linalg.norm(yn - U[:, :r] @ (U[:, :r].T @ yn))
    if gap > np.sqrt(eps) * (1 + np.linalg.norm(yn)):
        raise ValueError(
            f"`X` and `y` are inconsistent: no theta solves X theta = y (rank(X) = {r} < "
            f"{Xn.shape[0]} rows, least-squares residual {gap:.3g}). Gradient flow then "
            "converges to a least-squares minimiser, which `implicit_bias` does not predict; "
            "remove dependent rows or fix `y`."
        )
    if r == Xn.shape[0]:
        return None, None
    dtype = np.asarray(X).dtype
    return jax.device_put(((S[:r, None] * Vt[:r]).astype(dtype), U[:, :r].astype(dtype)))


def _mirror_for(layers0, parameterization, dim):
    """The mirror map of `layers0` under `parameterization`, and whether the problem must be
    lifted to [X, -X] (the difference network)."""
    if layers0 is None:
        raise TypeError("`implicit_bias` needs `layers0` (or a `mirror`).")
    if parameterization is None:
        layers0 = check_layers(layers0)
        if layers0.shape[1] != dim:
            raise ValueError(
                f"`layers0` has dim {layers0.shape[1]} but `X` has {dim} columns: they must "
                "match."
            )
        return MirrorMap.from_layers(layers0), False
    kind = getattr(parameterization, "func", None)
    depth = getattr(parameterization, "keywords", {}).get("depth")
    if kind is _tied:
        return TiedMirrorMap(_vector("layers0", layers0, dim), depth), False
    if kind is _difference:
        if not isinstance(layers0, (tuple, list)) or len(layers0) != 2:
            raise ValueError("with `dd.difference(L)`, `layers0` must be the pair `(u0, v0)`.")
        u0, v0 = (_vector("layers0", x, dim) for x in layers0)
        both = (jnp.concatenate if is_traced(u0) or is_traced(v0) else np.concatenate)([u0, v0])
        return TiedMirrorMap(both, depth), True
    raise ValueError(
        "`implicit_bias` knows the mirror maps of the product network, `dd.tied(L)` and "
        "`dd.difference(L)`; for another `parameterization` pass its `mirror` "
        "(a `dd.AbstractMirrorMap`)."
    )


def _vector(name, x, dim):
    x = check_finite(name, as_float_array(name, x))
    if x.shape != (dim,):
        raise ValueError(f"`{name}` must have shape ({dim},) to match `X`, got {x.shape}.")
    return x


@eqx.filter_jit
def _solve(mirror, X, y, Xr, U, tol, max_steps, exact, lift):
    """The whole prediction as one compiled program: the equivalent system (`Xr`, U^T y;
    `Xr`, `U` None: X itself), lifted to [Xr, -Xr] for the difference network, the dual
    Newton, and theta, omega and the residual on the caller's system."""
    n, d = X.shape
    if Xr is None:
        Xr, yr, U = X, y, jnp.eye(n, dtype=X.dtype)
    else:
        yr = U.T @ y
    Xs = jnp.concatenate([Xr, -Xr], axis=1) if lift else Xr
    res = _newton(mirror, Xs, yr, tol, max_steps, exact)
    theta = res.theta[:d] - res.theta[d:] if lift else res.theta
    return ImplicitBias(theta=theta, omega=U @ res.omega,
                        residual=jnp.linalg.norm(X @ theta - y), iterations=res.iterations,
                        converged=res.converged)


def _newton(mirror, X, y, tol, max_steps, exact):
    lo, hi = mirror.domain()
    ynorm = jnp.linalg.norm(y)

    def evaluate(omega):
        """phi(omega) = Q*(X^T omega) - <y, omega> (+inf outside the domain), theta =
        Psi(X^T omega) and the residual X theta - y: one solve for Psi serves all three."""
        xi = X.T @ omega
        inside = jnp.all((xi > lo) & (xi < hi))
        xi_safe = jnp.where(inside, xi, 0.0)
        theta, dual = mirror.psi_and_dual(xi_safe, lo, hi)
        # (outside, theta and the residual are those at xi = 0: never used, as phi = inf)
        return jnp.where(inside, dual - y @ omega, jnp.inf), theta, X @ theta - y

    eps = jnp.finfo(X.dtype).eps
    xnorm = jnp.linalg.norm(X)

    def attainable(omega, m):
        # rounding of xi (relative eps) moves theta by M eps |xi|, the residual by X of that
        xi = X.T @ omega
        return 64 * eps * xnorm * jnp.linalg.norm(m * (jnp.abs(xi) + 1.0))

    def cond(carry):
        i, omega, _, _, m, r, stalled, first = carry
        target = jnp.maximum(tol * (1 + ynorm), attainable(omega, m))
        return first | ((i < max_steps) & (jnp.linalg.norm(r) > target) & ~stalled)

    def body(carry):
        # carried from the point accepted last: phi, theta, M(theta) and the residual there;
        # the `first` pass evaluates the start (a zero step, accepted): the program then holds
        # one copy of the evaluation (a Psi solve) and of M
        i, omega, f0, _, m, r, _, first = carry
        hess = (X * m) @ X.T
        hess = hess + 1e-14 * jnp.trace(hess) / hess.shape[0] * jnp.eye(hess.shape[0])
        step = jnp.where(first, 0.0, -jnp.linalg.solve(hess, r))
        slope = r @ step
        rnorm = jnp.linalg.norm(r)

        def try_step(t, k):
            fn, theta, res = evaluate(omega + t * step)
            armijo = fn <= f0 + 1e-4 * t * slope
            # near the optimum phi stalls at round-off: accept a smaller residual instead
            better = jnp.isfinite(fn) & (jnp.linalg.norm(res) < rnorm)
            return t, k, fn, theta, res, armijo | better | first

        def ls_cond(c):
            return (c[1] < 60) & ~c[-1]

        def ls_body(c):
            t, k = c[:2]
            return try_step(0.5 * t, k + 1)

        # largest step keeping xi = X^T omega inside its domain (bounded for L >= 3)
        xi, dxi = X.T @ omega, X.T @ step
        room = jnp.where(dxi > 0, (hi - xi) / dxi, jnp.where(dxi < 0, (lo - xi) / dxi, jnp.inf))
        t0 = jnp.minimum(1.0, 0.99 * jnp.min(room))
        # the first trial (t0, 0) is the loop's first iteration (2 t0 halved: exact)
        start = (2.0 * t0, -1, f0, carry[3], r, False)
        t, k, fn, theta, res, _ = jax.lax.while_loop(ls_cond, ls_body, start)
        stalled = k >= 60  # no step decreases phi or the residual: round-off floor reached
        new = (omega + t * step, fn, theta, mirror.metric(theta), res)
        old = carry[1:6]
        keep = jax.tree_util.tree_map(lambda a, b: jnp.where(stalled, a, b), old, new)
        return (i + jnp.where(first, 0, 1), *keep, stalled, False)

    # (phi, theta, M and the residual are placeholders until the first pass)
    ones = jnp.ones(X.shape[1], X.dtype)
    init = (0, jnp.zeros_like(y), jnp.inf, ones, ones, jnp.zeros_like(y), False, True)
    i, omega, _, theta, m, r, _, _ = jax.lax.while_loop(cond, body, init)
    rn = jnp.linalg.norm(r)
    # in float64 the round-off floor counts as converged; float32's floor (~1e-5) does not
    floor = attainable(omega, m) if exact else 0.0
    ok = rn <= jnp.maximum(tol * (1 + ynorm), floor)
    return ImplicitBias(theta=theta, omega=omega, residual=rn, iterations=i, converged=ok)


def min_l2_interpolator(X, y) -> Float[Array, " dim"]:
    """argmin ||theta||_2 s.t. X theta = y (= pinv(X) y)."""
    X, y = _check_data(X, y)
    return jnp.linalg.pinv(X) @ y


def min_l1_interpolator(X, y) -> Float[Array, " dim"]:
    """argmin ||theta||_1 s.t. X theta = y, as a linear program (scipy HiGHS) in
    theta = p - q, p, q >= 0."""
    from scipy.optimize import linprog  # (lazy: scipy.optimize costs ~0.5 s to import)

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
        theta_star = implicit_bias(problem=problem, mirror=mirror).theta
    else:
        theta_star = problem.theta_ls
    dq = mirror.bregman(theta_star, product_theta(layers0))
    ts = jnp.asarray(ts)
    return jnp.where(ts > 0, dq / jnp.where(ts > 0, ts, 1.0), jnp.inf)

