"""`dd.enable_compilation_cache`: importing the library changes no setting; the call writes
compiled programs to the folder asked for, a second process loads them from it (and gets the
same bits), and DDLN_JAX_NO_CACHE turns it off. Each check runs in its own process: JAX fixes
its cache per process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import ddln_jax as dd
from ddln_jax import _cache as dd_cache

ROOT = Path(__file__).parent.parent

# a child: enable the cache (as the environment says), compile one small program, report
# what JAX's own counters and config saw
_CHILD = r"""
import json, os, sys
import jax
events = []
jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))
before = jax.config.jax_compilation_cache_dir
import ddln_jax as dd
after_import = jax.config.jax_compilation_cache_dir
arg = json.loads(sys.argv[1])
folder = dd.enable_compilation_cache(arg["path"]) if arg["enable"] else None
x = jax.jit(lambda a: jax.numpy.sin(a) * 3.0 + a ** 2)(jax.numpy.arange(7.0))
print(json.dumps({"before": before, "after_import": after_import,
                  "folder": None if folder is None else str(folder),
                  "config_dir": jax.config.jax_compilation_cache_dir,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "x": [float(v).hex() for v in x]}))
"""


def _child(path, enable=True, **env):
    full = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DDLN_JAX_CACHE", "DDLN_JAX_NO_CACHE", "JAX_COMPILATION_CACHE_DIR")
    }
    full.update(JAX_PLATFORMS="cpu", **env)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            json.dumps({"path": None if path is None else str(path), "enable": enable}),
        ],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_import_changes_nothing_and_cache_round_trips(tmp_path):
    folder = tmp_path / "cache"
    plain = _child(None, enable=False, HOME=str(tmp_path))
    # importing ddln_jax leaves JAX's cache setting alone, and creates no folder
    assert plain["before"] is None and plain["after_import"] is None
    assert plain["config_dir"] is None and not (tmp_path / ".cache").exists()
    cold = _child(folder)
    assert cold["folder"] == cold["config_dir"] == str(folder)
    written = _entries(folder)
    assert written and cold["hits"] == 0  # the program was compiled, and written
    warm = _child(folder)
    assert warm["hits"] >= 1 and _entries(folder) == written  # loaded, not compiled again
    assert warm["x"] == cold["x"] == plain["x"]  # the same bits, cached or not


def test_off_with_the_environment_variable(tmp_path):
    off = tmp_path / "off"
    rep = _child(off, DDLN_JAX_NO_CACHE="1")
    assert rep["folder"] is None and rep["config_dir"] is None and not off.exists()


def test_default_folder_and_switches(tmp_path, monkeypatch):
    monkeypatch.delenv("DDLN_JAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dd_cache.default_cache_dir() == tmp_path / ".cache" / "ddln_jax" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dd_cache.default_cache_dir() == tmp_path / "xdg" / "ddln_jax" / "jax"
    monkeypatch.setenv("DDLN_JAX_CACHE", str(tmp_path / "mine"))
    assert dd_cache.default_cache_dir() == tmp_path / "mine"
    for value, off in (("", False), ("0", False), ("no", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("DDLN_JAX_NO_CACHE", value)
        assert dd_cache.cache_disabled() is off
    # off: nothing is set and no folder is made
    before = jax.config.jax_compilation_cache_dir
    assert dd.enable_compilation_cache(tmp_path / "never") is None
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "never").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="min_compile_time_secs"):
        dd.enable_compilation_cache(tmp_path, min_compile_time_secs=-1.0)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        dd.enable_compilation_cache(not_a_folder)
