"""The sweep's results folder: leases, atomic files, loading (partial folders, duplicates)."""

import json
import shutil
import time

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd
from ddln_jax._sweep._store import Store

KW = dict(depths=[2, 3, 5], scales=[0.6, 1.2], seeds=[0, 1], t1=10.0, key=jr.key(0),
          ts=jnp.linspace(0.0, 10.0, 11), max_chunk=4, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "sweep"
    p = dd.LeastSquares(jr.normal(jr.key(1), (8, 4)), jr.normal(jr.key(2), (8,)))
    return out, dd.sweep(p, out=out, **KW)


def test_lease_claim_expiry_and_single_takeover(tmp_path):
    a, b, c = (Store(tmp_path, name, lease_timeout=0.5) for name in "abc")
    assert a.claim(0) and not b.claim(0)  # O_EXCL: one holder
    assert b.claim(1)
    time.sleep(0.3)
    a.renew()  # a is alive: its lease does not expire
    time.sleep(0.3)
    assert not b.claim(0)
    time.sleep(0.6)  # a stopped renewing (died): exactly one other process takes over
    assert b.claim(0) and not c.claim(0)
    with pytest.warns(UserWarning, match="lost the lease"):
        a.renew()  # a comes back: its lease is gone, it is told so
    assert 0 not in a.held
    b.write_chunk(0, {"index": np.arange(2)})
    b.release(0)
    assert b.complete(0) and not c.claim(0)  # complete chunks are never claimed
    assert not list(tmp_path.glob("lease_00000*"))


def test_crashed_writes_are_ignored_and_cleaned(tmp_path):
    s = Store(tmp_path, "a", lease_timeout=1.0)
    s.write_chunk(3, {"index": np.arange(2)})
    old = tmp_path / ".chunk_00004.npz.dead.tmp"
    old.write_bytes(b"half")  # a writer killed mid-write
    stamp = time.time() - 7200
    import os

    os.utime(old, (stamp, stamp))
    (tmp_path / ".chunk_00005.npz.live.tmp").write_bytes(b"being written")
    (tmp_path / "lease_00006").write_text("")  # killed between creating and filling a lease
    s2 = Store(tmp_path, "b", lease_timeout=0.2)
    assert not old.exists() and (tmp_path / ".chunk_00005.npz.live.tmp").exists()
    assert [n for n, _ in s2.parts()] == ["chunk_00003.npz"]
    assert not s2.claim(6)
    time.sleep(0.3)
    assert s2.claim(6)


def test_load_sweep_complete_partial_duplicate_conflicting(folder, tmp_path):
    out, res = folder
    loaded = dd.load_sweep(out)
    for f in ("theta", "loss", "num_steps", "sigma", "rate", "layers0", "efficiency"):
        np.testing.assert_array_equal(getattr(loaded, f), getattr(res, f))
    assert loaded.done.all() and loaded.info["rtol"] == 1e-8
    # partial: a chunk missing, another one only half done (an interrupted run's save)
    part = tmp_path / "part"
    shutil.copytree(out, part)
    (part / "chunk_00001.npz").unlink()
    with np.load(part / "chunk_00002.npz") as f:
        half = {k: f[k][:2] if f[k].ndim else f[k] for k in f.files}
    (part / "chunk_00002.npz").unlink()
    np.savez(part / "chunk_00002.partial.npz", **half)
    p = dd.load_sweep(part)
    assert p.done.sum() == 6 and np.isnan(p.theta[~p.done]).all()
    assert (p.num_steps[~p.done] == -1).all() and not p.ok[~p.done].any()
    np.testing.assert_array_equal(p.theta[p.done], res.theta[p.done])
    assert np.isnan(p.efficiency[1]) and p.efficiency[0] == res.efficiency[0]
    # an exact duplicate of a chunk (two runs wrote it) loads; a conflicting one raises
    dup = tmp_path / "dup"
    shutil.copytree(out, dup)
    shutil.copy(dup / "chunk_00000.npz", dup / "chunk_00007.npz")
    np.testing.assert_array_equal(dd.load_sweep(dup).theta, res.theta)
    with np.load(dup / "chunk_00000.npz") as f:
        bad = {k: f[k] for k in f.files}
    bad["theta"] = bad["theta"].copy()
    bad["theta"][1, 3, 0] += 1e-12
    np.savez(dup / "chunk_00008.npz", **bad)
    with pytest.raises(ValueError, match="conflicting results for grid point"):
        dd.load_sweep(dup)
    with pytest.raises(FileNotFoundError):
        dd.load_sweep(tmp_path / "nothing")
    # a folder holding the sweep in a subfolder (the CLI's OUT/chunks) is read from there;
    # with several such subfolders the error names them
    cli = tmp_path / "cli_out"
    shutil.copytree(out, cli / "chunks")
    np.testing.assert_array_equal(dd.load_sweep(cli).theta, res.theta)
    with pytest.raises(FileNotFoundError, match="subfolders .*dup.*part"):
        dd.load_sweep(tmp_path)


def test_manifest_guards_the_folder(folder):
    out, _ = folder
    m = json.loads((out / "manifest.json").read_text())
    assert m["spec"]["chunk"] == 4 and sorted(m["order"]) == list(range(12))
    assert {"ddln_jax", "jax", "diffrax"} <= set(m["versions"])
    # another sweep in the folder: refused, naming what differs (as stored there, as asked)
    p = dd.LeastSquares(jr.normal(jr.key(1), (8, 4)), jr.normal(jr.key(2), (8,)))
    with pytest.raises(ValueError, match=r"different sweep: `t1` is 10.0 there, 20.0 here"):
        dd.sweep(p, out=out, **{**KW, "t1": 20.0, "ts": jnp.linspace(0.0, 20.0, 11)})
    with pytest.raises(ValueError, match=r"`stop_when_converged` is null there, 1e-06 here"):
        dd.sweep(p, out=out, stop_when_converged=1e-6, **KW)


def test_to_xarray_and_netcdf(folder, tmp_path):
    pytest.importorskip("xarray")
    _, res = folder
    ds = res.to_xarray()
    assert dict(ds.sizes) == {"depth": 3, "scale": 2, "seed": 2, "time": 11, "coordinate": 4,
                              "layer": 5}
    np.testing.assert_array_equal(ds.theta.sel(depth=3, scale=1.2, seed=1).values,
                                  res.theta[7])
    assert ds.attrs["rtol"] == 1e-8 and "jax" in ds.attrs
    path = res.to_netcdf(tmp_path / "sweep.nc")
    import xarray as xr

    with xr.open_dataset(path) as back:
        np.testing.assert_array_equal(back.theta.values, ds.theta.values)


_FRAGMENT = r"""
import numpy as np
from ddln_jax._sweep._store import _MALLOC_TRIM, release_free_memory
assert _MALLOC_TRIM is not None, "glibc's malloc_trim not found"
def rss():  # resident memory in MB, as the kernel counts it
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
blocks = [np.ones(2**18) for _ in range(200)]  # 2 MB each, one after another on the heap
before = rss()
del blocks[::2]  # every other one freed: each between two live ones, none at the top
freed = rss()
release_free_memory()
print(before, freed, rss())
"""


def test_release_free_memory_returns_freed_heap_blocks():
    # glibc keeps freed blocks below its mmap threshold (which rises to 32 MiB once such a
    # block is freed) as long as something lives above them; the sweep's freed slot outputs
    # and chunk copies are such blocks. Measured by the kernel's count of resident memory.
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**25))  # the threshold risen
    out = subprocess.run([sys.executable, "-c", _FRAGMENT], env=env, capture_output=True,
                         text=True, check=True).stdout
    before, freed, after = map(float, out.split())
    assert freed > before - 20  # free() alone keeps the ~200 MB resident
    assert after < freed - 150  # release_free_memory gives it back
