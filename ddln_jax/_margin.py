"""Classification on separable data: the max-margin directions that logistic and exponential
flows approach, and the margins along a flow.

With theta = prod_j u^j (L-homogeneous in the layers) and an exponential-tailed loss, the
direction of theta(t) tends to a KKT point of

    min ||theta||_{2/L}  subject to  y_n <x_n, theta> >= 1,
    ||theta||_p = (sum_i |theta_i|^p)^{1/p}

(Gunasekar et al. 2018; Lyu & Li 2020): at depth 2 the l1 max-margin (a linear program), for
L >= 3 a non-convex quasi-norm whose local minima are vertices of the feasible polyhedron
(see docs/maths.md). The normalised margin min_n y_n <x_n, theta> / ||theta||_{2/L} is degree-0
homogeneous; Lyu & Li's q_min / ||u||_2^L equals it times L^{-L/2} on balanced layers.
"""

import itertools
import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float
from scipy.optimize import linprog, minimize, nnls

from ._loss import Exponential, Logistic, _check_data, _check_labels
from ._validate import check_depth

_NORMS = ("l2/L", "l2")


def _margin_matrix(X, y):
    X, y = _check_data(X, y)
    _check_labels(y)
    return np.asarray(y)[:, None] * np.asarray(X)


def _not_separable(what):
    return ValueError(
        f"`X`, `y` are not linearly separable through the origin ({what}): no theta has "
        "y_n <x_n, theta> > 0 for every row, so the logistic/exponential loss has a finite "
        "minimiser and no max-margin direction. Check the labels `y` (±1) or add a constant "
        "column to `X` for a bias."
    )


def _weighted_l1(Z, w, allowed=None):
    """argmin sum_i w_i |theta_i| s.t. Z theta >= 1 (theta = a - b, a, b >= 0) by HiGHS' dual
    simplex, which returns a vertex. `allowed` (bool, dim) fixes the other coordinates to 0."""
    n, d = Z.shape
    bounds = [(0.0, None if allowed is None or allowed[i % d] else 0.0) for i in range(2 * d)]
    res = linprog(
        np.concatenate([w, w]),
        A_ub=-np.hstack([Z, -Z]),
        b_ub=-np.ones(n),
        bounds=bounds,
        method="highs-ds",
    )
    if res.status == 2:
        raise _not_separable("the margin linear program is infeasible")
    if res.status != 0:
        raise RuntimeError(f"the margin linear program failed: {res.message}")
    return res.x[:d] - res.x[d:]


