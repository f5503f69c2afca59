"""Sweeps over depth x scale x seed in compiled, vmapped calls (DESIGN §5).

- Continuous batching (`_stepper`): a fixed number of slots each step one trajectory with
  its own adaptive Tsit5 step in a fused `lax.while_loop`; finished trajectories are retired
  and their slots refilled with the next grid points, so a batch never waits for its slowest
  member. Once the queue is empty the busy slots move to 4x smaller arrays. Lockstep
  efficiency (own steps / slot-iterations) is reported per chunk and over the grid.
- On a CPU, one slot array per core plus one, each stepped by its own host thread
  (`workers`), all taking grid points from one queue: XLA runs one small computation on one
  core.
- Different depths share one compilation: layers are padded to the largest depth with frozen
  unit layers (theta is unchanged) and the derivative and the error norm are restricted to the
  real layers, so a padded trajectory takes the steps of an unpadded one.
- Stiffness-aware: converged trajectories stop (steady state ||grad L||_inf <= gtol); a
  member whose explicit step stays at the stability boundary (Hairer's stiffness test) while
  much of the interval is left, or that exhausts the explicit step budget, continues from
  where it stopped with Kvaerno5 (diffrax's tableau) in the same slot framework (a 16-slot
  array refilled as members finish; chord Newton with the Jacobian's structure).
- Finished trajectories are written to `out` in chunks, atomically; a rerun resumes.
- The slot axis is sharded over all visible devices (1-D mesh, `NamedSharding`).
"""

import hashlib
import json
import os
from pathlib import Path

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ._flow import check_times, check_tolerances
from ._geometry import empirical_rate
from ._loss import LeastSquares, as_problem
from ._stepper import BUDGET, CONVERGED, DONE, SLOT_QUANTUM, run_implicit, run_queue
from ._validate import check_depth

INITS = ("gaussian", "zero_first")


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


