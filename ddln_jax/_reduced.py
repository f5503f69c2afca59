"""The flow under Assumption (A) in fewer variables (Section 2.1, DESIGN §2).

Per coordinate i, v^1_i is the layer of minimal |u^k_i(0)| and, by the conservation law,
v^j = sign(v^j(0)) sqrt(v1^2 + Delta_j) with Delta_j = v^j(0)^2 - v^1(0)^2 > 0 (j >= 2).
Hence theta = s v1 prod_{j>=2} sqrt(v1^2 + Delta_j) with s = sign(prod_{j>=2} v^j(0)) (the
paper's printed formula takes |v1| and is wrong once v1 changes sign), and the metric
M_ii = sum_j prod_{k != j} (v^k)^2 depends on w = v1^2 alone.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._flow import (
    DEFAULT_MAX_STEPS,
    Trajectory,
    check_problem_dim,
    check_times,
    check_tolerances,
    diffeq,
    gradient_flow,
    resolve_solver,
    warn_if_failed,
)
from ._loss import as_problem
from ._network import check_assumption_a, from_reduced, minimal_layer, to_reduced
from ._validate import check_layers, is_traced


class ReducedInit(eqx.Module):
    """What the reduced dynamics need from an (A) initialization.

    - `k`: argmin layer per coordinate `(dim,)`.
    - `a`: v^1(0) `(dim,)`.
    - `deltas`: Delta_j for j = 2..L, `(depth - 1, dim)`, all > 0 under (A).
    - `signs`: sign(v^j(0)) for j = 2..L, `(depth - 1, dim)`.
    - `s`: prod of `signs` `(dim,)`.
    """

    k: Int[Array, " dim"]
    a: Float[Array, " dim"]
    deltas: Float[Array, "depth_1 dim"]
    signs: Float[Array, "depth_1 dim"]
    s: Float[Array, " dim"]

    @property
    def depth(self) -> int:
        return self.deltas.shape[0] + 1


def reduced_init(layers0: Float[Array, "depth dim"]) -> ReducedInit:
    """Permute to v (Section 2.1) and collect Delta_j, the signs and v^1(0)."""
    k = minimal_layer(layers0)
    v0 = to_reduced(layers0, k)
    a = v0[0]
    deltas = v0[1:] ** 2 - a**2
    signs = jnp.where(v0[1:] >= 0, 1.0, -1.0).astype(v0.dtype)
    return ReducedInit(k=k, a=a, deltas=deltas, signs=signs, s=jnp.prod(signs, axis=0))


def theta_from_v1(v1, red: ReducedInit):
    """theta = s v1 prod_{j>=2} sqrt(v1^2 + Delta_j) (corrected formula after eq 6)."""
    return red.s * v1 * jnp.prod(jnp.sqrt(v1**2 + red.deltas), axis=0)


def layers_from_v1(v1, red: ReducedInit):
    """All layers from v1: v^j = sign(v^j(0)) sqrt(v1^2 + Delta_j), then the inverse
    permutation back to u."""
    rest = red.signs * jnp.sqrt(v1**2 + red.deltas)
    return from_reduced(jnp.concatenate([v1[None], rest], axis=0), red.k)


def metric_from_w(w, deltas):
    """M_ii = sum_j prod_{k != j} (w + Delta_k), Delta_1 = 0, as a function of w = v1^2."""
    factors = w + deltas
    prod_rest = jnp.prod(factors, axis=0)
    # sum_{j>=2} w prod_{k>=2, k != j} (w + Delta_k), without division (factors may vanish).
    depth_1 = deltas.shape[0]
    others = jnp.stack(
        [jnp.prod(jnp.delete(factors, j, axis=0, assume_unique_indices=True), axis=0)
         for j in range(depth_1)]
    )
    return prod_rest + w * jnp.sum(others, axis=0)


def w_from_theta(theta, deltas, iterations: int = 60):
    """Solve w prod_{j>=2} (w + Delta_j) = theta^2 for w = v1^2 >= 0.

    Newton in x = log w on g(x) = x + sum_j log(e^x + Delta_j) - log theta^2, which is
    increasing (g' in [1, L]) and convex, so Newton converges from any start; it starts
    from the larger of the small-w and large-w asymptotic roots.
    """
    t2 = theta**2
    safe = t2 > 0
    log_t2 = jnp.log(jnp.where(safe, t2, 1.0))
    depth = deltas.shape[0] + 1
    x_small = log_t2 - jnp.sum(jnp.log(deltas), axis=0)
    x_large = log_t2 / depth
    x0 = jnp.maximum(x_small, x_large)

    def body(_, x):
        ex = jnp.exp(x)
        g = x + jnp.sum(jnp.log(ex + deltas), axis=0) - log_t2
        gp = 1.0 + jnp.sum(ex / (ex + deltas), axis=0)
        return x - g / gp

    x = jax.lax.fori_loop(0, iterations, body, x0)
    return jnp.where(safe, jnp.exp(x), 0.0)


def v1_from_theta(theta, red: ReducedInit):
    """Invert theta_from_v1: sign(v1) = sign(theta) s, |v1| = sqrt(w)."""
    w = w_from_theta(theta, red.deltas)
    return jnp.sign(theta) * red.s * jnp.sqrt(w)


def _require_a(layers0, what):
    if is_traced(layers0):
        ok = check_assumption_a(layers0)
        return eqx.error_if(layers0, ~jnp.all(ok), f"{what} needs Assumption (A).")
    try:
        check_assumption_a(layers0, strict=True)
    except ValueError as e:
        raise ValueError(f"{what} needs Assumption (A). {e}") from None
    return layers0


def _mirror_field(t, y, args):
    theta, _ = y
    problem, red = args
    g = jax.grad(problem.loss)(theta)
    m = metric_from_w(w_from_theta(theta, red.deltas), red.deltas)
    return -m * g, -g


def _reduced_field(t, y, args):
    v1, _ = y
    problem, red = args
    g = jax.grad(problem.loss)(theta_from_v1(v1, red))
    return -red.s * jnp.prod(jnp.sqrt(v1**2 + red.deltas), axis=0) * g, -g


@eqx.filter_jit
def _solve_reduced(layers0, problem, t0, t1, ts, solver, rtol, atol, max_steps, mirror):
    red = reduced_init(layers0)
    if mirror:
        field, y0 = _mirror_field, (theta_from_v1(red.a, red), jnp.zeros_like(red.a))
    else:
        field, y0 = _reduced_field, (red.a, jnp.zeros_like(red.a))
    (state, xi), result, num_steps, ok, t_final = diffeq(
        field, y0, (problem, red), t0=t0, t1=t1, ts=ts, solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps,
    )
    if mirror:
        theta = state
        v1 = jax.vmap(lambda th: v1_from_theta(th, red))(theta)
    else:
        v1 = state
        theta = jax.vmap(lambda v: theta_from_v1(v, red))(v1)
    return Trajectory(
        ts=ts,
        layers=jax.vmap(lambda v: layers_from_v1(v, red))(v1),
        theta=theta,
        xi=xi,
        loss=jax.vmap(problem.loss)(theta),
        layers0=layers0,
        result=result,
        num_steps=num_steps,
        ok=ok,
        t_final=t_final,
    )


def _prepare(layers0, problem, t0, t1, ts, rtol, atol, max_steps, what):
    problem = as_problem(problem)
    layers0 = check_layers(layers0)
    check_problem_dim(problem, layers0.shape[1])
    layers0 = _require_a(layers0, what)
    t0, t1, ts = check_times(t0, t1, ts)
    check_tolerances(rtol, atol, max_steps)
    return layers0, problem, t0, t1, ts


def mirror_flow(
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
) -> Trajectory:
    """The flow in theta-space, theta' = -M(theta) grad L(theta) (eq 10-11).

    Under (A), M_ii = sum_j prod_{k != j} (u^k_i)^2 depends on theta_i and the
    initialization alone: w = v1^2 solves w prod_{j>=2}(w + Delta_j) = theta^2 (see
    `w_from_theta`). The layers are rebuilt from theta. Arguments and result as
    `gradient_flow`.

    **Raises:** `ValueError` if `layers0` violates Assumption (A).
    """
    layers0, problem, t0, t1, ts = _prepare(
        layers0, problem, t0, t1, ts, rtol, atol, max_steps, "`mirror_flow`"
    )
    traj = _solve_reduced(
        layers0, problem, t0, t1, ts, resolve_solver(solver), jnp.asarray(rtol),
        jnp.asarray(atol), max_steps, True,
    )
    warn_if_failed(traj, "mirror_flow")
    return traj


def reduced_gap(layers0: Float[Array, "depth dim"]) -> Float[Array, ""]:
    """min over coordinates and j >= 2 of Delta_j / max_k u^k_i(0)^2: how close a
    coordinate is to violating (A). Small gaps make the reduced ODE nearly singular."""
    red = reduced_init(layers0)
    scale = jnp.maximum(jnp.max(layers0**2, axis=0), jnp.finfo(layers0.dtype).tiny)
    return jnp.min(red.deltas / scale)


def reduced_flow(
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
    gap_tol: float = 1e-4,
) -> Trajectory:
    """The d-dimensional flow of v^1 (eq 6), all layers rebuilt by the conservation law.

    dv1/dt = -s prod_{j>=2} sqrt(v1^2 + Delta_j) grad L(theta(v1)). When two layers start
    almost equal in |u_i(0)| (relative gap `reduced_gap(layers0) < gap_tol`) the square roots
    have a kink of width sqrt(Delta) where v1 crosses zero and the reduced ODE is nearly
    singular; then the full `gradient_flow` is solved instead, with a warning (outside of
    jit/vmap; under a trace no fall-back is possible and the reduced ODE is solved).

    **Raises:** `ValueError` if `layers0` violates Assumption (A).
    """
    layers0, problem, t0, t1, ts = _prepare(
        layers0, problem, t0, t1, ts, rtol, atol, max_steps, "`reduced_flow`"
    )
    if not is_traced(layers0):
        gap = float(reduced_gap(layers0))
        if gap < gap_tol:
            warnings.warn(
                f"reduced_flow: two layers start almost equal in |u_i(0)| (relative gap "
                f"{gap:.2e} < gap_tol={gap_tol:g}); the reduced ODE is nearly singular, so the "
                "full layer flow (`gradient_flow`) is solved instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            return gradient_flow(
                layers0, problem, t1=t1, ts=ts, t0=t0, solver=solver, rtol=rtol, atol=atol,
                max_steps=max_steps,
            )
    traj = _solve_reduced(
        layers0, problem, t0, t1, ts, resolve_solver(solver), jnp.asarray(rtol),
        jnp.asarray(atol), max_steps, False,
    )
    warn_if_failed(traj, "reduced_flow")
    return traj
