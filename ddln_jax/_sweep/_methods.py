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

from ._advance import KVAERNO5, TSIT5, compiled_for
from ._diffrax_method import diffrax_method
from ._drive import _drive, _placement, _run_worker, stepping
from ._slots import SLOT_QUANTUM, _placer, empty_slots, platform

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

    def wait(self) -> bool:  # all of it was there from the start: nothing more will come
        return False


class HandOver:
    """Members handed from the explicit phase to the implicit one while both run: `put`
    appends (grid index, row) items, `close` says no more will come. `take` hands out
    positions in `items`; `wait` blocks until an item arrives (True) or none will (False)."""

    def __init__(self, stop: threading.Event):
        self.items, self.pos, self.closed, self.stop = [], 0, False, stop
        self.cond = threading.Condition()

    def put(self, items) -> None:
        with self.cond:
            self.items.extend(items)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def take(self, n: int):
        if self.stop.is_set():
            raise Stopped
        with self.cond:
            out = np.arange(self.pos, min(self.pos + n, len(self.items)))
            self.pos += out.size
            return out

    def empty(self) -> bool:
        with self.cond:
            return self.closed and self.pos >= len(self.items)

    def wait(self) -> bool:
        with self.cond:
            while not (self.closed or self.pos < len(self.items) or self.stop.is_set()):
                self.cond.wait(0.05)
            return self.pos < len(self.items)


