"""Chunks as a shared work queue: this process claims chunks (leases in the store), streams
their grid points through its slot arrays, writes each chunk once all its rows are done,
and on an interrupt (or any error) saves the finished rows of the chunks it holds.

Work units are fixed: chunk c holds the grid points `order[c * size:(c + 1) * size]`, so a
chunk's contents do not depend on which process ran it, on thread timing or on resumes.
Claiming is on demand (a worker with free slots claims the next chunk), so a faster process
takes more chunks; a process that finds the remaining chunks held by others waits and takes
over the leases that expire (their process died)."""

import sys
import threading
import time
import warnings

import numpy as np

from ._methods import HandOver, StoppableQueue, Stopped, run_threads
from ._rows import RAW, finish_rows, implicit_finish
from ._slots import CONVERGED, DONE
from ._store import release_free_memory


class _Rows:
    """A chunk's finished rows, each written in place at its position in the chunk as it
    arrives (`np.empty` buffers: pages are resident once rows are written), so that a
    completed chunk is its buffers, in the chunk's order, without being concatenated and
    permuted (two copies of the chunk, at the end of a sweep for most chunks)."""

    def __init__(self, size: int):
        self.have = np.zeros(size, bool)
        self.buf: dict[str, np.ndarray] = {}

    def put(self, raw: dict, at) -> None:
        """The rows `raw` at the positions `at` in the chunk."""
        for k in RAW:
            v = np.asarray(raw[k])
            if k not in self.buf:
                self.buf[k] = np.empty((self.have.size,) + v.shape[1:], v.dtype)
            elif np.result_type(self.buf[k], v) != self.buf[k].dtype:  # as concatenating
                self.buf[k] = self.buf[k].astype(np.result_type(self.buf[k], v))
            self.buf[k][at] = v
        self.have[at] = True

    def full(self) -> bool:
        return bool(self.have.all())

    def stacked(self) -> dict:
        """The rows finished, in the chunk's order."""
        if self.full():
            return self.buf
        return {k: v[self.have] for k, v in self.buf.items()}

    def __bool__(self) -> bool:
        return bool(self.have.any())


