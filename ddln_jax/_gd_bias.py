"""Where gradient descent and SGD end at a finite step size (DESIGN §8, docs/maths.md
"Discrete time: GD and SGD limits").

A step u^j <- u^j - gamma P_j ⊙ g (P_j = prod_{l != j} u^l, g the minibatch gradient) has
u^j P_j = theta for every j, hence the exact per-step law
    (u^j)^2 - (u^k)^2 <- [(u^j)^2 - (u^k)^2] ⊙ (1 - gamma^2 g^2 prod_{l != j,k} (u^l)^2):
the flow's invariants Delta_j drift. In the reduced variables (v^1 the minimal layer,
h(v) = prod_{j>=2} sqrt(v^2 + Delta_j)), G(v) = int_{a0}^{v} dv / h and xi = -sum gamma g,
the quantity b = G(v^1) - s xi is constant along the flow and changes per step by
-gamma^2 g^2 h'(v^1) / 2 + sum_j dG/dDelta_j dDelta_j + O(gamma^3). The end point is then
exactly the flow's implicit bias from the *effective* initialization (v^1 = a_eff with
G_{Delta_inf}(a_eff) = b_inf, invariants Delta_inf), the mirror map of `dd.MirrorMap`.
From a run, Delta_inf and b_inf are read off its last iterate (an identity); ahead of
time they are integrated along one gradient flow to first order in gamma.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ._bias import ImplicitBias, _independent_rows, _problem_data, _vector, implicit_bias
from ._loss import LeastSquares, check_batch_size
from ._mirror import MirrorMap, TiedMirrorMap
from ._network import check_assumption_a, reduced_init, to_reduced
from ._parameterize import _difference, _tied
from ._solve import diffeq, resolve_solver
from ._trajectory import Trajectory
from ._validate import check_int, check_layers, check_positive, check_tolerances


class GDBias(eqx.Module):
    """Result of `gd_bias`: the predicted limit of GD/SGD at one step size.

    - `theta`: the predicted limit (an interpolator).
    - `layers0_eff`: the effective initialization `(depth, dim)`: the flow from it ends at
        `theta` (`dd.implicit_bias(layers0_eff, problem).theta == theta`).
    - `log_shrink`: ln(Delta_j(eff) / Delta_j(0)), `(depth - 1, dim)`, the drift of the
        invariants (v^j)^2 - (v^1)^2 (v^1 the minimal layer of each coordinate). At depth 2
        it is -sum_k q(gamma g_k), q(x) = -ln|1 - x^2| (Even et al.'s gains), and the
        effective scale is alpha_inf = alpha exp(log_shrink / 2).
    - `alpha_ratio`: exp(log_shrink / 2), `(depth - 1, dim)` (alpha_inf / alpha at depth 2).
    - `bias`: the `dd.ImplicitBias` solve from the effective init (residual, dual variable).
    - `converged`: the prediction is valid: the flow (ahead of time) or the run (from a
        trajectory) converged, the effective init exists and the dual Newton converged.
    - `method`: `"flow"` (ahead of time, first order in gamma) or `"run"` (read from a run).
    """

    theta: Float[Array, " dim"]
    layers0_eff: Float[Array, "depth dim"]
    log_shrink: Float[Array, "depth_1 dim"]
    alpha_ratio: Float[Array, "depth_1 dim"]
    bias: ImplicitBias
    converged: Bool[Array, ""]
    method: str = eqx.field(static=True)


def step_factors(layers, grad, step_size) -> Float[Array, "depth depth dim"]:
    """The exact per-step factors of the invariants: F[j, k] = 1 - gamma^2 g^2
    prod_{l != j, k} (u^l)^2, so that one GD/SGD step with gradient `grad` (the minibatch
    gradient w.r.t. theta) maps (u^j)^2 - (u^k)^2 to [(u^j)^2 - (u^k)^2] ⊙ F[j, k].
    (The diagonal F[j, j], with the product over l != j, has no such meaning.)"""
    layers = check_layers(layers, "layers")
    depth = layers.shape[0]
    sq = layers**2
    eye = jnp.eye(depth, dtype=bool)
    keep = ~(eye[:, None, :] | eye[None, :, :])  # keep[j, k, l] = l not in {j, k}
    prods = jnp.prod(jnp.where(keep[..., None], sq[None, None], 1.0), axis=2)
    return 1.0 - (step_size * grad) ** 2 * prods


def _expected_grad_sq(problem, theta, batch_size):
    """E[g_B^2] per coordinate for minibatches of `batch_size` rows drawn without
    replacement, g_B = (n/b) 2 X_B^T r_B (`dd.train`'s unbiased minibatch gradient)."""
    z = 2.0 * problem.X * (problem.X @ theta - problem.y)[:, None]  # rows' gradients
    full = jnp.sum(z, axis=0)
    if batch_size is None:
        return full**2
    n, b = problem.X.shape[0], batch_size
    sq = jnp.sum(z**2, axis=0)
    pair = 0.0 if n == 1 else b * (b - 1) / (n * (n - 1))
    return (n / b) ** 2 * (b / n * sq + pair * (full**2 - sq))


@eqx.filter_jit
def _flow_gains(layers0, problem, batch_size, t1, solver, rtol, atol, max_steps, gtol):
    """One gradient flow with the first-order drift integrals beside it:
    A_j = int E[g^2] prod_{l != 1, j} (v^l)^2 dt (so ln Delta_j(eff) = ln Delta_j - gamma A_j)
    and C = int E[g^2] (-h'(v^1)/2 + sum_j Delta_j prod_{l != 1, j} (v^l)^2 I_j / 2) dt with
    I_j = int_{a0}^{v^1} dv / (h (v^2 + Delta_j)) (so b_inf = gamma C)."""
    red = reduced_init(layers0)

    def field(t, y, args):
        layers, xi, acc_a, acc_i, acc_c = y
        theta = jnp.prod(layers, axis=0)
        g = problem.grad(theta)
        v = to_reduced(layers, red.k)
        rest = v[1:] ** 2  # (v^j)^2, j >= 2, all > 0 under (A)
        prod_rest = jnp.prod(rest, axis=0)
        h = jnp.sqrt(prod_rest)
        w = prod_rest / rest  # prod_{l != 1, j} (v^l)^2
        g2 = _expected_grad_sq(problem, theta, batch_size)
        dh = h * jnp.sum(v[0] / rest, axis=0)
        d_a = g2 * w
        d_i = -red.s * g / rest
        d_c = g2 * (-0.5 * dh + 0.5 * jnp.sum(red.deltas * w * acc_i, axis=0))
        return _layer_rhs(layers, g), -g, d_a, d_i, d_c

    zeros = jnp.zeros_like(red.deltas)
    y0 = (layers0, jnp.zeros_like(red.a), zeros, zeros, jnp.zeros_like(red.a))
    ts = jnp.asarray([t1])
    ys, result, steps, ok, t_final = diffeq(
        field,
        y0,
        None,
        t0=0.0,
        t1=t1,
        ts=ts,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        gtol=gtol,
        stop_on=lambda f: f[1],
    )
    layers, xi, acc_a, _, acc_c = (x[-1] for x in ys)
    return red, layers, acc_a, acc_c, ok


def _layer_rhs(layers, g):
    """du^j/dt = -prod_{l != j} u^l ⊙ g, without dividing by a (possibly zero) layer."""
    depth = layers.shape[0]
    eye = jnp.eye(depth, dtype=bool)
    prods = jnp.prod(jnp.where(eye[:, :, None], 1.0, layers[None]), axis=1)
    return -prods * g


@eqx.filter_jit
def _effective_map(a0, deltas_eff, s, b):
    """The mirror map with invariants `deltas_eff` whose origin a_eff solves
    int_{a0}^{a_eff} dv / h = b (h built from `deltas_eff`); and whether it exists."""
    anchor = MirrorMap(a=a0, deltas=deltas_eff, s=jnp.ones_like(s))
    z = anchor._z_of_xi(b)
    a_eff = anchor._v(z)
    err = jnp.abs(anchor._F(z) - b)
    ok = jnp.all(jnp.isfinite(a_eff)) & jnp.all(err <= 1e-9 * (1.0 + jnp.abs(b)))
    return MirrorMap(a=a_eff, deltas=deltas_eff, s=s), ok


def _layers_from(m: MirrorMap, signs, k):
    """Layers (depth, dim) of the init (a, Delta) with the layers j >= 2 of signs `signs`,
    in the original layer order."""
    v = jnp.concatenate([m.a[None], signs * jnp.sqrt(m.a**2 + m.deltas)], axis=0)
    return to_reduced(v, k)


def gd_bias(
    layers0,
    problem,
    step_size,
    *,
    batch_size: int | None = None,
    trajectory: Trajectory | None = None,
    parameterization=None,
    t1=1e6,
    rtol=1e-10,
    atol=1e-12,
    gtol=1e-8,
    solver=None,
    max_steps: int = 2**20,
    tol=1e-12,
) -> GDBias:
    """The limit of gradient descent (or SGD with `batch_size`) with step `step_size` on an
    underdetermined least-squares problem, for every depth.

    Ahead of time (`trajectory=None`): one gradient flow from `layers0` carries the drift
    integrals of the invariants; to first order in gamma, ln Delta_j(eff) = ln Delta_j -
    gamma int g^2 prod_{l != 1, j} (v^l)^2 dt and the effective origin moves by gamma C
    (docs/maths.md); the prediction is the flow's implicit bias from that effective init.
    With `batch_size`, g^2 is its expectation over minibatches (the expected SGD gains).
    Its error is O(gamma^2) against O(gamma) for the flow's own bias.

    From a run (`trajectory=` a `dd.train(layers0, problem, step_size, ...)` result, plain
    GD/SGD with the default `time_per_step`): the invariants and the origin are read from
    its last iterate and its xi, so the effective init is the one that run realised and
    the limit it implies; at depth 2 this is Even et al.'s effective initialization.

    **Arguments:** `layers0` `(depth, dim)` satisfying Assumption (A); `problem` a
    `dd.LeastSquares`; `step_size` gamma > 0; `t1`, `rtol`, `atol`, `gtol`, `solver`,
    `max_steps` of the flow (it stops once ||grad L||_inf <= gtol); `tol` of the dual
    Newton of `dd.implicit_bias`.

    **Returns:** a `GDBias`; a `RuntimeWarning` when `.converged` is False.

    With `parameterization=dd.tied(L)` (`layers0` = u0 > 0, `(dim,)`) or `dd.difference(L)`
    (`layers0` = `(u0, v0)`, both > 0; the tied map on the lifted problem [X, -X]) the same in
    closed form: no invariants, the effective init u0_eff of `dd.TiedMirrorMap` (returned as
    `layers0_eff`; `log_shrink` is then ln(u0_eff^L / u0^L), shape `(1, dim)`, `(1, 2 dim)`
    for [u; v]).

    **Raises:** `ValueError` for a step size <= 0, a diverged `trajectory`, an inconsistent
    system, or a `parameterization` other than the product, tied and difference networks.
    """
    _check_problem(problem, "gd_bias")
    if parameterization is not None:
        step_size = _check_step(step_size)
        batch_size = check_batch_size(problem, batch_size)
        flow = (t1, rtol, atol, gtol, solver, max_steps)
        return _tied_bias(
            layers0, problem, step_size, batch_size, trajectory, parameterization, flow, tol
        )
    layers0 = check_layers(layers0)
    check_assumption_a(layers0, strict=True)
    step_size = _check_step(step_size)
    batch_size = check_batch_size(problem, batch_size)
    if trajectory is not None:
        m, signs, log_shrink, ok = _from_run(layers0, problem, step_size, trajectory)
    else:
        check_tolerances(rtol, atol, max_steps)
        check_positive("t1", t1)
        check_positive("gtol", gtol)
        max_steps = check_int("max_steps", max_steps)
        red, _, acc_a, acc_c, ok = _flow_gains(
            layers0,
            problem,
            batch_size,
            jnp.asarray(t1, float),
            resolve_solver(solver),
            jnp.asarray(rtol),
            jnp.asarray(atol),
            max_steps,
            jnp.asarray(gtol),
        )
        m, log_shrink, exists = _predict(red, acc_a, acc_c, step_size)
        signs, ok = red.signs, ok & exists
    method = "flow" if trajectory is None else "run"
    return _finish(m, signs, layers0, problem, log_shrink, ok, tol, method)


def _check_problem(problem, what):
    if not isinstance(problem, LeastSquares):
        raise TypeError(f"`problem` must be a `dd.LeastSquares(X, y)` for `{what}`.")
    _independent_rows(*_problem_data(problem, None))  # raises for an inconsistent system


def _check_step(step_size):
    gamma = np.asarray(step_size, float)
    if gamma.ndim != 0 or not np.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"`step_size` must be a finite number > 0, got {step_size!r}.")
    return jnp.asarray(float(gamma))


@eqx.filter_jit
def _predict(red, acc_a, acc_c, gamma):
    log_shrink = -gamma * acc_a
    m, exists = _effective_map(red.a, red.deltas * jnp.exp(log_shrink), red.s, gamma * acc_c)
    return m, log_shrink, exists


def _check_run(traj, layers0, problem):
    """A single, finished run from `layers0`: an error if it diverged, a warning if it has
    not converged yet."""
    if not isinstance(traj, Trajectory):
        raise TypeError(f"`trajectory` must be a `dd.Trajectory`, got {type(traj).__name__}.")
    if np.asarray(traj.ok).ndim != 0:
        raise ValueError("`trajectory` must be one run, not a batch (index it first).")
    if not bool(traj.ok):
        raise ValueError(
            "`trajectory` did not converge (it diverged): its iterates do not define a limit. "
            "Use a smaller step size."
        )
    if not np.allclose(np.asarray(traj.layers0), np.asarray(layers0), rtol=0, atol=0):
        raise ValueError("`trajectory` was not started from `layers0`.")
    loss = float(traj.loss[-1])
    scale = float(problem.loss(jnp.zeros(problem.dim)))
    if not loss <= 1e-16 * max(scale, 1.0):
        warnings.warn(
            f"gd_bias: the run has not converged (final loss {loss:.3g}); its effective "
            "initialization is still drifting and the implied limit is where it would end "
            "if it drifted no further. Train longer.",
            RuntimeWarning,
            stacklevel=4,
        )


def _from_run(layers0, problem, gamma, traj):
    _check_run(traj, layers0, problem)
    red = reduced_init(layers0)
    v = to_reduced(traj.layers[-1], red.k)
    deltas = v[1:] ** 2 - v[0] ** 2
    if not bool(jnp.all(deltas > 0)):
        raise ValueError(
            "`trajectory`: a layer other than the initially minimal one became the smallest "
            "(an invariant changed sign: the run was unstable); its limit is not the implicit "
            "bias of an effective init of the same layout."
        )
    signs = jnp.where(v[1:] >= 0, 1.0, -1.0)
    s = jnp.prod(signs, axis=0)
    per_step = traj.t_final / traj.num_steps
    xi = traj.xi[-1] * gamma / per_step  # xi = -sum_k gamma g_k
    # a_eff: int_{v1_K}^{a_eff} dv / h = -s xi_K, in the map anchored at the last iterate
    m, ok = _effective_map(v[0], deltas, s, -s * xi)
    return m, signs, jnp.log(deltas / red.deltas), ok


def _finish(m, signs, layers0, problem, log_shrink, ok, tol, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bias = implicit_bias(problem=problem, mirror=m, tol=tol)
    red = reduced_init(layers0)
    converged = ok & bias.converged
    if not bool(converged):
        warnings.warn(
            f"gd_bias ({method}): the prediction did not converge (the "
            + ("flow did not converge or " if method == "flow" else "")
            + "no effective initialization reproduces the drift, or the dual Newton "
            f"stopped at residual {float(bias.residual):.3g}). The step size may be too "
            "large for the first-order prediction.",
            RuntimeWarning,
            stacklevel=3,
        )
    return GDBias(
        theta=bias.theta,
        layers0_eff=_layers_from(m, signs, red.k),
        log_shrink=log_shrink,
        alpha_ratio=jnp.exp(0.5 * log_shrink),
        bias=bias,
        converged=converged,
        method=method,
    )


def _tied_bias(layers0, problem, gamma, batch_size, trajectory, parameterization, flow, tol):
    """`gd_bias` for theta = u^L (tied) and u^L - v^L (difference = tied on [X, -X]).
    With phi(u) = int du / (L u^{L-1}), b = phi(u) - xi is constant along the flow and moves
    by -gamma^2 L (L-1) g^2 u^{L-2} / 2 per step (Taylor), so ahead of time
    phi(u0_eff) = phi(u0) - gamma L (L-1) / 2 int g^2 u^{L-2} dt; from a run,
    phi(u0_eff) = phi(u_K) - xi_K exactly."""
    kind = getattr(parameterization, "func", None)
    depth = getattr(parameterization, "keywords", {}).get("depth")
    if kind not in (_tied, _difference):
        raise ValueError(
            "`gd_bias` knows the product network, `dd.tied(L)` and `dd.difference(L)`; got "
            "another `parameterization`."
        )
    lift = kind is _difference
    X, y, d = problem.X, problem.y, problem.dim
    if lift:
        if not isinstance(layers0, (tuple, list)) or len(layers0) != 2:
            raise ValueError("with `dd.difference(L)`, `layers0` must be the pair `(u0, v0)`.")
        w0 = jnp.concatenate([_vector("layers0", x, d) for x in layers0])
        lifted = LeastSquares(jnp.concatenate([X, -X], axis=1), y)
    else:
        w0, lifted = _vector("layers0", layers0, d), problem
    if not bool(jnp.all(w0 > 0)):
        raise ValueError("`layers0` must be > 0 for the tied and difference networks.")
    if trajectory is not None:
        _check_run(trajectory, layers0, problem)
        last = jax.tree_util.tree_map(lambda x: x[-1], trajectory.layers)
        w = jnp.concatenate(list(last)) if lift else last
        xi = trajectory.xi[-1] * gamma / (trajectory.t_final / trajectory.num_steps)
        b = _phi(w, depth) - (jnp.concatenate([xi, -xi]) if lift else xi)
        ok = jnp.all(w > 0)
    else:
        t1, rtol, atol, gtol, solver, max_steps = flow
        check_tolerances(rtol, atol, max_steps)
        acc, ok = _tied_gains(
            w0,
            lifted,
            batch_size,
            depth,
            jnp.asarray(t1, float),
            resolve_solver(solver),
            jnp.asarray(rtol),
            jnp.asarray(atol),
            check_int("max_steps", max_steps),
            jnp.asarray(gtol),
        )
        b = _phi(w0, depth) - 0.5 * gamma * depth * (depth - 1) * acc
    w_eff = _phi_inverse(b, depth)
    ok = ok & jnp.all(jnp.isfinite(w_eff) & (w_eff > 0))
    w_eff = jnp.where(jnp.isfinite(w_eff) & (w_eff > 0), w_eff, w0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bias = implicit_bias(problem=lifted, mirror=TiedMirrorMap(w_eff, depth), tol=tol)
    theta = bias.theta[:d] - bias.theta[d:] if lift else bias.theta
    converged = ok & bias.converged
    method = "flow" if trajectory is None else "run"
    if not bool(converged):
        warnings.warn(
            f"gd_bias ({method}): the prediction did not converge (no positive effective "
            "initialization, or the flow or the dual Newton failed).",
            RuntimeWarning,
            stacklevel=3,
        )
    log_shrink = (depth * jnp.log(w_eff / w0))[None]
    return GDBias(
        theta=theta,
        layers0_eff=(w_eff[:d], w_eff[d:]) if lift else w_eff,
        log_shrink=log_shrink,
        alpha_ratio=jnp.exp(0.5 * log_shrink),
        bias=bias,
        converged=converged,
        method=method,
    )


def _phi(u, depth):
    if depth == 2:
        return 0.5 * jnp.log(u)
    return -(u ** (-(depth - 2))) / (depth * (depth - 2))


def _phi_inverse(b, depth):
    if depth == 2:
        return jnp.exp(2.0 * b)
    return (-depth * (depth - 2) * b) ** (-1.0 / (depth - 2))


@eqx.filter_jit
def _tied_gains(w0, problem, batch_size, depth, t1, solver, rtol, atol, max_steps, gtol):
    """The tied flow u' = -L u^{L-1} g with int E[g^2] u^{L-2} dt beside it."""

    def field(t, y, args):
        w, _, _ = y
        g = problem.grad(w**depth)
        g2 = _expected_grad_sq(problem, w**depth, batch_size)
        return -depth * w ** (depth - 1) * g, -g, g2 * w ** (depth - 2)

    y0 = (w0, jnp.zeros_like(w0), jnp.zeros_like(w0))
    ys, _, _, ok, _ = diffeq(
        field,
        y0,
        None,
        t0=0.0,
        t1=t1,
        ts=jnp.asarray([t1]),
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        gtol=gtol,
        stop_on=lambda f: f[1],
    )
    return ys[2][-1], ok