def implicit_slots(on_cpu: bool, explicit_slots: int) -> int:
    """The stiff members' array size (see `Methods.implicit_workers`) beside explicit slot
    arrays of `explicit_slots` slots."""
    return 4 if on_cpu else max(16, explicit_slots // 8)


def run_threads(fns, stop: threading.Event, on_interrupt=None) -> None:
    """Run `fns` in threads; the main thread only waits, so Ctrl-C reaches it at once: it
    sets `stop`, calls `on_interrupt` (if any: it runs before the threads end, which can
    take a compile's time), waits for the threads (they stop at their next `take`) and
    re-raises. An error in a thread stops the others and is raised here."""
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
        try:
            if on_interrupt is not None:
                on_interrupt()
        finally:
            for t in threads:
                t.join()
        raise
    if errors:
        raise errors[0]


class Methods:
    """Everything the stepping needs about a sweep; `explicit` and `implicit` run a queue.

    `solver`: None (the fused Tsit5, stiff members handed to the structured Kvaerno5), or
    a diffrax solver or its name (`_diffrax_method`): that solver for every member, with no
    hand-over; `implicit` then only passes on the members that failed or ran out of steps."""

    def __init__(self, *, make_rows, problem_rows, max_depth, dim, shared, t0, t1, ts, rtol,
                 atol, gtol, devices, workers: int, slots: int, stop: threading.Event,
                 solver=None, stats=None):
        # make_rows(gids) -> (initial layers, depths, problems or None);
        # problem_rows(gids) -> (depths, problems or None), without drawing the layers
        self.make_rows, self.problem_rows = make_rows, problem_rows
        self.max_depth, self.dim, self.shared = max_depth, dim, shared
        self.t0, self.t1, self.ts, self.gtol = t0, t1, ts, gtol
        self.rtol, self.atol = np.asarray(rtol, float), np.asarray(atol, float)
        # `devices`: None (one device: arrays stay where JAX puts them) or this process's
        # devices; worker i steps its own slot array on devices[i % len(devices)]
        self.devices, self.workers, self.slots, self.stop = devices, workers, slots, stop
        self.method = None if solver is None else diffrax_method(solver)
        self.stats = stats  # `_drive.Stats` or None

    def device(self, i: int):
        return None if self.devices is None else self.devices[i % len(self.devices)]

    def on_cpu(self) -> bool:
        return (jax.devices() if self.devices is None else self.devices)[0].platform == "cpu"

    def explicit_workers(self, queue, on_retire, *, budget: int, workers: int, rtol=None,
                         atol=None, ts=None) -> list:
        """Thread bodies stepping the fused Tsit5 (or the diffrax method) over `queue`'s grid
        points, each with its own slot array (`_run_worker`), worker i on device i mod n:
        `on_retire(gids, rows, work, slot_iters)` (called from every worker thread: the
        caller serialises it if it needs to). Once the queue is empty a
        worker's busy slots move to one 8x smaller array. An implicit diffrax solver runs
        in one thread on CPUs (see `implicit_workers`)."""
        rtol = self.rtol if rtol is None else np.asarray(rtol, float)
        atol = self.atol if atol is None else np.asarray(atol, float)
        implicit = self.method is not None and isinstance(self.method.solver,
                                                          dfx.AbstractImplicitSolver)
        args = (self.make_rows, self.slots // self.workers, self.max_depth, self.dim,
                self.shared, self.t0, self.t1, self.ts if ts is None else ts, rtol, atol,
                self.gtol, budget, on_retire, _IMPLICIT_SEGMENT if implicit else 256,
                SLOT_QUANTUM)
        method = TSIT5 if self.method is None else self.method
        n = 1 if implicit and self.on_cpu() else max(1, workers)
        return [lambda i=i: _run_worker(queue, 0, *args, self.device(i), jnp.float64, method,
                                        self.stats) for i in range(n)]

    def explicit(self, queue, on_retire, **kwargs) -> None:
        """`explicit_workers` run to the end."""
        run_threads(self.explicit_workers(queue, on_retire, **kwargs), self.stop)

    def implicit_workers(self, handover: HandOver, on_retire, *, budget: int,
                         num_slots: int | None = None) -> list:
        """Thread bodies stepping Kvaerno5 from where the explicit stepper stopped, over the
        members `handover` brings (while the explicit phase runs), every slot with its own
        step size, in an array of `num_slots` slots refilled as members come and finish (one
        compilation whatever their number): one array and thread per accelerator; on CPUs
        one (XLA's CPU runtime deadlocked with two concurrent implicit runs).

        Default `num_slots`: 4 on CPUs, where the array mostly holds one or two members and
        its iterations take a core from the explicit workers (B = 4096: 525 us per
        iteration and 5.5 s of a core against 856 us and 8.6 s with 8 slots, 1329 us and
        11.9 s with 16); on accelerators an eighth of a device's explicit slots (at least
        16; 2048 at the default 2^14), as the explicit tail array: there an iteration
        costs about the same for any slot count while the device is not full, and the
        stiff members (7 % of the bench problem's at B = 4096) each take hundreds
        of Kvaerno5 steps (not measured on a GPU yet). The array never moves to a
        smaller one, so its size need not be a multiple of `SLOT_QUANTUM`: every member is
        stepped in an array of this one size, whichever slot it lands in."""
        S = num_slots if num_slots is not None else implicit_slots(
            self.on_cpu(), self.slots // self.workers)

        def run(device):
            put = _placer(device)
            _, refill_states = compiled_for(KVAERNO5, platform(device))
            shared, t1, ts, rtol, atol, gtol = put((self.shared, self.t1, self.ts, self.rtol,
                                                    self.atol, self.gtol))

            def fill(slots, place, new):
                items = [handover.items[i] for i in new]
                replace, gid = _placement(S, place, [g for g, _ in items])

                def full(x):  # S rows: the new ones at `place` (the others are not used)
                    out = np.repeat(x[:1], S, axis=0)
                    out[place] = x
                    return put(out)

                sel = {k: full(np.stack([r[k] for _, r in items])) for k in items[0][1]}
                depth, problems = self.problem_rows(np.where(gid >= 0, gid, items[0][0]))
                slots = refill_states(
                    slots, put(replace), sel["u"], sel["xi"], sel["t"],
                    sel["steps"], sel["save_i"], sel["saves"], put(gid.astype(np.int32)),
                    put(depth), put(problems), shared, t1, rtol, atol)
                return slots, gid[place]

            step = stepping(device, shared, t1, ts, rtol, atol, gtol, budget, _IMPLICIT_SEGMENT,
                            KVAERNO5)
            _, problems0 = self.problem_rows(np.zeros(S, np.int64))
            slots = put(empty_slots(S, self.max_depth, self.dim, self.ts.shape[0], jnp.float64,
                                    problems0))
            _drive(slots, handover, fill, step, on_retire, S, self.stats)

        devices = [None] if self.devices is None else self.devices
        if self.on_cpu():
            devices = devices[:1]  # (XLA's CPU runtime deadlocked with two concurrent runs)
        return [lambda d=d: run(d) for d in devices]