class Book:
    """The chunks this process holds and their finished rows. `write(c, raw, partial)`
    returns a chunk's file contents (derived fields added) from its raw rows."""

    def __init__(self, store, order, size: int, write):
        self.store, self.order, self.size, self.write = store, order, size, write
        self.chunk_of = np.empty(len(order), int)
        self.chunk_of[order] = np.arange(len(order)) // size
        self.place_of = np.empty(len(order), int)  # a grid point's position in its chunk
        self.place_of[order] = np.arange(len(order)) % size
        self.rows: dict[int, _Rows] = {}
        # slot-steps and slot-iterations since the last chunk was written (they go with the
        # next one, as the lockstep efficiency of the stepping that finished it), and those
        # an interrupted run recorded in a chunk's partial file
        self.spent = np.zeros(2, np.int64)
        self.carried: dict[int, np.ndarray] = {}
        self.lock = threading.RLock()
        self.written = []  # chunks this process wrote

    def members(self, c: int):
        return self.order[c * self.size:(c + 1) * self.size]

    def open(self, c: int):
        """Start chunk `c` (claimed): its rows saved by an interrupted run, and the grid points
        still to compute."""
        part = self.store.read_partial(c)
        with self.lock:
            self.rows[c] = _Rows(len(self.members(c)))
            if part is not None:
                self.rows[c].put(part, self.place_of[np.asarray(part["index"])])
            self.carried[c] = (np.zeros(2, np.int64) if part is None else
                               np.array([part["work"], part["slot_iters"]], np.int64))
            have = [] if part is None else part["index"]
            missing = self.members(c)[~np.isin(self.members(c), have)]
            if not missing.size:
                self._complete(c)
        return missing

    def spend(self, work: int, slot_iters: int) -> None:
        with self.lock:
            self.spent += (work, slot_iters)

    def add(self, raw: dict) -> None:
        with self.lock:
            chunks = self.chunk_of[raw["index"]]
            done = []
            for c in np.unique(chunks):
                sel = chunks == c
                self.rows[c].put({k: raw[k][sel] for k in RAW},
                                 self.place_of[raw["index"][sel]])
                if self.rows[c].full():
                    done.append(c)
            # chunks finished by one retirement share the stepping that finished them
            for k, c in enumerate(done):
                self._complete(c, self.spent // (len(done) - k))
        # the retirements' copies and the stepping's freed buffers (once a second at most)
        release_free_memory(1.0)

    def _write(self, c: int, partial: bool, share=None, keep: bool = False) -> None:
        """Write chunk `c`'s file; the stepping it accounts for is taken off the books only
        once the file is written (a failed write leaves them as they were)."""
        share = self.spent.copy() if share is None else share
        spent = self.carried[c] + share
        self.store.write_chunk(c, dict(self.write(c, self.rows[c].stacked(), partial),
                                       work=spent[0], slot_iters=spent[1]), partial)
        if not keep:
            self.spent -= share
            del self.carried[c]

    def _complete(self, c: int, share=None) -> None:
        self._write(c, False, share)
        self.store.log(f"chunk {c} rows {len(self.members(c))}")
        self.store.release(c)
        self.written.append(c)
        del self.rows[c]

    def save_partial(self, keep: bool = False) -> None:
        """Write the finished rows of every chunk held (the unit of resume). `keep`: the
        chunks stay held (an interrupt saves at once, then again once the threads ended,
        with the rows they finished meanwhile)."""
        with self.lock:
            share = self.spent.copy()  # (the stepping not yet in a file, with the first)
            for c, rows in list(self.rows.items()):
                if rows:
                    self._write(c, True, share, keep)
                    share = np.zeros_like(share)
            if not keep:
                self.rows.clear()


class ChunkQueue(StoppableQueue):
    """The grid points of the chunks this process claims, claimed as slots free up."""

    def __init__(self, store, book: Book, n_chunks: int, stop):
        super().__init__(np.empty(0, np.int64), stop)
        self.store, self.book, self.n_chunks = store, book, n_chunks
        self.next_c, self.exhausted, self.claimed = 0, False, 0

    def take(self, n: int):
        if self.stop.is_set():
            raise Stopped
        with self.lock:
            while self.order.size - self.pos < n and not self.exhausted:
                c = self._claim_next()
                if c is None:
                    self.exhausted = True
                    break
                self.claimed += 1
                missing = self.book.open(c)
                self.order, self.pos = np.concatenate([self.order[self.pos:], missing]), 0
            out = self.order[self.pos:self.pos + n]
            self.pos += out.size
            return out

    def _claim_next(self):
        while self.next_c < self.n_chunks:
            c = self.next_c
            self.next_c += 1
            if self.store.claim(c):
                return c
        return None

    def empty(self) -> bool:
        return self.exhausted and self.pos >= self.order.size


class Scheduler:
    """Runs a sweep's chunks in this process (see the module docstring)."""

    def __init__(self, *, store, methods, book: Book, batched: bool, tsn, t1,
                 explicit_max_steps: int, max_steps: int, bar, poll: float):
        self.store, self.methods, self.book, self.bar = store, methods, book, bar
        self.batched, self.tsn, self.t1 = batched, tsn, t1
        self.explicit_max_steps, self.max_steps, self.poll = explicit_max_steps, max_steps, poll
        self.n_chunks = -(-len(book.order) // book.size)

    def run(self) -> None:
        stop = self.methods.stop
        renewing = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(renewing,), daemon=True)
        renewer.start()
        try:
            while True:
                claimed = self._round()
                if all(self.store.complete(c) for c in range(self.n_chunks)):
                    self.store.clean()
                    break
                if not claimed:  # the rest is held by others: wait for them or their expiry
                    time.sleep(self.poll)
        except BaseException as e:
            stop.set()
            try:
                self.book.save_partial()
            except OSError as save_error:  # (e.g. `out` deleted): the original error stands
                warnings.warn(f"sweep: could not save the finished rows after {e!r}: "
                              f"{save_error}", RuntimeWarning, stacklevel=2)
            raise
        finally:
            renewing.set()
            self.store.release_all()

    def _renew(self, done: threading.Event) -> None:
        while not done.wait(self.store.lease_timeout / 4):
            try:
                self.store.renew()
            except OSError as e:  # a filesystem hiccup: retried at the next renewal
                print(f"sweep: lease renewal failed: {e}", file=sys.stderr)

    def _round(self) -> bool:
        """Claim chunks until none is left to claim, step them; returns whether any was
        claimed. Stiff members (and any that exhausted the explicit budget or failed) go on
        with Kvaerno5 from where the explicit stepper stopped, in threads that run beside
        the explicit ones (`HandOver`)."""
        methods = self.methods
        queue = ChunkQueue(self.store, self.book, self.n_chunks, methods.stop)
        handover = HandOver(methods.stop)
        lock = threading.RLock()  # one retirement at a time, whichever phase

        def retire(gids, rows, work, slot_iters):
            with lock:
                self.book.spend(work, slot_iters)
                ok = (rows["status"] == DONE) | (rows["status"] == CONVERGED)
                if (~ok).any():
                    bad = {k: v[~ok] for k, v in rows.items()}
                    if methods.method is None:
                        handover.put([(int(g), {k: v[i] for k, v in bad.items()})
                                      for i, g in enumerate(gids[~ok])])
                    else:  # a diffrax solver: no hand-over, retired as they are
                        retire_stiff(gids[~ok], bad, 0, 0, handed_back=True)
                if ok.any():
                    self.book.add(finish_rows(gids[ok], {k: v[ok] for k, v in rows.items()},
                                              self.tsn, self.t1))
                self.bar.update(int(ok.sum()))

        def retire_stiff(g, out, work, slot_iters, handed_back=False):
            with lock:
                self.book.spend(work, slot_iters)
                rows = implicit_finish(g, out, self.tsn, self.t1)
                if handed_back:
                    rows["implicit"] = np.zeros_like(rows["implicit"])
                self.book.add(rows)
                self.bar.update(len(g))

        todo = sum(not self.store.complete(c) for c in range(self.n_chunks))
        explicit = methods.explicit_workers(queue, retire, budget=self.explicit_max_steps,
                                            workers=min(methods.workers,
                                                        todo * self.book.size))
        left = [len(explicit)]

        def closing(fn):  # the last explicit worker to end closes the hand-over
            def run():
                try:
                    fn()
                finally:
                    with lock:
                        left[0] -= 1
                        if not left[0]:
                            handover.close()
            return run

        implicit = (methods.implicit_workers(handover, retire_stiff, budget=self.max_steps)
                    if methods.method is None else [])
        run_threads([closing(fn) for fn in explicit] + implicit, methods.stop,
                    on_interrupt=lambda: self.book.save_partial(keep=True))
        return queue.claimed > 0
