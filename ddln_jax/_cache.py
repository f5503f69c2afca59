"""JAX's persistent compilation cache, switched on by a call (never on import).

A compiled program is written to a folder keyed by its HLO, the compiler options and the
jax/jaxlib versions; a later process that needs the same program loads it instead of
compiling it again. Only public `jax.config` options are set.
"""

import os
from pathlib import Path

import jax

ENV_DIR = "DDLN_JAX_CACHE"
ENV_OFF = "DDLN_JAX_NO_CACHE"


def default_cache_dir() -> Path:
    """`$DDLN_JAX_CACHE` if set, else `~/.cache/ddln_jax/jax` (under `$XDG_CACHE_HOME` when
    that is set)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ddln_jax" / "jax"


def cache_disabled() -> bool:
    """True when `$DDLN_JAX_NO_CACHE` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(ENV_OFF, "").strip().lower() not in ("", "0", "false", "no")


def enable_compilation_cache(path=None, *, min_compile_time_secs: float = 0.0) -> Path | None:
    """Turn on JAX's persistent compilation cache: programs compiled once on this machine
    are loaded from disk by later processes (a notebook's first calls then skip most of their
    compile time). The library never calls this itself on import; the project's entry points
    (experiments, CLIs, the test suite) do. Results are the same bits with and without it (a
    cached program is the compiled program). Call it again with another `path` to switch
    folders; delete the folder to clear the cache.

    **Arguments:**

    - `path`: the cache folder (created if missing). Default: `$DDLN_JAX_CACHE`, else
        `~/.cache/ddln_jax/jax`.
    - `min_compile_time_secs`: cache only programs whose compile took at least this long
        (JAX's own default, 1 s, would skip the many small programs of an interactive
        session).

    **Returns:** the folder in use, or `None` when `$DDLN_JAX_NO_CACHE` is set (then nothing
    is changed).

    **Raises:** `ValueError` if `min_compile_time_secs` is negative or `path` is not a folder.
    """
    if not min_compile_time_secs >= 0:
        raise ValueError(f"`min_compile_time_secs` must be >= 0, got {min_compile_time_secs!r}.")
    folder = default_cache_dir() if path is None else Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`path` {str(folder)!r} exists and is not a folder.")
    if cache_disabled():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    changed = jax.config.jax_compilation_cache_dir != str(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if changed:
        # jax fixes its cache at the first compile of a process: start it afresh, so that a
        # call after some compiles takes effect too
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
