"""The sweep's stepping over slot arrays (`_slots`, `_advance`, `_drive`): by default the
fused explicit Tsit5 in worker threads and the structured Kvaerno5 for stiff members; with a
diffrax solver (`_diffrax_method`), that solver throughout. Every phase is fed by a queue
that can be stopped (an interrupt takes effect at the end of the current segment of
stepping)."""

import threading

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

from ._advance import KVAERNO5, TSIT5, _refill_states, advance
from ._diffrax_method import diffrax_method
from ._drive import _drive, _run_worker
from ._slots import SLOT_QUANTUM, _placer, empty_slots

# iterations per call of the Kvaerno5 stepping: a Kvaerno5 step costs ~50 explicit ones, so
# shorter segments than the explicit 256 keep an interrupt's latency ~1 s (the results do
# not depend on it: a slot's arithmetic does not depend on when the others are refilled)
_IMPLICIT_SEGMENT = 64


class Stopped(Exception):
    """Raised in a worker thread when the sweep is stopped."""


class StoppableQueue:
    """Grid indices handed out in order under a lock; `take` raises `Stopped` once `stop` is
    set."""

    def __init__(self, order, stop: threading.Event):
        self.order, self.pos, self.stop = np.asarray(order, np.int64), 0, stop
        self.lock = threading.Lock()

    def take(self, n: int):
        if self.stop.is_set():
            raise Stopped
        with self.lock:
            out = self.order[self.pos:self.pos + n]
            self.pos += out.size
            return out

    def empty(self) -> bool:
        return self.pos >= self.order.size


def run_threads(fns, stop: threading.Event) -> None:
    """Run `fns` in threads; the main thread only waits, so Ctrl-C reaches it at once: it
    sets `stop`, waits for the threads (they stop at their next `take`) and re-raises. An
    error in a thread stops the others and is raised here."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.05)
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def _serialised(on_retire):
    """`on_retire` called by one thread at a time."""
    lock = threading.Lock()

    def call(*a):
        with lock:
            on_retire(*a)

    return call


class Methods:
    """Everything the stepping needs about a sweep; `explicit` and `implicit` run a queue.

    `solver`: None (the fused Tsit5, stiff members handed to the structured Kvaerno5), or
    a diffrax solver or its name (`_diffrax_method`): that solver for every member, with no
    hand-over; `implicit` then only passes on the members that failed or ran out of steps."""

    def __init__(self, *, make_rows, max_depth, dim, shared, t0, t1, ts, rtol, atol, gtol,
                 devices, workers: int, slots: int, stop: threading.Event, solver=None,
                 stats=None):
        self.make_rows, self.max_depth, self.dim, self.shared = make_rows, max_depth, dim, shared
        self.t0, self.t1, self.ts, self.gtol = t0, t1, ts, gtol
        self.rtol, self.atol = jnp.asarray(rtol, float), jnp.asarray(atol, float)
        # `devices`: None (one device: arrays stay where JAX puts them) or this process's
        # devices; worker i steps its own slot array on devices[i % len(devices)]
        self.devices, self.workers, self.slots, self.stop = devices, workers, slots, stop
        self.method = None if solver is None else diffrax_method(solver)
        self.stats = stats  # `_drive.Stats` or None

    def device(self, i: int):
        return None if self.devices is None else self.devices[i % len(self.devices)]

    def on_cpu(self) -> bool:
        return (jax.devices() if self.devices is None else self.devices)[0].platform == "cpu"

    def explicit(self, queue, on_retire, *, budget: int, workers: int, rtol=None, atol=None,
                 ts=None):
        """The fused Tsit5 (or the diffrax method) over `queue`'s grid points in `workers`
        threads, each with its own slot array (`_run_worker`): `on_retire(gids, rows, work,
        slot_iters)` (serialised). Once the queue is empty a worker's busy slots move to one
        8x smaller array. An implicit diffrax solver runs in one thread on CPUs (see
        `implicit`)."""
        serialised = _serialised(on_retire)
        rtol = self.rtol if rtol is None else jnp.asarray(rtol, float)
        atol = self.atol if atol is None else jnp.asarray(atol, float)
        implicit = self.method is not None and isinstance(self.method.solver,
                                                          dfx.AbstractImplicitSolver)
        args = (self.make_rows, self.slots // self.workers, self.max_depth, self.dim,
                self.shared, self.t0, self.t1, self.ts if ts is None else ts, rtol, atol,
                self.gtol, budget, serialised, _IMPLICIT_SEGMENT if implicit else 256,
                SLOT_QUANTUM)
        method = TSIT5 if self.method is None else self.method
        n = 1 if implicit and self.on_cpu() else max(1, workers)
        run_threads([lambda i=i: _run_worker(queue, 0, *args, self.device(i), jnp.float64,
                                             method, self.stats) for i in range(n)], self.stop)

    def implicit(self, rows: dict, gids, depth, problem_rows, on_retire, *, budget: int,
                 num_slots: int = 16):
        """Kvaerno5 from where the explicit stepper stopped, every slot with its own step
        size, in an array of `num_slots` slots refilled as members finish (one compilation
        whatever their number): one array and thread per accelerator, all taking members
        from one queue; on CPUs one (XLA's CPU runtime deadlocked with two concurrent
        implicit runs).

        With a diffrax solver there is no hand-over: the members (failed or out of steps)
        are retired as they are."""
        if self.method is not None:
            on_retire(np.asarray(gids), rows, 0, 0)
            return
        S = -(-num_slots // SLOT_QUANTUM) * SLOT_QUANTUM
        gids, depth = np.asarray(gids), np.asarray(depth)
        if problem_rows is not None:
            problem_rows = jax.tree_util.tree_map(np.asarray, problem_rows)
        queue = StoppableQueue(np.arange(len(gids)), self.stop)
        serialised = _serialised(on_retire)

        def run(device):
            put = _placer(device)
            shared, t1, ts, rtol, atol, gtol = put((self.shared, self.t1, self.ts, self.rtol,
                                                    self.atol, self.gtol))

            def problems(take):
                return (None if problem_rows is None else
                        jax.tree_util.tree_map(lambda x: put(jnp.asarray(x[take])), problem_rows))

            def fill(slots, place, new):
                idx = np.zeros(S, np.int64)
                idx[place] = new
                replace = np.zeros(S, bool)
                replace[place] = True
                gid = np.where(replace, gids[idx], -1)
                sel = {k: put(jnp.asarray(v[idx])) for k, v in rows.items()}
                slots = _refill_states(
                    slots, put(jnp.asarray(replace)), sel["u"], sel["xi"], sel["t"],
                    sel["steps"], sel["save_i"], sel["saves"], put(jnp.asarray(gid, jnp.int32)),
                    put(jnp.asarray(depth[idx])), problems(idx), shared, t1, rtol, atol)
                return slots, gids[new]

            def step(slots, retire_at):
                return advance(slots, shared, t1, ts, rtol, atol, gtol,
                               put(jnp.asarray(budget)), put(jnp.asarray(_IMPLICIT_SEGMENT)),
                               put(jnp.asarray(retire_at)), KVAERNO5)

            slots = put(empty_slots(S, rows["u"].shape[1], self.dim, self.ts.shape[0],
                                    rows["u"].dtype, problems(np.zeros(S, np.int64))))
            _drive(slots, queue, fill, step, serialised, S, self.stats)

        devices = [None] if self.devices is None else self.devices
        if self.on_cpu():
            devices = devices[:1]  # (XLA's CPU runtime deadlocked with two concurrent runs)
        run_threads([lambda d=d: run(d) for d in devices], self.stop)
