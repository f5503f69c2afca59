"""Grid points to slot inputs, and finished slots to result rows (initial layers, sigma,
loss, rates): the per-row maths of a sweep, on arrays."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._geometry import empirical_rate, sigma
from .._loss import as_problem
from .._network import INITS as INITS
from .._network import init_padded
from .._stepper import BUDGET, CONVERGED, DONE, FAILED
from .._trajectory import Result

# the raw fields of a finished row (what the stepper gives), and the derived ones
RAW = ("index", "theta", "num_steps", "ok", "result", "t_final", "implicit")
DERIVED = ("loss", "sigma", "rate", "theorem2_rate", "layers0")


@eqx.filter_jit
def make_rows(gids, gd, gs, gr, key, max_depth, dim, init, problem_fn):
    """Initial layers (padded), depths and (for a seed -> problem function) the problems of
    the grid points `gids`."""
    keys = jax.vmap(lambda r: jr.fold_in(key, r))(gr[gids])
    u0 = jax.vmap(lambda k, d, sc: init_padded(k, d, max_depth, dim, sc, init))(
        keys, gd[gids], gs[gids])
    probs = None if problem_fn is None else jax.vmap(problem_fn)(gr[gids])
    return u0, gd[gids], probs


@eqx.filter_jit
def _post(theta, u0, depth, seeds, shared, problem_fn, least_squares: bool):
    """Loss, suboptimality (least squares), sigma and PL constants of grid points."""
    if problem_fn is None:
        probs, axis = shared, None
    else:
        probs, axis = jax.vmap(problem_fn)(seeds), 0

    def one(p, th):
        p = as_problem(p)
        loss = jax.vmap(p.loss)(th)
        if least_squares:
            return loss, p.suboptimality(th), p.pl_constant
        return loss, loss, jnp.nan

    loss, sub, mu = jax.vmap(one, in_axes=(axis, 0))(probs, theta)
    sig = jax.vmap(sigma)(u0, depth)
    return loss, sub, sig, mu


def derived(raw: dict, u0, depth, seeds, shared, problem_fn, least_squares: bool,
            ts, size: int) -> dict:
    """`raw` with the derived fields added (loss, sigma, rates, initial layers). The rows are
    padded to `size` (the chunk size) for the compiled part: one compilation per sweep."""
    n = len(raw["index"])
    pad = size - n

    def padded(x):
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad > 0 else x

    loss, sub, sig, mu = (np.asarray(x)[:n] for x in _post(
        jnp.asarray(padded(raw["theta"])), jnp.asarray(padded(u0)), jnp.asarray(padded(depth)),
        jnp.asarray(padded(seeds)), shared, problem_fn, least_squares))
    rate, thm = np.full(n, np.nan), np.full(n, np.nan)
    if least_squares:
        thm = 2 * sig * mu
        for b in np.flatnonzero(raw["ok"]):
            live = ts <= raw["t_final"][b]
            if live.sum() >= 2:
                rate[b] = empirical_rate(ts[live], sub[b][live])
    return dict(raw, loss=loss, sigma=sig, rate=rate, theorem2_rate=thm,
                layers0=np.asarray(u0))


def finish_rows(gids, rows, tsn, t1):
    """Explicit results to sweep rows: saves after a steady-state stop hold the final state."""
    theta = rows["saves"].copy()
    final = np.prod(rows["u"], axis=1)
    after = np.arange(theta.shape[1])[None, :] >= rows["save_i"][:, None]
    theta = np.where(after[..., None], final[:, None, :], theta)
    conv = rows["status"] == CONVERGED
    result = np.where(conv, int(Result.event_occurred), int(Result.successful))
    return dict(index=np.asarray(gids), theta=theta, num_steps=rows["steps"],
                ok=np.ones(len(gids), bool), result=result,
                t_final=np.where(conv, rows["t"], float(t1)),
                implicit=np.zeros(len(gids), bool))


def implicit_finish(gids, out, tsn, t1):
    """Result rows of trajectories finished by Kvaerno5."""
    ok = (out["status"] == DONE) | (out["status"] == CONVERGED)
    res = finish_rows(gids, out, tsn, t1)
    res["ok"] = ok
    # FAILED: a non-finite derivative or a vanishing step; BUDGET: `max_steps` exhausted
    failed = np.select([out["status"] == FAILED, out["status"] == BUDGET],
                       [int(Result.diverged), int(Result.max_steps_reached)],
                       int(Result.internal_error))
    res["result"] = np.where(ok, res["result"], failed)
    res["t_final"] = np.where(ok, res["t_final"], out["t"])
    res["implicit"] = np.ones(len(gids), bool)
    return res
