"""Sweeps over depth x scale x seed in one compiled, vmapped call (DESIGN §5).

- Different depths share one compiled solve: layers are padded to the largest depth with
  frozen unit layers (theta is unchanged) and the error norm is restricted to the real layers,
  so a padded solve takes the same steps as the unpadded one.
- Lockstep-aware: a cheap pilot solve (loose tolerance) estimates each trajectory's steps; the
  grid is sorted by that estimate and cut into chunks, so a batch does not pay its slowest
  member for everyone. Lockstep efficiency (sum of own steps / (B * max steps)) is reported.
- Stiffness-aware: converged trajectories stop (steady-state event); members that exhaust the
  explicit solver's step budget are solved again with the implicit Kvaerno5.
- Chunks are sized to `memory_budget`, written atomically to `out`, and skipped on a rerun.
- The batch axis is sharded over all visible devices (1-D mesh, `NamedSharding`).
"""

import hashlib
import json
import os
import time
from pathlib import Path

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array
from tqdm.auto import tqdm

from ._flow import check_times, check_tolerances, diffeq, layer_vector_field
from ._geometry import empirical_rate
from ._loss import LeastSquares, as_problem
from ._network import theta as product_theta
from ._validate import check_depth

INITS = ("gaussian", "zero_first")


class _MaskedRMS(eqx.Module):
    """RMS norm over the real (unpadded) entries: leaves shaped like the layers are masked;
    the error control and the first step then see what an unpadded solve sees. (Other
    pytrees, e.g. inside an implicit solver's root finder, get the plain RMS norm.)"""

    mask: Array

    def __call__(self, e):
        total, count = 0.0, 0.0
        for x in jax.tree_util.tree_leaves(e):
            if x.shape == self.mask.shape:
                total = total + jnp.sum((x * self.mask) ** 2)
                count = count + jnp.sum(self.mask)
            else:
                total = total + jnp.sum(x**2)
                count = count + x.size
        return jnp.sqrt(total / count)


def _rms_all(e):
    leaves = jax.tree_util.tree_leaves(e)
    return jnp.sqrt(sum(jnp.sum(x**2) for x in leaves) / sum(x.size for x in leaves))


def padded_init(key, depth, max_depth: int, dim: int, scale, init: str):
    """`max_depth` rows, the first `depth` drawn as `init` (scale * N(0, 1); row 0 zero for
    "zero_first"), the others frozen at 1. The first `depth` rows are the network's layers."""
    u = scale * jr.normal(key, (max_depth, dim))
    rows = jnp.arange(max_depth)[:, None]
    if init == "zero_first":
        u = jnp.where(rows == 0, 0.0, u)
    return jnp.where(rows < depth, u, 1.0)


def masked_sigma(layers0, depth):
    """sigma (eq 13) of the real layers of a padded network."""
    rows = jnp.arange(layers0.shape[0])[:, None]
    real = rows < depth
    sq = jnp.where(real, layers0**2, jnp.inf)
    k = jnp.argmin(sq, axis=0)
    smin = jnp.take_along_axis(sq, k[None], axis=0)
    factors = jnp.where((rows == k[None]) | ~real, 1.0, sq - smin)
    return jnp.min(jnp.prod(factors, axis=0))


def _solve_one(layers0, depth, problem, t0, t1, ts, solver, rtol, atol, max_steps, gtol):
    max_depth, dim = layers0.shape
    mask = jnp.broadcast_to(jnp.arange(max_depth)[:, None] < depth, layers0.shape)
    mask = mask.astype(layers0.dtype)
    base = layer_vector_field(product_theta)

    def vf(t, y, args):
        du, dxi = base(t, y, args)
        return du * mask, dxi

    # The masked norm gives explicit solvers the very steps of an unpadded solve; diffrax's
    # implicit solvers stall with it (seen: Kvaerno5 stuck at t ~ 3e-5), so they keep RMS.
    implicit = isinstance(solver, dfx.AbstractImplicitSolver)
    norm = _rms_all if implicit else _MaskedRMS(mask)
    controller = dfx.PIDController(rtol=rtol, atol=atol, norm=norm)
    y0 = (layers0, jnp.zeros(dim, layers0.dtype))
    (layers_ts, xi_ts), result, num_steps, ok, t_final = diffeq(
        vf, y0, problem, t0=t0, t1=t1, ts=ts, solver=solver, rtol=rtol, atol=atol,
        max_steps=max_steps, gtol=gtol, controller=controller,
    )
    theta_ts = jax.vmap(product_theta)(layers_ts)
    return dict(theta=theta_ts, loss=jax.vmap(problem.loss)(theta_ts), xi_final=xi_ts[-1],
                layers_final=layers_ts[-1], result=result, num_steps=num_steps, ok=ok,
                t_final=t_final)


