import gc
import os

import jax
import jax.random as jr
import pytest

import ddln_jax as dd

jax.config.update("jax_enable_x64", True)
# the suite compiles the same programs on every run: load them from JAX's persistent cache
# (`$DDLN_JAX_CACHE`, default ~/.cache/ddln_jax/jax; off with DDLN_JAX_NO_CACHE=1)
dd.enable_compilation_cache()


def pytest_xdist_auto_num_workers(config):
    """`--numprocesses=auto` (pyproject): one test process per CPU this process may use, its
    affinity and a cgroup-v2 quota counted (a container's 2 cores on a larger host are 2;
    xdist's own count is the host's), at most `--maxprocesses` (4)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, n or 1)


@pytest.fixture
def getkey():
    """A fresh, deterministic key on every call (seeded per test)."""
    keys = iter(jr.split(jr.key(1234), 1000))

    def _getkey():
        return next(keys)

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Each test module's compiled programs are freed after it: XLA's CPU compiler maps each
    program's code separately, and the whole suite in one process reached the kernel's limit
    on memory mappings (vm.max_map_count = 65530: 65 511 mappings in the core dump) and
    crashed inside a compile (see `dd.sweep`'s guard, tested in test_sweep.py)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def shared_tmp_path(tmp_path_factory):
    """A folder shared by every test process of this run (pytest-xdist's workers each have
    their own basetemp, side by side): what one process builds once (the docs site, executed
    notebooks), the others reuse."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "shared"
    path.mkdir(exist_ok=True)
    return path
