"""The host loop over one slot array: fill free slots from a queue, step, retire finished
slots, and move the last busy ones to smaller arrays once the queue is empty."""

import threading

import numpy as np

from ._advance import TSIT5, compiled_for, refill, with_empty_carry
from ._slots import (
    ACTIVE,
    SLOT_QUANTUM,
    Slots,
    _gather,
    _placer,
    empty_slots,
    platform,
    take_rows,
)


def _run_worker(queue, placeholder, make_rows, S, max_depth, dim, shared_problem, t0, t1, ts,
                rtol, atol, gtol, budget, on_retire, segment_iters, tail_slots, device,
                dtype, method=TSIT5, stats=None):
    """One slot array of `S` slots on `device` (None: the default one) stepped with `method`
    over `queue`'s grid points."""
    T = ts.shape[0]
    put = _placer(device)
    shared_problem, t0, t1, ts, rtol, atol, gtol = put((shared_problem, t0, t1, ts, rtol, atol,
                                                        gtol))
    _, _, rows0 = make_rows(np.full(S, placeholder))
    slots = empty_slots(S, max_depth, dim, T, dtype, put(rows0))
    slots = put(with_empty_carry(slots, method, shared_problem, rtol, atol))

    def fill(slots, place, new):  # new trajectories from t0
        replace, gid = _placement(slots.t.shape[0], place, new)
        u0, depth, rows = make_rows(np.where(gid >= 0, gid, placeholder))
        slots = refill(slots, put(replace), put(gid.astype(np.int32)),
                       put(u0), put(depth), put(rows), shared_problem, t0, t1, ts, rtol, atol,
                       method)
        return slots, new

    step = stepping(device, shared_problem, t1, ts, rtol, atol, gtol, budget, segment_iters,
                    method)
    _drive(slots, queue, fill, step, on_retire, tail_slots, stats)


def _placement(S: int, place, gids):
    """Host arrays for a refill of `S` slots: the mask of the slots `place` and the grid
    index of every slot (`gids` there, -1 elsewhere)."""
    replace = np.zeros(S, bool)
    replace[place] = True
    gid = np.full(S, -1, np.int64)
    gid[place] = gids
    return replace, gid


def stepping(device, shared_problem, t1, ts, rtol, atol, gtol, budget: int,
             segment_iters: int, method):
    """`step(slots, retire_at)` for `_drive`: `advance` with `method` on `device` (None: the
    default one), as compiled for its platform, its constants put on the device once."""
    put = _placer(device)
    advance, _ = compiled_for(method, platform(device))
    budget, segment_iters = put((np.asarray(budget), np.asarray(segment_iters)))

    def step(slots, retire_at):
        return advance(slots, shared_problem, t1, ts, rtol, atol, gtol, budget, segment_iters,
                       put(np.asarray(retire_at)), method)

    return step


