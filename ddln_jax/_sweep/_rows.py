"""Grid points to slot inputs, and finished slots to result rows (initial layers, sigma,
loss, rates): the per-row maths of a sweep, on arrays."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .._geometry import empirical_rate, sigma
from .._loss import as_problem
from .._network import INITS as INITS
from .._network import init_padded
from .._trajectory import Result
from .._xla import OptionJit
from ._slots import BUDGET, CONVERGED, DONE, FAILED

# the raw fields of a finished row (what the stepper gives), and the derived ones
RAW = ("index", "theta", "num_steps", "ok", "result", "t_final", "implicit")
DERIVED = ("loss", "sigma", "rate", "theorem2_rate", "layers0")


def _make_rows(gids: Int[Array, " n"], gd: Int[Array, " B"], gs: Float[Array, " B"],
              gr: Int[Array, " B"], key: PRNGKeyArray, max_depth: int, dim: int, init: str,
              problem_fn: Callable | None
              ) -> tuple[Float[Array, "n max_depth dim"], Int[Array, " n"], PyTree | None]:
    """Initial layers (padded to `max_depth` rows), depths and (for a seed -> problem
    function) the problems of the grid points `gids`, from the grid's depths `gd`, scales
    `gs` and seeds `gr`."""
    keys = jax.vmap(lambda r: jr.fold_in(key, r))(gr[gids])
    u0 = jax.vmap(lambda k, d, sc: init_padded(k, d, max_depth, dim, sc, init))(
        keys, gd[gids], gs[gids])
    return (u0, *problem_rows(gids, gd, gr, problem_fn))


# Drawing the inits (threefry, vmapped) compiles 3x faster with LLVM's -O1 than its default
# -O2 (0.5 against 1.5 s, on the critical path of a first call), runs as fast, same bits
make_rows = OptionJit(_make_rows, {"xla_backend_optimization_level": 1})


@eqx.filter_jit
def problem_rows(gids: Int[Array, " n"], gd: Int[Array, " B"], gr: Int[Array, " B"],
                 problem_fn: Callable | None) -> tuple[Int[Array, " n"], PyTree | None]:
    """`make_rows` without the initial layers: the depths and (for a seed -> problem
    function) the problems of the grid points `gids` (for members handed over mid-way)."""
    probs = None if problem_fn is None else jax.vmap(problem_fn)(gr[gids])
    return gd[gids], probs


@eqx.filter_jit
def _post(theta: Float[Array, "n T dim"], u0: Float[Array, "n max_depth dim"],
          depth: Int[Array, " n"], seeds: Int[Array, " n"], shared: PyTree | None,
          problem_fn: Callable | None, least_squares: bool
          ) -> tuple[Float[Array, "n T"], Float[Array, "n T"], Float[Array, " n"],
                     Float[Array, " n"]]:
    """Loss, suboptimality (least squares; else the loss), sigma and PL constant (least
    squares; else NaN) of grid points."""
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


def derived(raw: dict, u0: Float[np.ndarray, "n max_depth dim"], depth: Int[np.ndarray, " n"],
            seeds: Int[np.ndarray, " n"], shared: PyTree | None, problem_fn: Callable | None,
            least_squares: bool, ts: Float[np.ndarray, " T"], size: int) -> dict:
    """`raw` with the derived fields added (loss, sigma, rates, initial layers). The rows are
    padded to `size` (the chunk size) for the compiled part: one compilation per sweep."""
    n = len(raw["index"])
    pad = size - n

    def padded(x):
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad > 0 else x

    loss, sub, sig, mu = (np.asarray(x)[:n] for x in _post(
        padded(raw["theta"]), padded(u0), padded(depth), padded(seeds), shared, problem_fn,
        least_squares))
    rate, thm = np.full(n, np.nan), np.full(n, np.nan)
    if least_squares:
        thm = 2 * sig * mu
        for b in np.flatnonzero(raw["ok"]):
            live = ts <= raw["t_final"][b]
            if live.sum() >= 2:
                rate[b] = empirical_rate(ts[live], sub[b][live])
    return dict(raw, loss=loss, sigma=sig, rate=rate, theorem2_rate=thm,
                layers0=np.asarray(u0))


def finish_rows(gids: Int[np.ndarray, " n"], rows: dict, tsn: Float[np.ndarray, " T"],
                t1: Float[Array, ""]) -> dict:
    """Explicit results to sweep rows (the `RAW` fields): saves after a steady-state stop hold
    the final state. `rows`: the retired slots of `gids`, as `_drive` gives them."""
    theta = np.array(rows["saves"])  # a copy, written in place (no second one)
    final = np.prod(rows["u"], axis=1)
    after = np.arange(theta.shape[1])[None, :] >= rows["save_i"][:, None]
    np.copyto(theta, final[:, None, :], where=after[..., None])
    conv = rows["status"] == CONVERGED
    result = np.where(conv, int(Result.event_occurred), int(Result.successful))
    return dict(index=np.asarray(gids), theta=theta, num_steps=rows["steps"],
                ok=np.ones(len(gids), bool), result=result,
                t_final=np.where(conv, rows["t"], float(t1)),
                implicit=np.zeros(len(gids), bool))


def implicit_finish(gids: Int[np.ndarray, " n"], out: dict, tsn: Float[np.ndarray, " T"],
                    t1: Float[Array, ""]) -> dict:
    """Result rows (the `RAW` fields) of trajectories finished by Kvaerno5."""
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