class SweepResult(eqx.Module):
    """Labelled results of `sweep`, one row per grid point (order: depth, scale, seed).

    Arrays: `depth, scale, seed (B,)`, `ts (T,)`, `theta (B, T, dim)`, `loss (B, T)`,
    `theta_final (B, dim)`, `num_steps, ok, result, t_final (B,)`, `implicit (B,)` (finished
    with Kvaerno5), `sigma (B,)` (eq 13), `rate (B,)` (empirical exponential rate,
    least squares only), `theorem2_rate (B,)` (2 sigma mu), `layers0 (B, max_depth, dim)`
    (padded with ones), `chunk (B,)`. `efficiency`: lockstep efficiency (slot-steps / slot-
    iterations) of the work done for each chunk; `overall_efficiency`: the same over the
    whole grid (a resumed sweep: over the work it did, the earlier runs' as recorded).
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
    overall_efficiency: float

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
    max_slots: int | None = None,
    workers: int | None = None,
    explicit_max_steps: int = 2**16,
    max_steps: int = 2**20,
    pilot: bool = False,
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
    - `memory_budget`: bytes for the slots (saved trajectories and solver state); caps the
        number of slots.
    - `max_slots`: most trajectories stepped at once (sharded over devices). Default: 128
        per worker on a CPU (the cost per slot-step is lowest while a slot array fits the
        core's cache), 16384 on an accelerator.
    - `workers`: independent slot arrays stepped by as many host threads, all taking grid
        points from one queue (the result does not depend on it). Default: one per CPU core plus
        one when running on a single CPU device (XLA steps one small computation on one
        core), else 1 (the slot axis is sharded over the devices instead).
    - `max_chunk`: trajectories per chunk file (the unit of resume).
    - `explicit_max_steps`: Tsit5 step budget per trajectory. Stiff members (Hairer's test)
        and those that exhaust it continue with Kvaerno5 from where they stopped (up to
        `max_steps` in all), in a 16-slot array (per device) refilled as they finish.
    - `pilot`: first estimate every trajectory's cost with a loose-tolerance run and queue
        the longest first (fewer slots idle at the end; costs an extra ~half run).
    - `progress`: a progress bar over trajectories.
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
    # memory per slot: saved theta, the state and the 7 stages of Tsit5
    per_traj = 8 * (T * dim + 24 * (max_depth + 1) * dim)
    on_cpu = devices[0].platform == "cpu"
    if workers is None:
        # one more thread than cores: a core stays busy while a thread does its host work
        # (retiring and refilling slots); measured +30 % over one per core on 2 cores
        workers = (os.cpu_count() or 1) + 1 if on_cpu and n_dev == 1 else 1
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1, got {workers}.")
    if n_dev > 1 and workers > 1:
        raise ValueError("`workers` > 1 needs a single device (several devices are used by "
                         "sharding the slot axis); pass workers=1.")
    if max_slots is None:
        max_slots = 128 * workers if on_cpu else 2**14
    # each worker's slot array (per device) holds whole blocks of SLOT_QUANTUM slots
    q = SLOT_QUANTUM * n_dev
    per_worker = int(max(1, min(max_slots, memory_budget // per_traj, B) // workers))
    slots = workers * (-(-per_worker // q) * q)
    chunk = int(max(1, min(max_chunk, B)))
    shared = None if batched_problem else as_problem(problem)
    gd, gs, gr = (jnp.asarray(g_depth), jnp.asarray(g_scale), jnp.asarray(g_seed))

    block = slots // workers

    def make_rows(gids):
        # in blocks of one size whatever the number of rows asked for: one compilation
        # (drawing the inits compiles slowly, ~1 s per shape)
        gids = np.asarray(gids)
        n = gids.size
        padded = np.concatenate([gids, np.full((-n) % block, gids[0] if n else 0)])
        parts = [_make_rows(jnp.asarray(padded[i:i + block]), gd, gs, gr, key, max_depth, dim,
                            init, problem if batched_problem else None)
                 for i in range(0, padded.size, block)]
        return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[:n], *parts)

    def queue(order, rt, at, save_ts, budget, on_retire, num_slots):
        return run_queue(order, make_rows, num_slots=num_slots, max_depth=max_depth, dim=dim,
                         shared_problem=shared, t0=t0, t1=t1, ts=save_ts,
                         rtol=jnp.asarray(rt, float), atol=jnp.asarray(at, float), gtol=gtol,
                         budget=budget, on_retire=on_retire,
                         sharding=sharding if n_dev > 1 else None, tail_slots=q,
                         workers=workers)

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
        slots = int(manifest["slots"])
        workers = int(manifest.get("workers", workers))
    else:
        order = np.arange(B)
        if pilot and B >= 64:  # small grids: one batch, a pilot would only add a compile
            # A cheap pilot (loose tolerance, 2^12 steps, no intermediate saves) estimates
            # each trajectory's cost; the queue then starts with the longest (LPT scheduling),
            # so the last slots to finish are short ones.
            est = np.zeros(B)

            def pilot_retire(gids, rows, work, slot_iters):
                # converged or done: its steps at loose tolerance x (1e-4/rtol)^(1/5) for a
                # 5th-order method; out of budget (stiff: the step is stability-limited, not
                # tolerance-limited): the budget extrapolated to the whole interval
                frac = (rows["t"] - float(t0)) / float(t1 - t0)
                est[gids] = np.where(rows["status"] == BUDGET,
                                     2**12 / np.maximum(frac, 2**12 / explicit_max_steps),
                                     rows["steps"] * (1e-4 / float(rtol)) ** 0.2)

            queue(order, 1e-4, 1e-6, jnp.full_like(ts, t1), 2**12, pilot_retire, slots)
            order = np.argsort(-est, kind="stable")
        if outdir is not None:
            m = {"hash": _grid_hash(spec), "order": order.tolist(), "spec": spec,
                 "slots": slots, "workers": workers}
            tmp = outdir / "manifest.json.tmp"
            tmp.write_text(json.dumps(m))
            os.replace(tmp, outdir / "manifest.json")

    parts = []
    if outdir is not None:
        for path in sorted(outdir.glob("chunk_[0-9][0-9][0-9][0-9][0-9].npz")):
            with np.load(path) as f:
                part = dict(f)
                # chunks written before the work was recorded: none known
                for k in ("work", "slot_iters"):
                    part.setdefault(k, np.zeros(len(part["index"]), int))
                parts.append(part)
    done = np.zeros(B, bool)
    for p in parts:
        done[p["index"]] = True
    next_chunk = 1 + max((int(p["chunk"][0]) for p in parts), default=-1)
    bar = tqdm(total=B, initial=int(done.sum()), desc="sweep", unit="traj",
               disable=not progress)
    pending = {"rows": [], "work": 0, "iters": 0, "eff": np.nan}
    stiff = []
    tsn = np.asarray(ts)

    def flush(force=False):
        nonlocal next_chunk
        count = sum(len(r["index"]) for r in pending["rows"])
        if not count or (count < chunk and not force):
            return
        # lockstep efficiency of the slot-iterations since the last chunk was written
        if pending["iters"]:
            pending["eff"] = pending["work"] / pending["iters"]
        # the slot-steps and slot-iterations go with the first chunk written now
        spent = [pending["work"], pending["iters"]]
        pending["work"] = pending["iters"] = 0
        rows = {k: np.concatenate([r[k] for r in pending["rows"]]) for k in pending["rows"][0]}
        while count >= chunk or (force and count):
            take = {k: v[:chunk] for k, v in rows.items()}
            rows = {k: v[chunk:] for k, v in rows.items()}
            n = len(take["index"])
            count -= n
            part = dict(take, chunk=np.full(n, next_chunk),
                        efficiency=np.full(n, pending["eff"]), work=np.full(n, spent[0]),
                        slot_iters=np.full(n, spent[1]))
            spent = [0, 0]
            if outdir is not None:
                _save_chunk(outdir / f"chunk_{next_chunk:05d}.npz", part)
            parts.append(part)
            next_chunk += 1
        pending["rows"] = [rows] if count else []

    def retire(gids, rows, work, slot_iters):
        pending["work"] += work
        pending["iters"] += slot_iters
        ok = (rows["status"] == DONE) | (rows["status"] == CONVERGED)
        for i in np.flatnonzero(~ok):
            stiff.append((int(gids[i]), {k: v[i] for k, v in rows.items()}))
        if ok.any():
            pending["rows"].append(_finish_rows(gids[ok], {k: v[ok] for k, v in rows.items()},
                                                tsn, t1))
        bar.update(int(ok.sum()))
        flush()

    queue(order[~done[order]], rtol, atol, ts, explicit_max_steps, retire, slots)
    # stiff members (and any that exhausted the explicit budget or failed): Kvaerno5 from
    # where the explicit stepper stopped, every slot with its own step size, slots refilled
    # as they finish (not in worker threads: XLA's CPU runtime deadlocked with two
    # concurrent implicit runs)
    if stiff:
        stiff.sort(key=lambda item: item[0])  # an order independent of the retirements
        s_gids = np.array([g for g, _ in stiff])
        s_rows = {k: np.stack([r[k] for _, r in stiff]) for k in stiff[0][1]}
        _, s_depth, s_probs = make_rows(s_gids)

        def implicit_retire(gids, rows, work, slot_iters):
            pending["rows"].append(_implicit_finish(gids, rows, tsn, t1))
            pending["work"] += work
            pending["iters"] += slot_iters
            bar.update(len(gids))
            flush()

        run_implicit(s_rows, s_gids, np.asarray(s_depth),
                     s_probs if batched_problem else None,
                     shared_problem=shared, t1=t1, ts=ts, rtol=jnp.asarray(rtol, float),
                     atol=jnp.asarray(atol, float), gtol=gtol, budget=max_steps,
                     on_retire=implicit_retire, sharding=sharding if n_dev > 1 else None)
    flush(force=True)
    bar.close()

    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    inv = np.empty(B, int)
    inv[merged["index"]] = np.arange(B)
    m = {k: v[inv] for k, v in merged.items()}
    u0_all = np.asarray(make_rows(jnp.arange(B))[0])
    theta = m["theta"]
    least_squares = isinstance(sample, LeastSquares)
    loss, sub, sig, mu = (np.asarray(x) for x in _post(
        jnp.asarray(theta), jnp.asarray(u0_all), gd, gr, shared,
        problem if batched_problem else None, least_squares))
    rate, thm = np.full(B, np.nan), np.full(B, np.nan)
    if least_squares:
        thm = 2 * sig * mu
        for b in np.flatnonzero(m["ok"]):
            live = tsn <= m["t_final"][b]
            if live.sum() >= 2:
                rate[b] = empirical_rate(tsn[live], sub[b][live])
    chunks = np.unique(m["chunk"])
    first = [np.flatnonzero(m["chunk"] == c)[0] for c in chunks]
    eff = m["efficiency"][first]
    spent = m["slot_iters"][first].sum()
    overall = float(m["work"][first].sum() / spent) if spent else float("nan")
    return SweepResult(
        depth=g_depth, scale=g_scale, seed=g_seed, ts=tsn, theta=theta, loss=loss,
        theta_final=theta[:, -1], num_steps=m["num_steps"], ok=m["ok"].astype(bool),
        result=m["result"], t_final=m["t_final"], implicit=m["implicit"].astype(bool),
        sigma=sig, rate=rate, theorem2_rate=thm, layers0=u0_all, chunk=m["chunk"],
        efficiency=eff, overall_efficiency=overall,
    )


@eqx.filter_jit
def _make_rows(gids, gd, gs, gr, key, max_depth, dim, init, problem_fn):
    """Initial layers (padded), depths and (for a seed -> problem function) the problems of
    the grid points `gids`."""
    keys = jax.vmap(lambda r: jr.fold_in(key, r))(gr[gids])
    u0 = jax.vmap(lambda k, d, sc: padded_init(k, d, max_depth, dim, sc, init))(
        keys, gd[gids], gs[gids])
    probs = None if problem_fn is None else jax.vmap(problem_fn)(gr[gids])
    return u0, gd[gids], probs


@eqx.filter_jit
def _post(theta, u0, depth, seeds, shared, problem_fn, least_squares: bool):
    """Loss, suboptimality (least squares), sigma and PL constants of every grid point."""
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
    sig = jax.vmap(masked_sigma)(u0, depth)
    return loss, sub, sig, mu


def _finish_rows(gids, rows, tsn, t1):
    """Explicit results to sweep rows: saves after a steady-state stop hold the final state."""
    theta = rows["saves"].copy()
    final = np.prod(rows["u"], axis=1)
    after = np.arange(theta.shape[1])[None, :] >= rows["save_i"][:, None]
    theta = np.where(after[..., None], final[:, None, :], theta)
    conv = rows["status"] == CONVERGED
    result = np.where(conv, int(dfx.RESULTS.event_occurred._value), 0)
    return dict(index=np.asarray(gids), theta=theta, num_steps=rows["steps"],
                ok=np.ones(len(gids), bool), result=result,
                t_final=np.where(conv, rows["t"], float(t1)),
                implicit=np.zeros(len(gids), bool))


def _implicit_finish(gids, out, ts, t1):
    """Result rows of trajectories finished by Kvaerno5 (`_stepper.run_implicit`)."""
    ok = (out["status"] == DONE) | (out["status"] == CONVERGED)
    res = _finish_rows(gids, out, np.asarray(ts), t1)
    res["ok"] = ok
    res["result"] = np.where(ok, res["result"], int(dfx.RESULTS.max_steps_reached._value))
    res["t_final"] = np.where(ok, res["t_final"], out["t"])
    res["implicit"] = np.ones(len(gids), bool)
    return res


def _problem_fingerprint(problem, batched, seeds):
    p = problem(seeds[0]) if batched else problem
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(p) if hasattr(x, "shape")]
    h = hashlib.sha256()
    for x in leaves:
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]