@eqx.filter_jit
def _solve_batch(layers0, depth, problem, batched_problem: bool, t0, t1, ts, solver, rtol,
                 atol, max_steps, gtol):
    in_axes = (0, 0, 0 if batched_problem else None) + (None,) * 5
    f = jax.vmap(
        lambda u, L, p, a, b, c, r, s: _solve_one(u, L, p, a, b, c, solver, r, s, max_steps,
                                                  gtol),
        in_axes=in_axes,
    )
    return f(layers0, depth, problem, t0, t1, ts, rtol, atol)


class SweepResult(eqx.Module):
    """Labelled results of `sweep`, one row per grid point (order: depth, scale, seed).

    Arrays: `depth, scale, seed (B,)`, `ts (T,)`, `theta (B, T, dim)`, `loss (B, T)`,
    `theta_final (B, dim)`, `num_steps, ok, result, t_final (B,)`, `implicit (B,)` (solved
    again with Kvaerno5), `sigma (B,)` (eq 13), `rate (B,)` (empirical exponential rate,
    least squares only), `theorem2_rate (B,)` (2 sigma mu), `layers0 (B, max_depth, dim)`
    (padded with ones), `chunk (B,)`. `efficiency`: lockstep efficiency per chunk.
    """

    depth: np.ndarray
    scale: np.ndarray
    seed: np.ndarray
    ts: np.ndarray
    theta: np.ndarray
    loss: np.ndarray
    theta_final: np.ndarray
    num_steps: np.ndarray
    ok: np.ndarray
    result: np.ndarray
    t_final: np.ndarray
    implicit: np.ndarray
    sigma: np.ndarray
    rate: np.ndarray
    theorem2_rate: np.ndarray
    layers0: np.ndarray
    chunk: np.ndarray
    efficiency: np.ndarray

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def to_dataframe(self):
        """One row per grid point with the scalar columns (needs pandas)."""
        import pandas as pd

        cols = ["depth", "scale", "seed", "num_steps", "ok", "result", "t_final", "implicit",
                "sigma", "rate", "theorem2_rate", "chunk"]
        df = pd.DataFrame({c: np.asarray(getattr(self, c)) for c in cols})
        df["final_loss"] = np.asarray(self.loss)[:, -1]
        return df


def _grid_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_chunk(path: Path, arrays: dict):
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _shard(x, sharding):
    return jax.device_put(x, sharding) if sharding is not None else x


def _pad_to(x, size):
    """Pad the leading axis to `size` by repeating the last row (results are discarded)."""
    n = x.shape[0]
    if n == size:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], size - n, axis=0)], axis=0)


