"""`sweep`: check the arguments, plan the grid (chunks, slots), run the chunks (this
process's share of them), assemble the result from the chunks."""

import gc
import hashlib
import importlib.metadata
import json
import os
import socket
import sys
import threading
import uuid
import warnings

import diffrax as dfx
import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from .._loss import LeastSquares, as_problem
from .._validate import check_times, check_tolerances
from ._check import check_grid, check_key, check_out, check_steps, resolve_problem
from ._diffrax_method import diffrax_method
from ._drive import Stats
from ._methods import Methods, StoppableQueue
from ._result import SweepResult, assemble_from
from ._rows import INITS, derived, make_rows, problem_rows
from ._scheduler import Book, Scheduler
from ._slots import BUDGET, SLOT_QUANTUM
from ._store import Store


def _devices(B, T, dim, max_depth, max_slots, memory_budget, workers):
    """This process's devices (None for one), worker threads (each with its own slot array,
    on device `i % n_dev`) and slots in all."""
    devices = jax.local_devices()  # under `jax.distributed`: this process's share only
    n_dev = len(devices)
    on_cpu = devices[0].platform == "cpu"
    if workers is None:
        # one more thread than cores: a core stays busy while a thread does its host work
        # (retiring and refilling slots)
        workers = (os.cpu_count() or 1) + 1 if on_cpu and n_dev == 1 else n_dev
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1, got {workers}.")
    if workers % n_dev:
        raise ValueError(f"`workers` must be a multiple of the number of devices ({n_dev}: "
                         f"each device steps the same number of slot arrays), got {workers}.")
    if max_slots is None:
        max_slots = 128 * workers if on_cpu else 2**14 * n_dev
    # memory per slot: saved theta, the state and the 7 stages of Tsit5
    per_traj = 8 * (T * dim + 24 * (max_depth + 1) * dim)
    per_worker = int(max(1, min(max_slots, memory_budget // per_traj, B) // workers))
    slots = workers * (-(-per_worker // SLOT_QUANTUM) * SLOT_QUANTUM)
    return (devices if n_dev > 1 else None), workers, slots


def _memory_maps() -> tuple[int, int] | None:
    """This process's memory mappings and the kernel's limit on them (Linux; else None)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return None


def _release_compiled_code(maps=_memory_maps) -> None:
    """Free JAX's compiled programs when the process holds over half the kernel's limit on
    memory mappings (`vm.max_map_count`): XLA's CPU compiler maps each compiled program's
    code separately (a sweep's programs take ~500 mappings) and crashes with a segmentation
    fault once `mmap` fails, after a few thousand compiles in one process."""
    got = maps()
    if got is None or got[0] <= got[1] // 2:
        return
    warnings.warn(
        f"this process holds {got[0]} memory mappings (limit vm.max_map_count = {got[1]}), "
        "mostly the code of JAX's compiled programs: XLA crashes once the limit is reached. "
        "Calling `jax.clear_caches()` (programs are compiled again when needed); raise the "
        "limit (`sysctl vm.max_map_count=262144`) to keep them.", RuntimeWarning, stacklevel=3)
    jax.clear_caches()
    gc.collect()


def _fingerprint(problem, batched, seeds):
    p = problem(seeds[0]) if batched else problem
    h = hashlib.sha256()
    for x in jax.tree_util.tree_leaves(p):
        if hasattr(x, "shape"):
            h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()[:16]


def _versions() -> dict:
    try:
        own = importlib.metadata.version("ddln_jax")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        own = "0.0.0"
    return {"ddln_jax": own, "jax": jax.__version__, "diffrax": dfx.__version__,
            "numpy": np.__version__}


def _pilot_order(methods: Methods, B, t0, t1, ts, rtol, explicit_max_steps):
    """A cheap pilot (loose tolerance, 2^12 steps, no intermediate saves) estimates each
    trajectory's cost; the queue then starts with the longest (LPT scheduling), so the last
    slots to finish are short ones."""
    est = np.zeros(B)

    def retire(gids, rows, work, slot_iters):
        # converged or done: its steps at loose tolerance x (1e-4/rtol)^(1/5) for a 5th-order
        # method; out of budget (stiff: the step is stability-limited, not tolerance-limited):
        # the budget extrapolated to the whole interval
        frac = (rows["t"] - float(t0)) / float(t1 - t0)
        est[gids] = np.where(rows["status"] == BUDGET,
                             2**12 / np.maximum(frac, 2**12 / explicit_max_steps),
                             rows["steps"] * (1e-4 / float(rtol)) ** 0.2)

    methods.explicit(StoppableQueue(np.arange(B), methods.stop), retire, budget=2**12,
                     workers=min(methods.workers, B), rtol=1e-4, atol=1e-6,
                     ts=np.full_like(np.asarray(ts), float(t1)))
    return np.argsort(-est, kind="stable")


def sweep(problem, *, depths, scales, seeds, t1, ts, init: str = "gaussian", t0=0.0,
          rtol=1e-8, atol=1e-10, stop_when_converged=None, out=None,
          memory_budget: int = 2**30, max_chunk: int = 256, max_slots: int | None = None,
          workers: int | None = None, explicit_max_steps: int = 2**16, max_steps: int = 2**20,
          pilot: bool = False, progress: bool = True, lease_timeout: float = 120.0,
          solver=None, dim: int | None = None, key) -> SweepResult:
    """Gradient flows over the grid depths x scales x seeds, in compiled, vmapped chunks.

    **Arguments:**

    - `problem`: a fixed problem (e.g. `dd.LeastSquares(X, y)`); a differentiable loss
        theta -> scalar (give `dim=`); or `dd.per_seed(fn)` for a function `seed -> problem`
        (traceable: built inside `jax.vmap`). A plain function is always a loss: a
        `seed -> problem` function must be wrapped.
    - `depths`, `scales`, `seeds`: the grid, each value once (ints >= 2, floats >= 0 — a 0
        warns: all-zero layers do not move —, ints; an integer-valued number n of any type
        for `seeds` means `range(n)`). Non-integer depths or seeds are refused, not rounded.
    - `t1`, `ts`, `t0`, `rtol`, `atol`: as `gradient_flow`.
    - `init`: "gaussian" (scale * N(0, 1)) or "zero_first" (first layer 0). The init of a grid
        point is drawn from `fold_in(key, seed)`: the first `depth` rows of a
        `max(depths)`-row draw, so it does not depend on the rest of the grid.
    - `stop_when_converged`: gradient tolerance of the steady-state stop (None: off).
    - `out`: a folder (on a filesystem shared by all processes; created if missing; an existing
        file, an unwritable place or a folder of another sweep is an error). The grid is cut into
        fixed chunks of `max_chunk` points (the work units); each finished chunk is written there
        atomically, and any number of processes (one `sweep` call each, on any hosts, with or
        without `jax.distributed`) share the work through lease files; a rerun resumes. On an
        interrupt (Ctrl-C) or an error the finished rows of the chunks in flight are saved too.
        `load_sweep(out)` reads the folder, complete or not. Needed with several processes.
    - `memory_budget`: bytes for the slots (saved trajectories and solver state); caps the
        number of explicit slots (the stiff members' array adds 4 slots on a CPU, an eighth
        of the explicit ones per accelerator, at least 16). It does not cover the result
        itself (held once: chunks are merged into it field by field, each freed once copied)
        nor JAX's compiled programs.
    - `max_slots`: most trajectories stepped at once (over this process's devices).
        Default: 128 per worker on a CPU (the cost per slot-step is lowest while a slot array
        fits the core's cache), 16384 per accelerator.
    - `workers`: independent slot arrays stepped by as many host threads, all taking grid
        points from one queue (the result does not depend on it); with several devices,
        worker i steps its array on device i mod their number (a multiple of it). Default:
        one per CPU core plus one on a single CPU device, else one per device.
    - `max_chunk`: grid points per chunk (the unit of work, of writing and of resume).
    - `explicit_max_steps`: Tsit5 step budget per trajectory. Stiff members (Hairer's test,
        when the whole trajectory would take over 2^14 explicit steps) and those that
        exhaust it continue with Kvaerno5 from where they stopped (up to
        `max_steps` in all), in their own array (its size: `memory_budget`) refilled as they
        finish. An int >= 1.
    - `pilot`: first estimate every trajectory's cost with a loose-tolerance run and queue
        the longest first (fewer slots idle at the end; costs an extra ~half run).
    - `progress`: a progress bar over trajectories (and "resuming: k of B done").
    - `lease_timeout`: seconds after which a chunk claimed by a process that stopped renewing
        its lease (it died) is taken over by another.
    - `solver`: None (default) for the fused Tsit5 with the Kvaerno5 hand-over above; or a
        diffrax solver, an adaptive ODE one (e.g. `diffrax.Dopri5()`), or its name ("tsit5",
        "dopri5", "dopri8", "kvaerno5"): every step of every member is then that solver's
        own `step` with diffrax's `PIDController` (as `gradient_flow` with `solver=`),
        landing on the save times, with no hand-over and a budget of `max_steps`
        (`explicit_max_steps` is not used).
    - `dim`: the number of coordinates of theta, for a loss without a design matrix `X`
        (a problem with `X` needs none).
    - `key`: base PRNG key of the inits, e.g. `jax.random.key(0)` (required: the same key
        gives the same grid).

    **Returns:** a `SweepResult` in grid order (all of the grid, whichever process ran it).

    **Raises:** `ValueError`/`TypeError` on bad arguments; `KeyboardInterrupt` after saving.
    """
    depths, scales, seeds = check_grid(depths, scales, seeds)
    key = check_key(key)
    _release_compiled_code()
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")
    t0, t1, ts = check_times(t0, t1, ts)
    check_tolerances(rtol, atol, max_steps)
    check_steps(explicit_max_steps, max_steps)
    if max_chunk < 1 or memory_budget < 1 or lease_timeout <= 0:
        raise ValueError("`max_chunk`, `memory_budget` and `lease_timeout` must be > 0.")
    if out is None and jax.process_count() > 1:
        raise ValueError("several processes (`jax.distributed`) share a sweep through `out`: "
                         "pass a folder on a shared filesystem.")
    out = check_out(out)
    problem, batched, sample, dim = resolve_problem(problem, dim, seeds)
    plan = _Plan(problem, batched, depths, scales, seeds, key, init, dim)
    gtol = None if stop_when_converged is None else float(stop_when_converged)
    method_solver = None if solver is None else diffrax_method(solver).solver
    if method_solver is not None:  # no hand-over: one budget
        explicit_max_steps = max_steps
    chunk = int(max(1, min(max_chunk, plan.B)))
    spec = dict(format=2, depths=depths, scales=scales, seeds=seeds, t0=float(t0),
                t1=float(t1), ts=np.asarray(ts).tolist(), init=init, rtol=float(rtol),
                atol=float(atol), gtol=gtol, dim=plan.dim, chunk=chunk,
                key=np.asarray(jr.key_data(key)).tolist(), pilot=pilot,
                explicit_max_steps=explicit_max_steps, max_steps=max_steps,
                problem=_fingerprint(problem, batched, seeds))
    if method_solver is not None:  # (absent for the fused stepper: older folders resume)
        spec["solver"] = eqx.tree_pformat(method_solver)
    devices, workers, slots = _devices(plan.B, ts.shape[0], plan.dim, plan.max_depth,
                                       max_slots, memory_budget, workers)
    plan.block = slots // workers
    stop = threading.Event()
    methods = Methods(make_rows=plan.make_rows, problem_rows=plan.problem_rows,
                      max_depth=plan.max_depth, dim=plan.dim,
                      shared=plan.shared, t0=t0, t1=t1, ts=ts, rtol=rtol, atol=atol,
                      gtol=None if gtol is None else np.asarray(gtol), devices=devices,
                      workers=workers, slots=slots, stop=stop, solver=method_solver)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    store = Store(out, owner, lease_timeout)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def make_manifest():
        order = (_pilot_order(methods, plan.B, t0, t1, ts, rtol, explicit_max_steps)
                 if pilot and plan.B >= 64 else np.arange(plan.B))  # small: one batch anyway
        return {"hash": digest, "spec": spec, "order": order.tolist(), "versions": _versions()}

    manifest = store.manifest(digest, make_manifest, spec)
    tsn = np.asarray(ts)
    book = Book(store, np.asarray(manifest["order"], np.int64), chunk,
                lambda c, raw, partial: plan.chunk_file(raw, tsn, chunk, owner))
    plan.chunk_file(None, tsn, chunk, owner)  # compile now: an interrupt saves at once
    done = len({int(i) for _, p in store.parts(("index",)) for i in p["index"]})
    if done and progress:
        print(f"resuming: {done} of {plan.B} done", file=sys.stderr, flush=True)
    methods.stats = Stats()
    from tqdm.auto import tqdm  # (lazy: only a sweep shows a bar)

    with tqdm(total=plan.B, initial=done, desc="sweep", unit="traj",
              disable=not progress) as bar:
        Scheduler(store=store, methods=methods, book=book, batched=batched, tsn=tsn, t1=t1,
                  explicit_max_steps=explicit_max_steps, max_steps=max_steps, bar=bar,
                  poll=min(2.0, lease_timeout / 4)).run()
    res = assemble_from(manifest, store, consume=True)  # the store is not used after
    res.info.update(methods.stats.summary())  # this call's stepping (not a pilot's)
    return res


class _Plan:
    """The grid's points and how to make their initial states, problems and chunk files."""

    def __init__(self, problem, batched, depths, scales, seeds, key, init, dim):
        grid = [(L, s, r) for L in depths for s in scales for r in seeds]
        self.g_depth, self.g_scale, self.g_seed = (np.array([g[i] for g in grid])
                                                   for i in range(3))
        self.B, self.dim, self.max_depth = len(grid), dim, max(depths)
        self.key, self.init = key, init
        self.problem_fn = problem if batched else None
        self.shared = None if batched else as_problem(problem)
        self.least_squares = isinstance(as_problem(problem(seeds[0]) if batched else problem),
                                        LeastSquares)
        # (put, not `jnp.asarray`: that compiles a program per shape)
        self.gd, self.gs, self.gr = jax.device_put((self.g_depth, self.g_scale, self.g_seed))
        self.block = 1

    def make_rows(self, gids):
        # in blocks of one size whatever the number of rows asked for: one compilation
        # (drawing the inits compiles slowly, ~1 s per shape)
        gids = np.asarray(gids)
        n, block = gids.size, self.block
        padded = np.concatenate([gids, np.full((-n) % block, gids[0] if n else 0)])
        parts = [make_rows(padded[i:i + block], self.gd, self.gs, self.gr,
                           self.key, self.max_depth, self.dim, self.init, self.problem_fn)
                 for i in range(0, padded.size, block)]
        if len(parts) == 1 and n == block:  # (refills: the rows stay on the device)
            return parts[0]
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:n], *parts)

    def problem_rows(self, gids):
        """The depths and (for a seed -> problem function) the problems of the grid points
        `gids`, without drawing their initial layers (for members handed over mid-way)."""
        return problem_rows(np.asarray(gids), self.gd, self.gr, self.problem_fn)

    def chunk_file(self, raw: dict | None, tsn, size: int, owner: str) -> dict:
        if raw is None:  # a dummy row
            raw = dict(index=np.zeros(1, int), theta=np.zeros((1, tsn.size, self.dim)),
                       ok=np.zeros(1, bool), t_final=np.zeros(1))
        idx = raw["index"]
        u0, depth, _ = self.make_rows(idx)
        arrays = derived(raw, np.asarray(u0), np.asarray(depth), self.g_seed[idx], self.shared,
                         self.problem_fn, self.least_squares, tsn, size)
        return dict(arrays, producer=np.array(owner), process_index=np.array(jax.process_index()))
