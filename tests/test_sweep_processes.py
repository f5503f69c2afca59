"""Sweeps shared by several processes through one folder (leases), with and without
`jax.distributed`; a process killed mid-run; Ctrl-C on the CLI. Each process is a subprocess
on this machine's CPU."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd

ROOT = Path(__file__).resolve().parents[1]
# 48 grid points in 12 chunks of 4
GRID = dict(depths=[2, 3], scales=[0.6, 1.2], seeds=12, t1=10.0, max_chunk=4, progress=False)
FIELDS = ("theta", "loss", "num_steps", "ok", "t_final", "sigma", "rate", "layers0")

WORKER = textwrap.dedent("""
    import json, sys, time
    a = json.loads(sys.argv[1])
    import jax
    jax.config.update("jax_enable_x64", True)
    if a.get("coordinator"):
        jax.distributed.initialize(a["coordinator"], 2, a["process_id"])
    import jax.numpy as jnp, jax.random as jr, numpy as np
    import ddln_jax as dd
    from ddln_jax._sweep import _store
    write = _store.Store.write_chunk

    def slow_write(self, *args, **kw):  # a slower machine: the run lasts long enough
        write(self, *args, **kw)
        time.sleep(a["slow"])

    _store.Store.write_chunk = slow_write
    p = dd.LeastSquares(jr.normal(jr.key(1), (8, 4)), jr.normal(jr.key(2), (8,)))
    res = dd.sweep(p, ts=jnp.linspace(0.0, 10.0, 11), out=a["out"], workers=1, max_slots=8,
                   lease_timeout=a["lease"], key=jr.key(0), **a["grid"])
    np.savez(a["save"], **{k: getattr(res, k) for k in a["fields"]})
""")


def _start(tmp_path, name, out, **kw):
    args = dict(out=str(out), save=str(tmp_path / f"{name}.npz"), grid=GRID, fields=FIELDS,
                slow=0.3, lease=60.0)
    args.update(kw)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(proc, timeout=300):
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output.decode()[-3000:]


@pytest.fixture(scope="module")
def reference():
    p = dd.LeastSquares(jr.normal(jr.key(1), (8, 4)), jr.normal(jr.key(2), (8,)))
    return dd.sweep(p, ts=jnp.linspace(0.0, 10.0, 11), key=jr.key(0), **GRID)


def _check(out, reference, saves=()):
    """The folder holds every row once, equal to the one-process run bitwise; every chunk
    was computed by exactly one process (each process logs the chunks it wrote, after writing
    them; each chunk file names its producer)."""
    made = {(f.stem, int(line.split()[1])) for f in (out / "producers").glob("*.log")
            for line in f.read_text().splitlines()}
    for c in range(12):
        with np.load(out / f"chunk_{c:05d}.npz") as f:
            made.add((str(f["producer"]), c))
    assert sorted(c for _, c in made) == list(range(12)), made
    assert not list(out.glob("lease_*")) and not list(out.glob("*.partial.npz"))
    loaded = dd.load_sweep(out)
    assert loaded.done.all()
    for res in [loaded.to_dict()] + [dict(np.load(s)) for s in saves]:
        for f in FIELDS:
            np.testing.assert_array_equal(res[f], getattr(reference, f))
    return made


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("distributed", [True, False])
def test_two_processes_share_one_folder(tmp_path, reference, distributed):
    # with `jax.distributed` (each process steps its own devices) or two uncoordinated runs:
    # the leases split the chunks, nothing is computed twice, the rows equal a one-process run
    out = tmp_path / "out"
    coord = f"127.0.0.1:{_free_port()}" if distributed else None
    procs = [_start(tmp_path, f"p{i}", out, coordinator=coord, process_id=i) for i in range(2)]
    for p in procs:
        _wait(p)
    made = _check(out, reference, [tmp_path / "p0.npz", tmp_path / "p1.npz"])
    assert len({p for p, _ in made}) == 2  # both took chunks


def test_killed_process_is_replaced(tmp_path, reference):
    # a process SIGKILLed mid-run leaves a lease; once it expires another process takes the
    # chunk over, and the killed one, rerun, joins in: every chunk computed once
    out = tmp_path / "out"
    first = _start(tmp_path, "first", out, lease=3.0)
    deadline = time.time() + 300
    while len(list(out.glob("chunk_*.npz"))) < 2:
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    first.kill()
    first.wait()
    assert list(out.glob("lease_*"))  # it died holding a chunk
    procs = [_start(tmp_path, name, out, lease=3.0) for name in ("other", "rerun")]
    for p in procs:
        _wait(p)
    _check(out, reference, [tmp_path / "other.npz", tmp_path / "rerun.npz"])


def test_cli_interrupt_saves_and_resumes(tmp_path):
    # Ctrl-C: handled within a segment of stepping; the finished rows are saved (a partial
    # chunk) and a rerun says how many are done and completes the grid
    out = tmp_path / "cli"
    args = ["--depths", "2", "3", "--scales", "0.75", "1.5", "--seeds", "16", "--t1", "50",
            "--max-chunk", "64", "--out", str(out)]
    slow = textwrap.dedent(f"""
        import runpy, signal, sys, threading
        from ddln_jax._sweep import _scheduler
        add = _scheduler.Book.add
        interrupted = threading.Event()

        def on_sigint(signum, frame):  # Python's default handler, and a flag for slow_add
            interrupted.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

        def slow_add(self, raw):  # a slower machine: some rows finished, the chunk not
            add(self, raw)
            open({str(tmp_path / "started")!r}, "w").close()
            # (the test's own slowness ends at the interrupt: the latency measured below is
            # the library's, not up to one 0.5 s sleep per worker thread)
            interrupted.wait(0.5)

        _scheduler.Book.add = slow_add
        sys.argv = ["sweep"] + {args!r}
        runpy.run_module("experiments.sweep", run_name="__main__")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    partial = out / "chunks" / "chunk_00000.partial.npz"
    while not partial.exists() and proc.poll() is None and time.time() < sent + 60:
        time.sleep(0.01)
    saved = time.time() - sent
    _, err = proc.communicate(timeout=60)
    ended = time.time() - sent
    print(f"interrupt: rows saved in {saved:.2f} s, process ended in {ended:.2f} s")
    assert proc.returncode == 130, err.decode()[-2000:]
    # the finished rows are saved at once, before the threads end (they end after their
    # segment, or after a compile in progress: 1-2 s here, ~5 s with another sweep beside)
    assert saved < 1.0, saved
    part = dd.load_sweep(out / "chunks")
    k = int(part.done.sum())
    assert 0 < k < 64 and partial.exists()
    rerun = subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=ROOT,
                           env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert f"resuming: {k} of 64 done" in rerun.stderr.decode()
    assert "| depth | scale |" in rerun.stdout.decode()
    full = dd.load_sweep(out / "chunks")
    assert full.done.all() and full.ok.all()
    np.testing.assert_array_equal(full.theta[part.done], part.theta[part.done])
