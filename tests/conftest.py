import gc

import jax
import jax.random as jr
import pytest

jax.config.update("jax_enable_x64", True)


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
