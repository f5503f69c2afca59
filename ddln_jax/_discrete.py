"""Discrete training of the layers with optax (GD, SGD on minibatches of rows, momentum,
Adam, ...) in one `jax.lax.scan`, returning the same `Trajectory` as the flows; and the
sharpness (top Hessian eigenvalue w.r.t. the layers) by power iteration with jvp-of-grad.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray

from ._loss import as_problem, check_batch_size, row_problem
from ._network import theta as product_theta
from ._solve import prepare_inputs, stationary_signal, warn_if_stationary
from ._trajectory import RESULTS, Trajectory, make_trajectory, result_code, warn_if_failed
from ._validate import check_int, check_key, check_positive, is_traced

_stationary = eqx.filter_jit(stationary_signal)  # one small program, no eager work


@eqx.filter_jit
def _train(layers0, problem, optimizer, lr, time_per_step, key, steps, save_every, batch_size,
           parameterization, blowup):
    if optimizer is None:
        optimizer = optax.sgd(lr)
    n = None if batch_size is None else problem.X.shape[0]

    def batch_loss(key):
        if batch_size is None:
            return problem.loss
        idx = jr.permutation(key, n)[:batch_size]
        return row_problem(problem, idx, n / batch_size)

    full0 = problem.loss(parameterization(layers0))
    limit = blowup * jnp.maximum(full0, jnp.finfo(full0.dtype).tiny)

    def step(carry, _):
        layers, opt_state, xi, alive, done, key = carry
        key, sub = jr.split(key)
        th, pullback = jax.vjp(parameterization, layers)
        g = jax.grad(batch_loss(sub))(th)
        (gu,) = pullback(g)
        updates, new_state = optimizer.update(gu, opt_state, layers)
        new_layers = optax.apply_updates(layers, updates)
        new_loss = problem.loss(parameterization(new_layers))
        finite = jnp.all(jnp.isfinite(ravel_pytree(new_layers)[0]))
        alive_new = alive & finite & jnp.isfinite(new_loss) & (new_loss <= limit)

        def pick(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(alive_new, a, b), new, old)

        layers = pick(new_layers, layers)
        opt_state = pick(new_state, opt_state)
        xi = jnp.where(alive_new, xi - time_per_step * g, xi)
        return (layers, opt_state, xi, alive_new, done + alive_new, key), None

    def save_block(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=save_every)
        return carry, (carry[0], carry[2])

    xi0 = jnp.zeros_like(parameterization(layers0))
    init = (layers0, optimizer.init(layers0), xi0, jnp.array(True), jnp.array(0), key)
    carry, (layers_s, xi_s) = jax.lax.scan(save_block, init, None, length=steps // save_every)
    _, _, _, alive, done, _ = carry
    cat = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), layers0, layers_s)
    xi_s = jnp.concatenate([xi0[None], xi_s])
    ts = time_per_step * jnp.arange(0, steps + 1, save_every, dtype=xi0.dtype)
    result = jnp.where(alive, 0, result_code(RESULTS.diverged))
    return make_trajectory(ts, (cat, xi_s), result, done, alive, time_per_step * done, layers0,
                           problem, parameterization)


def train(
    layers0,
    problem,
    optimizer,
    *,
    steps: int,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
    save_every: int = 1,
    time_per_step=None,
    parameterization: Callable | None = None,
    blowup: float = 1e8,
) -> Trajectory:
    """Train the layers with a discrete optimizer: u_{k+1} = u_k + update(grad_u L_B(u_k)).

    **Arguments:**

    - `layers0`: initial layers `(depth, dim)` (or any pytree with `parameterization`).
    - `problem`: a loss object or callable theta -> scalar (minibatches need data rows).
    - `optimizer`: an `optax.GradientTransformation` (e.g. `optax.sgd(0.1, momentum=0.9)`,
        `optax.adam(1e-2)`), or a step size eta (float or array) for plain gradient descent
        `optax.sgd(eta)`. A float eta is traced, so `jax.vmap` over step sizes compiles once;
        to vary an optax optimizer's hyperparameters use `optax.inject_hyperparams`.
    - `steps`: number of updates (a multiple of `save_every`).
    - `batch_size`: rows per minibatch, drawn without replacement at every step; the loss is
        rescaled by n / batch_size (an unbiased estimate of the full loss). `None`: full batch.
    - `key`: PRNG key of the minibatches (required with `batch_size`).
    - `save_every`: save one iterate every this many steps (the initial one included).
    - `time_per_step`: the time of one update, `ts = k * time_per_step`. Default: eta when
        `optimizer` is a step size (so gradient descent is compared with the flow at
        t = k eta), else 1 (ts = step counts).
    - `blowup`: a run is flagged as diverged once its loss is non-finite or exceeds
        `blowup * L(theta_0)`.

    **Returns:** a `Trajectory` (`xi` = -time_per_step sum_k grad_theta L_B(theta_k),
    `num_steps` = steps taken). A diverged run stops updating at its last finite iterate, with
    `ok=False`, `result = dd.Result.diverged`, `t_final` the time it diverged; a
    `RuntimeWarning` says so outside of jit/vmap. Jit- and vmap-compatible (over step sizes,
    keys, inits).
    """
    layers0, problem, parameterization = prepare_inputs(layers0, problem, parameterization)
    steps = check_int("steps", steps)
    save_every = check_int("save_every", save_every)
    if steps % save_every:
        raise ValueError(f"`steps` ({steps}) must be a multiple of `save_every` ({save_every}).")
    batch_size = check_batch_size(problem, batch_size)
    if batch_size is not None and key is None:
        raise ValueError("`key` is required with `batch_size` (minibatches are random).")
    key = jr.key(0) if key is None else check_key("key", key)
    check_positive("blowup", blowup)
    warn_if_stationary(_stationary(layers0, problem, parameterization), "train")
    if isinstance(optimizer, optax.GradientTransformation):
        lr = None
        time_per_step = 1.0 if time_per_step is None else time_per_step
    elif isinstance(optimizer, (int, float, np.ndarray, jax.Array)) and not isinstance(
        optimizer, bool
    ):
        lr = jnp.asarray(optimizer, dtype=jnp.result_type(float))
        if lr.ndim != 0:
            raise ValueError(
                f"a step size `optimizer` must be a scalar, got shape {lr.shape}; use jax.vmap "
                "over step sizes."
            )
        if not is_traced(lr) and not float(lr) > 0:
            raise ValueError(f"the step size `optimizer` must be > 0, got {float(lr)}.")
        time_per_step = lr if time_per_step is None else time_per_step
        optimizer = None
    else:
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation or a step size, got "
            f"{type(optimizer).__name__}."
        )
    check_positive("time_per_step", time_per_step)
    traj = _train(
        layers0, problem, optimizer, lr,
        jnp.asarray(time_per_step, dtype=jnp.result_type(float)), key,
        steps, save_every, batch_size, parameterization, blowup,
    )
    warn_if_failed(traj, "train", "Use a smaller step size (GD is unstable once the sharpness "
                   "exceeds 2 / eta).")
    return traj


def sharpness(
    layers,
    problem,
    *,
    key: PRNGKeyArray,
    parameterization: Callable | None = None,
    max_steps: int = 500,
    rtol: float = 1e-10,
) -> Float[Array, ""]:
    """The top eigenvalue of the Hessian of u -> L(parameterization(u)) w.r.t. the layers, by
    power iteration on Hessian-vector products (`jax.jvp` of `jax.grad`, no Hessian formed).

    A first pass finds the eigenvalue of largest modulus; when it is negative, a second pass on
    H - lambda I finds the top one. Stops when the Rayleigh quotient changes by less than
    `rtol` (relative) or after `max_steps` iterations. Gradient descent with step eta is
    stable near a minimum only if the sharpness is <= 2 / eta. `key` draws the start vector.
    """
    problem = as_problem(problem)
    parameterization = product_theta if parameterization is None else parameterization
    max_steps = check_int("max_steps", max_steps)
    check_positive("rtol", rtol)
    return _sharpness(layers, problem, parameterization, max_steps, rtol, key)


@eqx.filter_jit
def _sharpness(layers, problem, parameterization, max_steps, rtol, key):
    flat, unravel = ravel_pytree(layers)

    def f(x):
        return problem.loss(parameterization(unravel(x)))

    def hvp(v):
        return jax.jvp(jax.grad(f), (flat,), (v,))[1]

    def power(shift, v):
        def body(state):
            v, lam, _, i = state
            w = hvp(v) - shift * v
            new = jnp.vdot(v, w)
            w = w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)
            return w, new, jnp.abs(new - lam) > rtol * jnp.abs(new), i + 1

        def cond(state):
            return state[2] & (state[3] < max_steps)

        v, lam, _, _ = jax.lax.while_loop(cond, body, (v, jnp.array(0.0, v.dtype), True, 0))
        return lam + shift

    v0 = jr.normal(key, flat.shape, flat.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    lam1 = power(jnp.zeros((), flat.dtype), v0)
    return jax.lax.cond(lam1 >= 0, lambda: lam1, lambda: power(lam1, v0))
