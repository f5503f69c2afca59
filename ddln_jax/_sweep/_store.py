"""A sweep's results folder: manifest, chunk files, partial chunks and leases.

Every file is written to a temporary name unique to its writer and moved into place with
`os.replace` (atomic on POSIX filesystems, NFS and Lustre included): readers see a whole file
or none. Files whose name starts with "." are temporaries; they are ignored, and ones older
than an hour are deleted.

Leases (one file `lease_NNNNN` per chunk) make the chunks a shared work queue: a process
creates the lease with `os.open(O_CREAT | O_EXCL)` (one creator wins), renews it while it
works (the file holds a token and an expiry time) and deletes it once the chunk file is
written. An expired lease is taken over by the one process that creates the marker file
`lease_NNNNN.steal.<token>` for its token (again `O_EXCL`). Expiry compares wall clocks:
the hosts' clocks must agree to well within the lease time (NTP).
"""

import json
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

MANIFEST = "manifest.json"
_TMP_MAX_AGE = 3600.0
_CHUNK = re.compile(r"chunk_\d{5}(\.partial)?\.npz")


def _libc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_trim()


def release_free_memory(min_interval: float = 0.0) -> None:
    """Give the memory freed since the last call back to the OS (glibc: `malloc_trim`; a
    no-op elsewhere), at most once per `min_interval` seconds. glibc keeps freed blocks up
    to its mmap threshold (which rises to 32 MiB after the first such block is freed) in its
    per-thread arenas: without this a sweep's freed slot outputs, chunk copies and merged
    chunks stay resident. Not at every retirement: the pages given back are faulted in
    again by the next allocations (measured: 825 trims made a 32 s sweep 6 s slower)."""
    now = time.monotonic()
    if _MALLOC_TRIM is None or now - _LAST_TRIM[0] < min_interval:
        return
    _LAST_TRIM[0] = now
    _MALLOC_TRIM(0)


_LAST_TRIM = [-float("inf")]


