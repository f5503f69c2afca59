"""Geometry of the flow: the metric M = J_G J_G^T (eq 10-11), sigma (eq 13), Theorem 2,
conservation laws (Prop 1) and zero crossings."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ._loss import as_problem
from ._network import theta as product_theta
from ._solve import dense_solution, layer_vector_field
from ._trajectory import Trajectory
from ._validate import check_depth, check_layers


def metric(layers, parameterization: Callable | None = None) -> Float[Array, "dim dim"]:
    """M = J_G J_G^T, J_G = `jax.jacfwd` of the parameterization G: layers -> theta.

    Generic: works for any parameterization of any pytree (default: the DDLN product, for
    which M = diag(sum_j prod_{k != j} (u^k)^2), eq 11). Then theta' = -M grad L.
    """
    parameterization = product_theta if parameterization is None else parameterization
    flat, unravel = ravel_pytree(layers)
    jac = jax.jacfwd(lambda f: parameterization(unravel(f)))(flat)
    return jac @ jac.T


def metric_diag(layers: Float[Array, "depth dim"]) -> Float[Array, " dim"]:
    """sum_j prod_{k != j} (u^k)^2 per coordinate (the diagonal of M for the DDLN, eq 11),
    with prefix/suffix products so that zero layers are handled exactly."""
    sq = layers**2
    ones = jnp.ones_like(sq[:1])
    prefix = jnp.cumprod(jnp.concatenate([ones, sq[:-1]], axis=0), axis=0)
    suffix = jnp.flip(jnp.cumprod(jnp.concatenate([ones, jnp.flip(sq, 0)[:-1]], 0), 0), 0)
    return jnp.sum(prefix * suffix, axis=0)


def metric_along(traj: Trajectory, parameterization: Callable | None = None):
    """M(t) at every saved time, `(T, dim, dim)`."""
    return jax.vmap(lambda u: metric(u, parameterization))(traj.layers)


def lambda_min_along(traj: Trajectory, parameterization: Callable | None = None):
    """lambda_min(M(t)) at every saved time, `(T,)`."""
    return jnp.min(jnp.linalg.eigvalsh(metric_along(traj, parameterization)), axis=-1)


def sigma(layers0: Float[Array, "depth dim"], depth=None) -> Float[Array, ""]:
    """sigma = min_i prod_{k != k_i} (u^k_i(0)^2 - u^{k_i}_i(0)^2) (eq 13), the lower bound on
    lambda_min(M(t)) for all t. It is 0 when Assumption (A) fails.

    With `depth` (may be traced), only the first `depth` rows are layers: the others are
    padding (as in `dd.sweep`'s padded networks) and are ignored."""
    layers0 = check_layers(layers0)
    rows = jnp.arange(layers0.shape[0])[:, None]
    real = jnp.ones_like(rows, bool) if depth is None else rows < depth
    sq = jnp.where(real, layers0**2, jnp.inf)
    k = jnp.argmin(sq, axis=0)
    smin = jnp.take_along_axis(sq, k[None], axis=0)
    factors = jnp.where((rows == k[None]) | ~real, 1.0, sq - smin)
    return jnp.min(jnp.prod(factors, axis=0))


def corollary1_sigma(alpha, ubar, depth: int) -> Float[Array, ""]:
    """(alpha^2 lambda)^(L-1) with lambda = min_i ubar_i^2 (Corollary 1, the Yun init)."""
    depth = check_depth(depth)
    lam = jnp.min(jnp.asarray(ubar) ** 2)
    return (jnp.asarray(alpha) ** 2 * lam) ** (depth - 1)


def theorem2_bound(layers0, problem, ts) -> Float[Array, " T"]:
    """exp(-2 sigma mu t) (L(theta0) - L*) (Theorem 2), with mu = `problem.pl_constant` and
    L - L* from `problem.suboptimality` (no cancellation)."""
    layers0 = check_layers(layers0)
    s0 = problem.suboptimality(product_theta(layers0))
    return jnp.exp(-2.0 * sigma(layers0) * problem.pl_constant * jnp.asarray(ts)) * s0


def empirical_rate(ts, suboptimality, rel_floor: float = 1e-12) -> float:
    """The average exponential rate r = -log(s(t*) / s(t_0)) / (t* - t_0) of the
    suboptimality s, at the last saved t* where s(t*) > rel_floor * s(t_0) (below that the
    curve reflects round-off). Theorem 2 says r >= 2 sigma mu."""
    ts, s = np.asarray(ts, float), np.asarray(suboptimality, float)
    if s[0] <= 0:
        return float("inf")
    above = np.flatnonzero(s > rel_floor * s[0])
    last = above[-1]
    if last == 0:
        last = min(1, len(s) - 1)
    return float(-np.log(max(s[last], 1e-300) / s[0]) / (ts[last] - ts[0]))


def conservation_residual(traj: Trajectory) -> Float[Array, ""]:
    """max_{t, i, j, k} |((u^j)^2 - u^j(0)^2) - ((u^k)^2 - u^k(0)^2)|: zero for the exact flow
    (Prop 1, eq 5)."""
    d = traj.layers**2 - traj.layers0**2
    return jnp.max(jnp.max(d, axis=-2) - jnp.min(d, axis=-2))


class ZeroCrossing(NamedTuple):
    coordinate: int
    layer: int
    time: float


def zero_crossings(traj: Trajectory, problem=None, *, rtol=1e-11, atol=1e-13):
    """Sign changes of each u^j_i between saved times.

    Under (A) only the argmin layer k_i can cross zero (Prop 1.2). Each crossing is
    bracketed by the save times; without `problem` its time is linearly interpolated, with
    `problem` (the one the trajectory solved) it is refined by re-solving the layer flow over
    the bracket with dense output and bisecting on u^j_i (accurate to the tolerances).

    **Returns:** a list of `ZeroCrossing(coordinate, layer, time)`, sorted by coordinate, time.
    """
    ts = np.asarray(traj.ts)
    u = np.asarray(traj.layers)
    out = []
    a, b = u[:-1], u[1:]
    t_idx, j_idx, i_idx = np.nonzero(a * b < 0)
    for t, j, i in zip(t_idx, j_idx, i_idx):
        if problem is None:
            frac = a[t, j, i] / (a[t, j, i] - b[t, j, i])
            time = float(ts[t] + frac * (ts[t + 1] - ts[t]))
        else:
            time = float(
                _refine_crossing(
                    traj.layers[t], as_problem(problem), traj.ts[t], traj.ts[t + 1],
                    int(j), int(i), jnp.asarray(rtol), jnp.asarray(atol),
                )
            )
        out.append(ZeroCrossing(int(i), int(j), time))
    return sorted(out, key=lambda z: (z.coordinate, z.time))


@eqx.filter_jit
def _refine_crossing(layers_a, problem, ta, tb, j, i, rtol, atol):
    y0 = (layers_a, jnp.zeros_like(layers_a[0]))
    sol = dense_solution(layer_vector_field(product_theta), y0, problem, ta, tb, rtol, atol)

    def value(t):
        return sol.evaluate(t)[0][j, i]

    sign_a = jnp.sign(layers_a[j, i])

    def bisect(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        same = jnp.sign(value(mid)) == sign_a
        return jnp.where(same, mid, lo), jnp.where(same, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 60, bisect, (ta, tb))
    return 0.5 * (lo + hi)