def _svm(Z):
    """Hard-margin SVM through the origin, min ||theta||_2 s.t. Z theta >= 1: the dual
    max sum nu - ||Z^T nu||^2 / 2 over nu >= 0 (SLSQP), then the active set solved exactly."""
    _weighted_l1(Z, np.ones(Z.shape[1]))  # separability, with the clear error
    G = Z @ Z.T
    n = Z.shape[0]
    res = minimize(
        lambda v: 0.5 * v @ G @ v - v.sum(),
        np.full(n, 1.0 / n),
        jac=lambda v: G @ v - 1.0,
        bounds=[(0.0, None)] * n,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    nu = np.maximum(res.x, 0.0)
    theta = Z.T @ nu
    active = Z @ theta <= 1.0 + 1e-6
    nu_a = np.linalg.lstsq(Z[active] @ Z[active].T, np.ones(active.sum()), rcond=None)[0]
    polished = Z[active].T @ nu_a
    if np.all(nu_a >= -1e-12) and np.all(Z @ polished >= 1.0 - 1e-12):
        return polished
    return theta / np.min(Z @ theta)


def _polish_vertex(Z, theta, tol=1e-9):
    """Solve the vertex exactly: on the support S and the active margins A, Z_AS theta_S = 1."""
    support = np.abs(theta) > tol * np.max(np.abs(theta))
    active = Z @ theta <= 1.0 + tol
    sol = np.zeros_like(theta)
    sol[support] = np.linalg.lstsq(Z[np.ix_(active, support)], np.ones(active.sum()), rcond=None)[0]
    return sol if np.min(Z @ sol) >= 1.0 - 1e-10 else theta


def _irl1(Z, p, theta, iterations=60):
    """Iteratively reweighted l1 for min sum |theta_i|^p (p < 1): each step is the LP with
    weights p (|theta_i| + eps)^{p-1}, a majorise-minimise step on the concave objective;
    eps -> 0 geometrically, then support-restricted steps until the vertex repeats (a fixed
    point of the exact reweighting is a KKT point: see docs/maths.md)."""
    for k in range(iterations):
        scale = np.max(np.abs(theta))
        eps = scale * 0.1 * 0.5**k if k < 30 else 0.0
        allowed = None if eps > 0 else np.abs(theta) > 1e-12 * scale
        w = p * np.where(np.abs(theta) + eps > 0, np.abs(theta) + eps, 1.0) ** (p - 1.0)
        new = _weighted_l1(Z, w, allowed)
        if eps == 0.0 and np.allclose(new, theta, rtol=1e-12, atol=1e-14 * scale):
            return _polish_vertex(Z, new), k + 1
        theta = new
    return _polish_vertex(Z, theta), iterations


def _residual_np(theta, Z, depth):
    """(KKT residual, multipliers) of theta's direction; see `kkt_residual`."""
    q = Z @ theta
    qmin = np.min(q)
    if not qmin > 0:
        return np.inf, np.zeros(Z.shape[0])
    th, qh = theta / qmin, q / qmin
    a = np.abs(th) ** (2.0 / depth)
    B = th[:, None] * Z.T
    lam = nnls(np.vstack([B, np.diag(qh - 1.0)]), np.concatenate([a, np.zeros(len(q))]))[0]
    res = (np.sum(np.abs(a - B @ lam)) + np.sum(lam * (qh - 1.0))) / np.sum(a)
    if depth == 2:  # the l1 problem is convex: |Z^T lambda|_i <= 1 off the support too
        res += max(0.0, np.max(np.abs(Z.T @ lam)) - 1.0)
    return float(res), lam


def kkt_residual(theta, X, y, depth: int) -> float:
    """How far the direction of `theta` is from a KKT point of
    min ||theta||_{2/L} s.t. y_n <x_n, theta> >= 1.

    theta is scaled to min margin 1 (theta^); with a_i = |theta^_i|^{2/L} and multipliers
    lambda >= 0 fitted by NNLS, the residual is
    (sum_i |a_i - theta^_i (Z^T lambda)_i| + sum_n lambda_n (q^_n - 1)) / sum_i a_i
    (Z = diag(y) X, q^ = Z theta^): the stationarity of Lyu & Li's problem in the layers,
    min ||u||^2 s.t. margins >= 1, at balanced layers ((u^j_i)^2 = g_i theta_i), and
    complementary slackness, relative to the objective. At depth 2 it adds the l1 dual
    feasibility max(0, ||Z^T lambda||_inf - 1). Zero exactly at KKT points; inf when theta
    does not separate the data. Scale-invariant in theta and in X."""
    depth = check_depth(depth)
    Z = _margin_matrix(X, y)
    return _residual_np(np.asarray(theta, dtype=float), Z, depth)[0]


def margin(theta: Float[Array, "... dim"], X, y, depth: int) -> Float[Array, "..."]:
    """The normalised margin min_n y_n <x_n, theta> / ||theta||_{2/L}, with
    ||theta||_{2/L} = (sum_i |theta_i|^{2/L})^{L/2}: degree-0 homogeneous in theta (the
    power L/2 on the sum is the one that makes it so), the l1 margin at depth 2. On balanced
    layers it is L^{L/2} times Lyu & Li's q_min / ||u||_2^L. Leading axes of `theta` are
    batch axes."""
    depth = check_depth(depth)
    X, y = _check_data(X, y)
    theta = jnp.asarray(theta)
    q = jnp.min(y * (theta @ X.T), axis=-1)
    return q / _quasi_norm(theta, depth)


def _quasi_norm(theta, depth):
    scale = jnp.max(jnp.abs(theta), axis=-1)
    safe = jnp.where(scale > 0, scale, 1.0)
    s = jnp.sum((jnp.abs(theta) / safe[..., None]) ** (2.0 / depth), axis=-1)
    return scale * s ** (depth / 2.0)


class MaxMargin(eqx.Module):
    """The predicted limit direction of a classification flow (`dd.max_margin`).

    **Fields:**

    - `theta`: the minimiser scaled to min margin 1, `(dim,)`.
    - `direction`: `theta / ||theta||_2`.
    - `margin`: its normalised margin 1 / ||theta||_{2/L} (`norm="l2"`: 1 / ||theta||_2).
    - `kkt_residual`: `dd.kkt_residual` of `theta` (0 at a KKT point; for `norm="l2"` the
        residual of the SVM's KKT conditions, the same formula at depth 1).
    - `multipliers`: the KKT multipliers lambda, `(n,)`.
    - `candidates`: every distinct KKT point found, `(K, dim)` (depth >= 3: several local
        minima are common; `theta` is the one of least ||.||_{2/L}), `objectives` their
        sum_i |theta_i|^{2/L}.
    - `depth`, `norm`, `method` (how it was found), `starts` (the starts that reached each
        candidate).
    """

    theta: Float[Array, " dim"]
    direction: Float[Array, " dim"]
    margin: Float[Array, ""]
    kkt_residual: Float[Array, ""]
    multipliers: Float[Array, " n"]
    candidates: Float[Array, "K dim"]
    objectives: Float[Array, " K"]
    depth: int = eqx.field(static=True)
    norm: str = eqx.field(static=True)
    method: str = eqx.field(static=True)
    starts: tuple = eqx.field(static=True)


def max_margin(
    X, y, *, depth: int, norm: str = "l2/L", key=None, num_starts: int = 8, tol: float = 1e-8
) -> MaxMargin:
    """The max-margin direction that logistic/exponential flows of a depth-L network approach.

    **Arguments:**

    - `X`, `y`: data `(n, dim)` and labels ±1 `(n,)`, linearly separable through the origin.
    - `depth`: L >= 2.
    - `norm`: `"l2/L"` (default): min ||theta||_{2/L} s.t. y_n <x_n, theta> >= 1, the rich
        limit — at depth 2 the l1 max-margin by a linear program (scipy's HiGHS); at depth
        >= 3 a KKT point, by iteratively reweighted l1 (a sequence of LPs) from several
        starts (the l1 and l2 solutions and `num_starts` random reweightings drawn from
        `key`), each polished to its vertex — or, for small problems (C(n + dim, dim) <=
        20000), by enumerating every vertex of the feasible set: then `candidates` are all
        the KKT points (local minima) and `theta` is the global minimiser. `"l2"`: the
        hard-margin SVM (the kernel limit of large initializations u^j(0) = alpha 1,
        u^L(0) = 0).
    - `key`: a PRNG key for the random starts (None: only the two deterministic ones).
    - `tol`: KKT residual below which a point counts as a KKT point.

    **Returns:** a `MaxMargin`.

    **Raises:** `ValueError` if `X`, `y` are not linearly separable through the origin, or on
    bad arguments. A depth >= 3 search whose starts reach no KKT point warns and returns
    the point of least residual.
    """
    depth = check_depth(depth)
    if norm not in _NORMS:
        raise ValueError(f"`norm` must be one of {_NORMS}, got {norm!r}.")
    Z = _margin_matrix(X, y)
    if norm == "l2":
        th = _svm(Z)
        res, lam = _residual_np(th, Z, 1)
        return _result(
            th,
            [th],
            [float(th @ th)],
            res,
            lam,
            depth,
            norm,
            "svm-dual-slsqp+active-set",
            ("dual",),
            1,
        )
    l1 = _polish_vertex(Z, _weighted_l1(Z, np.ones(Z.shape[1])))
    if depth == 2:
        res, lam = _residual_np(l1, Z, 2)
        return _result(
            l1, [l1], [float(np.abs(l1).sum())], res, lam, depth, norm, "linprog-highs", ("l1",), 2
        )
    return _search(Z, depth, l1, key, num_starts, tol, norm)


_ENUMERATE_LIMIT = 20_000  # vertex candidates (support, active set) checked exhaustively


def _enumerate(Z, depth, tol):
    """Every KKT vertex: supports S and active sets A with |S| = |A|, Z_AS theta_S = 1,
    feasible, and multipliers Z_AS^{-T} p sign(theta_S)|theta_S|^{p-1} >= 0. The local minima
    of the concave objective on each orthant are vertices, so the least of these is the
    global minimiser (for non-degenerate data)."""
    n, d = Z.shape
    p = 2.0 / depth
    found = []
    for k in range(1, min(n, d) + 1):
        for S in itertools.combinations(range(d), k):
            A = np.array(list(itertools.combinations(range(n), k)))
            M = Z[:, S][A]  # (C(n,k), k, k)
            ok = np.abs(np.linalg.det(M)) > 1e-12 * np.max(np.abs(Z)) ** k
            if not ok.any():
                continue
            M = M[ok]
            tS = np.linalg.solve(M, np.ones(M.shape[:2])[..., None])[..., 0]
            th = np.zeros((len(M), d))
            th[:, S] = tS
            feas = np.min(th @ Z.T, axis=1) >= 1.0 - 1e-10
            grad = p * np.sign(tS) * np.abs(tS) ** (p - 1.0)
            lam = np.linalg.solve(np.swapaxes(M, 1, 2), grad[..., None])[..., 0]
            keep = feas & np.all(lam >= -tol * np.abs(lam).max(axis=1, keepdims=True), axis=1)
            found += list(th[keep])
    unique = []
    for th in found:
        if not any(np.allclose(th, u, rtol=1e-9, atol=1e-12) for u in unique):
            unique.append(th)
    return unique


def _search(Z, depth, l1, key, num_starts, tol, norm):
    p = 2.0 / depth
    if math.comb(sum(Z.shape), Z.shape[1]) <= _ENUMERATE_LIMIT:
        found = _enumerate(Z, depth, tol)
        objectives = [float(np.sum(np.abs(c) ** p)) for c in found]
        order = np.argsort(objectives)
        found = [found[i] for i in order]
        res, lam = _residual_np(found[0], Z, depth)
        return _result(
            found[0],
            found,
            [objectives[i] for i in order],
            res,
            lam,
            depth,
            norm,
            "vertex-enumeration",
            ("all vertices",) * len(found),
            depth,
        )
    starts = [("l1", l1), ("l2", _svm(Z))]
    if key is not None:
        w = np.asarray(jnp.exp(jr.normal(key, (num_starts, Z.shape[1]))))
        starts += [(f"random{k}", _weighted_l1(Z, w[k])) for k in range(num_starts)]
    found, labels, best = [], [], None
    for name, start in starts:
        th, _ = _irl1(Z, p, start)
        res, lam = _residual_np(th, Z, depth)
        if best is None or res < best[1]:
            best = (th, res, lam)
        if res > tol:
            continue
        for k, other in enumerate(found):
            if np.allclose(th, other, rtol=1e-7, atol=1e-9 * np.max(np.abs(th))):
                labels[k] += (name,)
                break
        else:
            found.append(th)
            labels.append((name,))
    if not found:
        warnings.warn(
            f"max_margin: no start reached a KKT point (best residual {best[1]:.3g});"
            " returning the point of least residual.",
            RuntimeWarning,
            stacklevel=3,
        )
        found, labels = [best[0]], [("best",)]
    objectives = [float(np.sum(np.abs(c) ** p)) for c in found]
    order = np.argsort(objectives)
    found = [found[i] for i in order]
    res, lam = _residual_np(found[0], Z, depth)
    return _result(
        found[0],
        found,
        [objectives[i] for i in order],
        res,
        lam,
        depth,
        norm,
        "irl1-linprog-highs",
        tuple("+".join(labels[i]) for i in order),
        depth,
    )


def _result(th, cands, objs, res, lam, depth, norm, method, starts, norm_depth):
    th = jnp.asarray(th)
    mg = (
        1.0 / float(_quasi_norm(th, norm_depth))
        if norm_depth > 1
        else 1.0 / float(jnp.linalg.norm(th))
    )
    return MaxMargin(
        theta=th,
        direction=th / jnp.linalg.norm(th),
        margin=jnp.asarray(mg),
        kkt_residual=jnp.asarray(res),
        multipliers=jnp.asarray(lam),
        candidates=jnp.asarray(np.stack(cands)),
        objectives=jnp.asarray(objs),
        depth=depth,
        norm=norm,
        method=method,
        starts=starts,
    )


class MarginPath(eqx.Module):
    """Margins along a classification flow (`dd.margin_along`), at the trajectory's saves.

    **Fields:**

    - `ts`: the trajectory's save times (log times tau for a `time="log"` flow).
    - `log_loss`: log L(theta(t)), stable where `traj.loss` underflows to 0.
    - `margin`: `dd.margin` of theta(t), min_n y_n <x_n, theta> / ||theta||_{2/L}.
    - `normalized_margin`: Lyu & Li's q_min / ||u||_2^L of the layers.
    - `smoothed_margin`: Lyu & Li's g(log 1/L) / ||u||_2^L (g(s) = s for the exponential
        loss, -log(expm1(e^{-s})) for the logistic): the quantity they prove
        non-decreasing once L < l(0) (1 or log 2); NaN before.
    - `angle`: the angle (radians) between theta(t) and `target`.
    - `kkt_residual`: `dd.kkt_residual` of theta(t).
    - `target`: the direction compared with (a `dd.max_margin` direction by default).
    """

    ts: Float[Array, " T"]
    log_loss: Float[Array, " T"]
    margin: Float[Array, " T"]
    normalized_margin: Float[Array, " T"]
    smoothed_margin: Float[Array, " T"]
    angle: Float[Array, " T"]
    kkt_residual: Float[Array, " T"]
    target: Float[Array, " dim"]


def margin_along(traj, problem, target=None) -> MarginPath:
    """Margins, angle to the predicted direction and KKT residual along a flow.

    **Arguments:**

    - `traj`: a `Trajectory` of `dd.gradient_flow` (layers `(T, depth, dim)`).
    - `problem`: the `dd.Logistic` or `dd.Exponential` loss it was run on.
    - `target`: a `MaxMargin` or a direction `(dim,)`; default `dd.max_margin(X, y,
        depth=L)` (the rich limit).

    **Returns:** a `MarginPath`.
    """
    if not isinstance(problem, (Logistic, Exponential)):
        raise TypeError(
            f"`problem` must be `dd.Logistic` or `dd.Exponential`, got {type(problem).__name__}."
        )
    layers = jnp.asarray(traj.layers)
    if layers.ndim != 3:
        raise ValueError(
            "`traj` must be one trajectory with layers (T, depth, dim), got shape "
            f"{tuple(layers.shape)} (index a batch first)."
        )
    depth = layers.shape[1]
    X, y = problem.X, problem.y
    if target is None:
        target = max_margin(X, y, depth=depth)
    target = jnp.asarray(target.direction if isinstance(target, MaxMargin) else target)
    theta = jnp.asarray(traj.theta)
    log_loss = jax.vmap(problem.log_loss)(theta)
    rho_l = jnp.sum(layers**2, axis=(1, 2)) ** (depth / 2.0)
    qmin = jnp.min(y * (theta @ X.T), axis=-1)
    cos = theta @ target / (jnp.linalg.norm(theta, axis=-1) * jnp.linalg.norm(target))
    Z = _margin_matrix(X, y)
    res = [_residual_np(t, Z, depth)[0] for t in np.asarray(theta)]
    return MarginPath(
        ts=jnp.asarray(traj.ts),
        log_loss=log_loss,
        margin=margin(theta, X, y, depth),
        normalized_margin=qmin / rho_l,
        smoothed_margin=_smoothed(problem, log_loss) / rho_l,
        angle=jnp.arccos(jnp.clip(cos, -1.0, 1.0)),
        kkt_residual=jnp.asarray(res),
        target=target,
    )


def _smoothed(problem, log_loss):
    """g(log 1/L): log 1/L (exponential); -log(expm1(L)) (logistic), from log L without
    underflow; NaN where L >= l(0) (Lyu & Li's condition)."""
    if isinstance(problem, Exponential):
        return jnp.where(log_loss < 0.0, -log_loss, jnp.nan)
    x = jnp.exp(log_loss)
    small = log_loss < -20.0
    xs = jnp.where(small, 1.0, x)
    # log(expm1(x)) = log x + log(expm1(x)/x), the last term ~ x/2 for small x
    log_expm1 = jnp.where(small, log_loss + x / 2.0, jnp.log(jnp.expm1(xs)))
    return jnp.where(log_loss < jnp.log(jnp.log(2.0)), -log_expm1, jnp.nan)