def _chunk_name(c: int, partial: bool = False) -> str:
    return f"chunk_{c:05d}{'.partial' if partial else ''}.npz"


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file next to `path`, then move it to `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file; `ValueError` naming the file if it is not readable."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # a file not written by `write_atomic` (e.g. a partial copy)
        raise ValueError(f"cannot read sweep chunk {str(path)!r}: {e}") from e


class LazyChunk(Mapping):
    """The arrays of one chunk file, each read from disk when indexed."""

    def __init__(self, path: Path):
        self.path = path

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            with np.load(self.path) as f:
                if key not in f.files:
                    raise KeyError(key)
                return f[key]
        except (FileNotFoundError, KeyError):
            raise
        except Exception as e:  # a file not written by `write_atomic` (e.g. a partial copy)
            raise ValueError(f"cannot read sweep chunk {str(self.path)!r}: {e}") from e

    def __iter__(self):
        with np.load(self.path) as f:
            return iter(list(f.files))

    def __len__(self) -> int:
        with np.load(self.path) as f:
            return len(f.files)


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(there: dict | None, here: dict | None) -> str:
    """': `t1` is 10.0 there, 20.0 here' for the fields of two sweep specs that differ."""
    if not isinstance(there, dict) or here is None:
        return ""
    here = json.loads(json.dumps(here))  # as stored (tuples as lists, ...)
    names = [k for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)]
    if not names:
        return ""
    return ": " + "; ".join(f"{_ARGUMENT.get(k, f'`{k}`')} is {_short(there.get(k))} there, "
                            f"{_short(here.get(k))} here" for k in names)


# spec fields under another name than `sweep`'s argument
_ARGUMENT = {"gtol": "`stop_when_converged`", "chunk": "`max_chunk`",
             "problem": "the problem's data (`problem`, a fingerprint)"}


class Store:
    """The results folder `path` (None: kept in memory, one process, no leases)."""

    def __init__(self, path: str | os.PathLike | None, owner: str, lease_timeout: float):
        self.path = None if path is None else Path(path)
        self.owner, self.lease_timeout = owner, float(lease_timeout)
        self.held: dict[int, str] = {}  # chunk -> lease token
        self.memory: dict[str, dict] = {}
        self.lock = threading.RLock()  # lease operations (worker threads and the renewer)
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._clean_tmp()

    def _clean_tmp(self):
        now = time.time()
        for p in self.path.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > _TMP_MAX_AGE:
                    p.unlink()
            except FileNotFoundError:
                pass

    # ---- manifest ----
    def manifest(self, spec_hash: str, make, spec: dict | None = None) -> dict:
        """The folder's manifest; `make()` builds it when there is none (one process does:
        the others wait for it). Raises if the folder holds another sweep (naming the
        fields of `spec` that differ)."""
        if self.path is None:
            return make()
        mpath, lock = self.path / MANIFEST, self.path / "manifest.lock"
        while True:
            if mpath.exists():
                m = json.loads(mpath.read_text())
                if m["hash"] != spec_hash:
                    raise ValueError(f"`out`={str(self.path)!r} holds a different sweep"
                                     f"{_differences(m.get('spec'), spec)}; use another "
                                     "folder or delete it.")
                return m
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime > self.lease_timeout:
                        lock.unlink()  # its maker died
                except FileNotFoundError:
                    pass
                time.sleep(0.2)
                continue
            try:
                m = make()
                # first writer wins (`os.link` does not replace): if the lock was taken over
                # during a long pilot, every process still reads one manifest
                tmp = self.path / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
                tmp.write_text(json.dumps(m))
                try:
                    os.link(tmp, mpath)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
            finally:
                lock.unlink(missing_ok=True)

    # ---- chunks ----
    def complete(self, c: int) -> bool:
        name = _chunk_name(c)
        return name in self.memory if self.path is None else (self.path / name).exists()

    def write_chunk(self, c: int, arrays: dict[str, np.ndarray], partial: bool = False) -> None:
        name = _chunk_name(c, partial)
        if self.path is None:
            self.memory[name] = arrays
        else:
            write_atomic(self.path / name, lambda f: np.savez(f, **arrays))
        if not partial:
            self.remove(_chunk_name(c, True))

    def read_partial(self, c: int) -> dict[str, np.ndarray] | None:
        name = _chunk_name(c, True)
        if self.path is None:
            return self.memory.get(name)
        p = self.path / name
        return read_npz(p) if p.exists() else None

    def remove(self, name: str) -> None:
        if self.path is None:
            self.memory.pop(name, None)
        else:
            (self.path / name).unlink(missing_ok=True)

    def parts(self, fields: Sequence[str] | None = None) -> list[tuple[str, Mapping]]:
        """Every complete chunk, and the partial ones of chunks not complete, as (file name,
        arrays by field). Chunk files are read lazily, one field at a time when it is indexed
        (so merging them holds one field of one chunk besides the result); with `fields`,
        those are read at once."""
        names = sorted(self.memory) if self.path is None else sorted(
            p.name for p in self.path.glob("chunk_*.npz") if _CHUNK.fullmatch(p.name))
        out = []
        for name in names:
            if name.endswith(".partial.npz") and name.replace(".partial", "") in names:
                continue  # superseded (a crash between writing the chunk and this removal)
            if self.path is None:
                arrays = self.memory[name]
            else:
                arrays = LazyChunk(self.path / name)
            try:
                if fields is not None:
                    arrays = {k: arrays[k] for k in fields}
            except FileNotFoundError:  # a partial chunk completed since the listing
                continue
            out.append((name, arrays))
        return out

    def log(self, line: str) -> None:
        """Append to this process's own log (`producers/<owner>.log`; one writer per file)."""
        if self.path is None:
            return
        folder = self.path / "producers"
        folder.mkdir(exist_ok=True)
        with open(folder / f"{self.owner}.log", "a") as f:
            f.write(line + "\n")

    # ---- leases ----
    def _lease(self, c: int) -> Path:
        return self.path / f"lease_{c:05d}"

    def _lease_text(self, token: str) -> bytes:
        info = {"token": token, "owner": self.owner,
                "expires": time.time() + self.lease_timeout}
        return json.dumps(info).encode()

    def _read_lease(self, p: Path) -> dict | None:
        try:
            text, mtime = p.read_text(), p.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:  # being written, or its writer died right after creating it
            return {"token": "empty", "expires": mtime + self.lease_timeout}

    def claim(self, c: int) -> bool:
        """Take chunk `c` if it is not complete and no live process holds it."""
        with self.lock:
            return self._claim(c)

    def _claim(self, c: int) -> bool:
        if self.complete(c):
            return False
        token = uuid.uuid4().hex
        if self.path is not None:
            p = self._lease(c)
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "wb") as f:
                    f.write(self._lease_text(token))
            except FileExistsError:
                info = self._read_lease(p)
                if info is None or info["expires"] > time.time():
                    return False
                try:  # expired: one process takes it over
                    os.close(os.open(f"{p}.steal.{info['token']}",
                                     os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return False
                write_atomic(p, lambda f: f.write(self._lease_text(token)))
        self.held[c] = token
        if self.complete(c):  # finished by another process meanwhile
            self.release(c)
            return False
        return True

    def renew(self) -> None:
        """Push back the expiry of every lease held; drop the ones lost (taken over after
        this process stalled longer than the lease time: it may then compute a chunk twice,
        which gives the same file)."""
        if self.path is None:
            return
        with self.lock:
            self._renew()

    def _renew(self) -> None:
        for c, token in list(self.held.items()):
            info = self._read_lease(self._lease(c))
            if info is None or info["token"] != token:
                warnings.warn(f"sweep: lost the lease of chunk {c} (this process stalled "
                              "longer than `lease_timeout`)", stacklevel=2)
                self.held.pop(c, None)
                continue
            write_atomic(self._lease(c), lambda f, t=token: f.write(self._lease_text(t)))

    def release(self, c: int) -> None:
        with self.lock:
            self._release(c)

    def _release(self, c: int) -> None:
        token = self.held.pop(c, None)
        if self.path is None or token is None:
            return
        p = self._lease(c)
        info = self._read_lease(p)
        if info is not None and info["token"] == token:
            p.unlink(missing_ok=True)
        if self.complete(c):
            for s in self.path.glob(f"{p.name}.steal.*"):
                s.unlink(missing_ok=True)

    def clean(self) -> None:
        """Delete the leases (and takeover markers) of complete chunks: left by a process
        that died between writing a chunk and releasing it."""
        if self.path is None:
            return
        for p in self.path.glob("lease_*"):
            c = p.name.split(".")[0].removeprefix("lease_")
            if c.isdigit() and int(c) not in self.held and self.complete(int(c)):
                p.unlink(missing_ok=True)

    def release_all(self) -> None:
        for c in list(self.held):
            self.release(c)
