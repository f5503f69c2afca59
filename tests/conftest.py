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