def _retire_buffer(S: int, q: int) -> int:
    """Rows gathered per retirement (fixed per slot-array size: one compile each)."""
    return max(q, -(-(S // 8) // q) * q)


def _gather_finished(slots: Slots, fin, R: int) -> list:
    """Dispatch on-device gathers of the finished slots `fin` in buffers of `R` rows."""
    idx = np.flatnonzero(fin)
    out = []
    for k in range(0, idx.size, R):
        part = idx[k:k + R]
        buf = np.full(R, part[0])
        buf[:part.size] = part
        out.append((part.size, take_rows(slots, buf)))
    return out


def _to_host(blocks, stats) -> dict:
    """The gathered rows on the host (the transfer waits for the gathers)."""
    full = [(m, {k: np.asarray(v) for k, v in dev.items()}) for m, dev in blocks]
    stats.add(host_syncs=len(blocks), rows_to_host=sum(len(r["t"]) for _, r in full),
              bytes_to_host=sum(v.nbytes for _, r in full for v in r.values()))
    return {k: np.concatenate([r[k][:m] for m, r in full]) for k in full[0][1]}


class Stats:
    """Counters of the host loop, shared by the worker threads of one sweep."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = dict(host_syncs=0, bytes_to_host=0, rows_to_host=0, retirements=0,
                           iterations=0, stepping_calls=0)
        self.shapes, self.devices = set(), set()

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                self.counts[k] += int(v)

    def saw(self, S: int, devices=()) -> None:
        with self._lock:
            self.shapes.add(S)
            self.devices.update(d.id for d in devices)

    def summary(self) -> dict:
        return {**self.counts, "slot_array_sizes": sorted(self.shapes),
                "devices": sorted(self.devices)}


def _drive(slots: Slots, queue, fill, step, on_retire, tail_slots: int,
           stats: Stats | None = None):
    """Step `slots` until `queue` is empty and every slot finished: free slots take the next
    items of `queue` (`fill(slots, place, items) -> (slots, grid indices)`), `step(slots,
    retire_at)` runs `advance`, finished slots go to `on_retire`. Once the queue is empty,
    busy slots move to one 8x smaller array (at least `tail_slots`) when 7/8 of them are idle:
    two compiled slot-array sizes at most.

    Only the finished rows cross to the host (gathered on the device into fixed-size
    buffers), and their host work (`on_retire`: result rows, chunk files) runs after the
    next refill and stepping are dispatched, so it overlaps the device's stepping (JAX's
    asynchronous dispatch)."""
    stats = Stats() if stats is None else stats
    q = SLOT_QUANTUM
    S = slots.t.shape[0]
    device = slots.t.devices()  # (migrations keep it)
    tail = max(-(-max(tail_slots, q) // q) * q, -(-(S // 8) // q) * q)
    if S % q and tail < S:  # (an array that never moves, as the stiff members', may be small)
        raise ValueError(f"slot arrays that move to a tail array must hold a multiple of {q} "
                         f"slots, got {S}.")
    occupied = np.zeros(S, bool)
    gid_host = np.full(S, -1, np.int64)
    work, iters = 0, 0
    pending = None  # (grid indices, gathered blocks, work, slot-iterations) of the last step

    def flush():
        if pending is not None:
            gids, blocks, w, si = pending
            on_retire(gids, _to_host(blocks, stats), w, si)

    while True:
        free_idx = np.flatnonzero(~occupied)
        new = queue.take(free_idx.size)
        if new.size:
            # finished slots not refilled keep their status (not stepped) and are skipped
            # below: a refill is only needed for new trajectories
            place = free_idx[:new.size]
            slots, gids = fill(slots, place, new)
            occupied[place] = True
            gid_host[place] = gids
        if not occupied.any():
            if not queue.wait():  # (`HandOver`: until more come or none will)
                break
            continue
        drained = queue.empty()
        if drained and tail < S and occupied.sum() <= tail:
            # The queue is empty and at most 1/8 of the slots are busy (long, often stiff
            # trajectories): move them to the small array, whose iterations are cheaper
            keep = np.flatnonzero(occupied)
            spare = np.flatnonzero(~occupied)[: tail - keep.size]
            idx = np.concatenate([keep, spare])
            slots = _gather(slots, idx)  # stays on the slots' device
            occupied, gid_host = occupied[idx], gid_host[idx]
            S = tail
            continue
        stats.saw(S, device)
        # `advance` counts every finished slot, also those already reported
        reported = int(np.sum((gid_host >= 0) & ~occupied))
        it, w, slots = step(slots, reported + (max(1, S // 8) if not drained else S + 1))
        flush()  # the previous retirement's host work, while this step runs
        pending = None
        status = np.asarray(slots.status)
        iters += int(it)
        work += int(w)
        fin = occupied & (status != ACTIVE)
        stats.add(host_syncs=1, bytes_to_host=status.nbytes + 16, iterations=int(it),
                  stepping_calls=1)
        if fin.any():
            stats.add(retirements=1)
            blocks = _gather_finished(slots, fin, _retire_buffer(S, q))
            pending = (gid_host[fin], blocks, work, iters * S)
            work, iters = 0, 0
            occupied[fin] = False
    flush()