def sweep(
    problem,
    *,
    depths,
    scales,
    seeds,
    t1,
    ts,
    init: str = "gaussian",
    t0=0.0,
    rtol=1e-8,
    atol=1e-10,
    stop_when_converged=None,
    out=None,
    memory_budget: int = 2**30,
    max_chunk: int = 256,
    explicit_max_steps: int = 2**16,
    max_steps: int = 2**20,
    pilot: bool = True,
    progress: bool = True,
    key=None,
) -> SweepResult:
    """Gradient flows over the grid depths x scales x seeds, in compiled, vmapped chunks.

    **Arguments:**

    - `problem`: a fixed problem (e.g. `dd.LeastSquares(X, y)`) or a function
        `seed -> problem` (traceable: built inside `jax.vmap`).
    - `depths`, `scales`, `seeds`: the grid (ints >= 2, floats, ints).
    - `t1`, `ts`, `t0`, `rtol`, `atol`: as `gradient_flow`.
    - `init`: "gaussian" (scale * N(0, 1)) or "zero_first" (first layer 0). The init of a grid
        point is drawn from `fold_in(key, seed)`: the first `depth` rows of a
        `max(depths)`-row draw, so it does not depend on the rest of the grid.
    - `stop_when_converged`: gradient tolerance of the steady-state stop (None: off).
    - `out`: a folder; each finished chunk is written there atomically and a rerun with the
        same arguments skips it (resume). Killing the process loses at most the chunk in
        flight.
    - `memory_budget`: bytes per chunk (saved trajectories and solver state).
    - `explicit_max_steps`: Tsit5 step budget; trajectories that exhaust it are stiff and are
        solved again with Kvaerno5 (up to `max_steps`).
    - `max_chunk`: most trajectories per compiled batch (smaller chunks of pilot-sorted
        trajectories waste fewer lockstep steps; larger ones amortise per-step overhead).
    - `pilot`: estimate each trajectory's cost with a loose-tolerance solve, sort the grid
        by it so chunks step in near-lockstep, and send members that exhaust the pilot's
        explicit budget (stiff) straight to Kvaerno5.
    - `progress`: a progress bar over chunks.
    - `key`: base PRNG key (default `jr.key(0)`).

    **Returns:** a `SweepResult` in grid order.
    """
    depths = [check_depth(int(L)) for L in np.atleast_1d(depths)]
    scales = [float(s) for s in np.atleast_1d(scales)]
    seeds = [int(s) for s in np.atleast_1d(seeds)]
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")
    t0, t1, ts = check_times(t0, t1, ts)
    check_tolerances(rtol, atol, max_steps)
    if max_chunk < 1 or memory_budget < 1:
        raise ValueError("`max_chunk` and `memory_budget` must be >= 1.")
    batched_problem = not (hasattr(problem, "loss") and callable(problem.loss))
    if batched_problem and not callable(problem):
        raise TypeError("`problem` must be a problem object or a function seed -> problem.")
    key = jr.key(0) if key is None else key
    max_depth = max(depths)
    grid = [(L, s, r) for L in depths for s in scales for r in seeds]
    g_depth = np.array([g[0] for g in grid])
    g_scale = np.array([g[1] for g in grid])
    g_seed = np.array([g[2] for g in grid])
    B = len(grid)
    sample = as_problem(problem(seeds[0]) if batched_problem else problem)
    dim = sample.X.shape[1] if hasattr(sample, "X") else None
    if dim is None:
        raise TypeError("`sweep` needs a problem with a design matrix `X` (to know `dim`).")
    gtol = None if stop_when_converged is None else jnp.asarray(float(stop_when_converged))
    T = ts.shape[0]

    devices = jax.devices()
    n_dev = len(devices)
    sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec("batch"))
    per_traj = 8 * (3 * T * (max_depth + 2) * dim + 64 * (max_depth + 2) * dim)
    chunk = int(max(1, min(max_chunk, memory_budget // per_traj, B)))
    chunk = max(n_dev, (chunk // n_dev) * n_dev)

    def make_inputs(idx):
        L = jnp.asarray(g_depth[idx])
        sc = jnp.asarray(g_scale[idx])
        keys = jax.vmap(lambda r: jr.fold_in(key, r))(jnp.asarray(g_seed[idx]))
        u0 = jax.vmap(lambda k, d, s: padded_init(k, d, max_depth, dim, s, init))(keys, L, sc)
        if batched_problem:
            probs = jax.vmap(problem)(jnp.asarray(g_seed[idx]))
        else:
            probs = problem
        return u0, L, probs

    def run(idx, solver, steps, rt, at, save_ts, gt):
        size = chunk
        u0, L, probs = make_inputs(idx)
        u0, L = _pad_to(u0, size), _pad_to(L, size)
        if batched_problem:
            probs = jax.tree_util.tree_map(lambda x: _pad_to(x, size), probs)
            probs = jax.tree_util.tree_map(lambda x: _shard(x, sharding), probs)
        u0, L = _shard(u0, sharding), _shard(L, sharding)
        res = _solve_batch(u0, L, probs, batched_problem, t0, t1, save_ts, solver,
                           jnp.asarray(rt), jnp.asarray(at), steps, gt)
        n = len(idx)
        return jax.tree_util.tree_map(lambda x: np.array(x)[:n], res), np.array(u0)[:n]

    spec = dict(depths=depths, scales=scales, seeds=seeds, t0=float(t0), t1=float(t1),
                ts=np.asarray(ts).tolist(), init=init, rtol=float(rtol), atol=float(atol),
                gtol=None if gtol is None else float(gtol), dim=dim, chunk=chunk,
                key=np.asarray(jr.key_data(key)).tolist(), pilot=pilot,
                explicit_max_steps=explicit_max_steps, max_steps=max_steps,
                problem=_problem_fingerprint(problem, batched_problem, seeds))
    outdir = None if out is None else Path(out)
    manifest = None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
        mpath = outdir / "manifest.json"
        if mpath.exists():
            manifest = json.loads(mpath.read_text())
            if manifest["hash"] != _grid_hash(spec):
                raise ValueError(
                    f"`out`={str(outdir)!r} holds a different sweep; use another folder or "
                    "delete it."
                )

    if manifest is not None:
        order = np.asarray(manifest["order"], int)
        stiff_pilot = np.asarray(manifest["stiff"], bool)
    else:
        order = np.arange(B)
        stiff_pilot = np.zeros(B, bool)
        if pilot and B > 1:
            # A cheap pilot (loose tolerance, 2^12 steps, two save times) estimates each
            # trajectory's cost. Stiffness caps the explicit step size whatever the tolerance,
            # so members that exhaust the pilot's budget go straight to Kvaerno5; the others
            # are sorted by cost so that chunks step in near-lockstep.
            est = np.zeros(B)
            pilot_ts = jnp.stack([t0, t1])
            for start in range(0, B, chunk):
                idx = np.arange(start, min(B, start + chunk))
                res, _ = run(idx, dfx.Tsit5(), 2**12, 1e-4, 1e-6, pilot_ts, gtol)
                est[idx] = res["num_steps"]
                stiff_pilot[idx] = res["result"] == int(dfx.RESULTS.max_steps_reached._value)
            order = np.argsort(est, kind="stable")
        if outdir is not None:
            m = {"hash": _grid_hash(spec), "order": order.tolist(), "spec": spec,
                 "stiff": stiff_pilot.tolist()}
            tmp = outdir / "manifest.json.tmp"
            tmp.write_text(json.dumps(m))
            os.replace(tmp, outdir / "manifest.json")

    n_chunks = (B + chunk - 1) // chunk
    parts = []
    bar = tqdm(range(n_chunks), desc="sweep", unit="chunk", disable=not progress)
    for c in bar:
        idx = order[c * chunk:(c + 1) * chunk]
        path = None if outdir is None else outdir / f"chunk_{c:05d}.npz"
        if path is not None and path.exists():
            with np.load(path) as f:
                parts.append(dict(f))
            continue
        start = time.perf_counter()
        explicit_idx = np.flatnonzero(~stiff_pilot[idx])
        res, u0 = None, None
        implicit = stiff_pilot[idx].copy()
        steps_explicit = np.zeros(0, int)
        if explicit_idx.size:
            r1, u1 = run(idx[explicit_idx], dfx.Tsit5(), explicit_max_steps, rtol, atol, ts,
                         gtol)
            steps_explicit = r1["num_steps"].copy()
            failed = r1["result"] == int(dfx.RESULTS.max_steps_reached._value)
            implicit[explicit_idx[failed]] = True
            res = {k: np.zeros((len(idx),) + v.shape[1:], v.dtype) for k, v in r1.items()}
            u0 = np.zeros((len(idx),) + u1.shape[1:], u1.dtype)
            for k in res:
                res[k][explicit_idx] = r1[k]
            u0[explicit_idx] = u1
        stiff = implicit
        if implicit.any():
            sub = np.flatnonzero(implicit)
            r2, u2 = run(idx[sub], dfx.Kvaerno5(), max_steps, rtol, atol, ts, gtol)
            if res is None:
                res = {k: np.zeros((len(idx),) + v.shape[1:], v.dtype) for k, v in r2.items()}
                u0 = np.zeros((len(idx),) + u2.shape[1:], u2.dtype)
            for k in res:
                res[k][sub] = r2[k]
            u0[sub] = u2
        # lockstep efficiency of the explicit batch (the implicit one if there was none)
        steps = steps_explicit if steps_explicit.size else res["num_steps"]
        eff = steps.sum() / (steps.size * max(1, steps.max()))
        part = dict(index=idx, layers0=u0, implicit=implicit, efficiency=np.full(len(idx), eff),
                    chunk=np.full(len(idx), c), seconds=np.full(len(idx),
                                                                time.perf_counter() - start),
                    **{k: v for k, v in res.items() if k not in ("xi_final", "layers_final")})
        if path is not None:
            _save_chunk(path, part)
        parts.append(part)
        bar.set_postfix(efficiency=f"{eff:.2f}", stiff=int(stiff.sum()))

    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    inv = np.empty(B, int)
    inv[merged["index"]] = np.arange(B)
    m = {k: v[inv] for k, v in merged.items()}
    sig = np.asarray(jax.vmap(masked_sigma)(jnp.asarray(m["layers0"]), jnp.asarray(g_depth)))
    rate, thm = np.full(B, np.nan), np.full(B, np.nan)
    tsn = np.asarray(ts)
    for b in range(B):
        p = as_problem(problem(int(g_seed[b])) if batched_problem else problem)
        if isinstance(p, LeastSquares):
            live = tsn <= m["t_final"][b]
            if live.sum() >= 2 and m["ok"][b]:
                sub = np.asarray(p.suboptimality(jnp.asarray(m["theta"][b][live])))
                rate[b] = empirical_rate(tsn[live], sub)
            thm[b] = 2 * sig[b] * float(p.pl_constant)
    eff = np.array([parts[i]["efficiency"][0] for i in range(len(parts))])
    return SweepResult(
        depth=g_depth, scale=g_scale, seed=g_seed, ts=tsn, theta=m["theta"], loss=m["loss"],
        theta_final=m["theta"][:, -1], num_steps=m["num_steps"], ok=m["ok"].astype(bool),
        result=m["result"], t_final=m["t_final"], implicit=m["implicit"].astype(bool),
        sigma=sig, rate=rate, theorem2_rate=thm, layers0=m["layers0"], chunk=m["chunk"],
        efficiency=eff,
    )


def _problem_fingerprint(problem, batched, seeds):
    p = problem(seeds[0]) if batched else problem
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(p) if hasattr(x, "shape")]
    h = hashlib.sha256()
    for x in leaves:
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]

