"""The network: inits, Assumption (A), the reduced-variable maths."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import random_layers

import ddln_jax as dd
from ddln_jax import _network as dd_network


def test_initializers(getkey):
    u = dd.init_zero_first(getkey(), 4, 6, scale=1.4)
    assert u.shape == (4, 6) and bool(jnp.all(u[0] == 0))
    assert bool(jnp.all(dd.check_assumption_a(u)))
    ub = jnp.array([1.0, -2.0, 0.5])
    v = dd.init_yun(0.3, ub, 4)
    np.testing.assert_allclose(v[:3], np.tile(0.3 * np.asarray(ub), (3, 1)))
    assert bool(jnp.all(v[3] == 0)) and bool(jnp.all(dd.check_assumption_a(v)))
    k = getkey()
    np.testing.assert_array_equal(dd.init_gaussian(k, 3, 2), dd.init_gaussian(k, 3, 2))


def test_assumption_a_detection():
    u = random_layers(3, 4, 5)
    assert bool(jnp.all(dd.check_assumption_a(u)))
    tied = u.copy()
    k = np.argmin(np.abs(u[:, 2]))
    tied[(k + 1) % 4, 2] = -u[k, 2]  # a tie in |u| (opposite sign) at coordinate 2
    ok = np.asarray(dd.check_assumption_a(tied))
    assert ok.tolist() == [True, True, False, True, True]
    with pytest.raises(ValueError, match="coordinate 2: layers"):
        dd.check_assumption_a(tied, strict=True)
    equal = np.tile(u[:1], (3, 1))
    assert not np.any(np.asarray(dd.check_assumption_a(equal)))
    near = u.copy()
    near[(k + 1) % 4, 2] = u[k, 2] * (1 + 1e-12)
    assert bool(dd.check_assumption_a(near)[2])
    assert not bool(dd.check_assumption_a(near, rtol=1e-9)[2])
    # the permutation to v puts the minimal layers first and is an involution
    kk = dd.minimal_layer(u)
    v = dd.to_reduced(u, kk)
    np.testing.assert_array_equal(np.abs(v[0]), np.abs(u).min(axis=0))
    np.testing.assert_array_equal(dd.from_reduced(v, kk), u)
    np.testing.assert_allclose(dd.theta(v), dd.theta(u), rtol=1e-15)


def test_bad_init_arguments(getkey):
    with pytest.raises(ValueError, match="`scale` must be a finite number >= 0"):
        dd.init_gaussian(getkey(), 3, 4, scale=-1.0)
    with pytest.raises(ValueError, match="`scale`"):
        dd.init_zero_first(getkey(), 3, 4, scale=-0.5)
    # equal layers alpha * 1 violate (A): the error points to the tied network and Yun's init
    with pytest.raises(ValueError, match=r"dd\.tied.*init_yun"):
        dd.check_assumption_a(0.5 * jnp.ones((3, 4)), strict=True)


@pytest.mark.parametrize("init", ["gaussian", "zero_first"])
def test_padded_init_and_masked_sigma(init):
    key = jr.key(5)
    u = dd._network.init_padded(key, 3, 6, 4, 0.7, init)
    # the first 3 rows of a 6-row draw (row 0 zero for zero_first), unit rows after
    ref = 0.7 * np.asarray(jr.normal(key, (6, 4)))[:3]
    if init == "zero_first":
        ref[0] = 0.0
    np.testing.assert_array_equal(u[:3], ref)
    np.testing.assert_array_equal(u[3:], 1.0)
    # sigma of the padded network ignores the padding: it is sigma of the real layers
    # (eq 13 written out with numpy)
    sq = ref**2
    k = np.argmin(sq, axis=0)
    want = min(np.prod([sq[j, i] - sq[k[i], i] for j in range(3) if j != k[i]])
               for i in range(4))
    assert float(dd.sigma(u, depth=3)) == pytest.approx(want, rel=1e-12)
    assert float(dd.sigma(u[:3])) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="`init`"):
        dd._network.init_padded(key, 3, 6, 4, 0.7, "uniform")


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_host_paths_equal_op_by_op_jax(depth):
    # concrete layers are reduced (and checked for (A)) in numpy, without compiling; under
    # vmap (no jit) the same jnp code runs op by op: the two must agree to the bit
    rng = np.random.default_rng(depth)
    u = rng.standard_normal((depth, 6))
    u[0, 2] = 0.0  # a zero layer
    u[:, 3] = 1.0 + np.arange(depth)
    u[:2, 3] = 0.1, -0.1  # a tie of the smallest: (A) fails at coordinate 3
    host = dd_network.reduced_init(jnp.asarray(u))
    eager = jax.vmap(dd_network.reduced_init)(jnp.asarray(u)[None])
    for name in ("k", "a", "deltas", "signs", "s"):
        h, e = np.asarray(getattr(host, name)), np.asarray(getattr(eager, name))[0]
        assert h.dtype == e.dtype and h.tobytes() == e.tobytes(), name
    for rtol in (0.0, 0.3):
        ok_host = dd.check_assumption_a(u, rtol=rtol)
        ok_eager = jax.vmap(lambda x: dd.check_assumption_a(x, rtol=rtol))(jnp.asarray(u)[None])
        np.testing.assert_array_equal(np.asarray(ok_host), np.asarray(ok_eager)[0])
    assert not bool(dd.check_assumption_a(u)[3])
