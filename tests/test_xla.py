"""Compiler options applied only where the running jaxlib accepts them (probed once)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddln_jax import _xla
from ddln_jax._sweep import _advance

FAKE = "xla_no_such_option_in_any_jaxlib"


def _compiles_with(name, value):
    # the test's own probe, through jax's public AOT API on a different program
    try:
        jax.jit(lambda x: 2.0 * x).lower(np.zeros(3)).compile(compiler_options={name: value})
        return True
    except jax.errors.JaxRuntimeError:
        return False


def test_probe_refuses_an_unknown_option_and_agrees_with_a_direct_compile():
    assert not _compiles_with(FAKE, 1)  # jaxlib refuses unknown options
    assert not _xla.accepts("cpu", FAKE, 1)
    assert _xla.accepted_options({FAKE: 1}, "cpu") == {}
    for name, value in _advance._OLDER_KERNELS.items():  # True on jaxlib 0.10, not on 0.11+
        assert _xla.accepts("cpu", name, value) == _compiles_with(name, value)
    assert _xla.applied_options()["cpu"][f"{FAKE}=1"] is False
    assert not _xla.accepts("no_such_platform", "xla_backend_optimization_level", 1)


def test_refused_options_fall_back_to_the_default_program():
    def f(x, n):
        return jnp.sin(x) * n

    x = jnp.linspace(0.0, 1.0, 7)
    fn = _xla.OptionJit(f, {FAKE: 1}, "cpu")
    assert fn.__wrapped__ is f and fn.__doc__ == f.__doc__
    np.testing.assert_array_equal(fn(x, 3), eqx.filter_jit(f)(x, 3))  # no crash, same bits


def test_sweep_uses_its_default_programs_where_the_option_is_refused(monkeypatch):
    name, value = next(iter(_advance._OLDER_KERNELS.items()))
    monkeypatch.setitem(_xla._ACCEPTED, ("cpu", name, value), False)
    assert _advance.compiled_for(_advance.KVAERNO5, "cpu") == (
        _advance.advance, _advance._refill_states)
    monkeypatch.setitem(_xla._ACCEPTED, ("cpu", name, value), True)
    assert _advance.compiled_for(_advance.KVAERNO5, "cpu") == (
        _advance._advance_older, _advance._refill_states_older)
    assert _advance.compiled_for(_advance.TSIT5, "cpu")[0] is _advance.advance
