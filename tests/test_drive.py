"""The sweep's host loop (`_drive`): only finished rows cross to the host, two slot-array
sizes at most, and the counters it reports add up."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import ddln_jax as dd


def test_only_finished_rows_cross_to_the_host():
    kx, ky = jr.split(jr.key(2))
    p = dd.LeastSquares(jr.normal(kx, (8, 4)), jr.normal(ky, (8,)))
    T, S, B, Lmax, d = 50, 64, 96, 5, 4
    res = dd.sweep(p, depths=[2, 5], scales=[0.5, 1.0], seeds=24, t1=20.0,
                   ts=jnp.linspace(0.0, 20.0, T), key=jr.key(0), workers=1, max_slots=S,
                   progress=False)
    assert res.ok.all() and res.theta.shape == (B, T, d)
    info = res.info
    # a row: saves (T, d), layers (Lmax, d), xi (d,), t, and steps, status, save_i (int32)
    row = 8 * (T * d + Lmax * d + d + 1) + 3 * 4
    buffer = max(8, S // 8)  # rows per gather (the buffer of the 64-slot array)
    gathers = info["host_syncs"] - info["stepping_calls"]  # one status sync per stepping
    rows = info["rows_to_host"]
    # every row crosses once, plus the padding of partly filled buffers; a copy of the whole
    # slot array per retirement (as before) would be S rows each time
    assert B <= rows <= B + (buffer - 1) * gathers
    assert rows < S * info["retirements"] / 4
    # the bytes: these rows and one status vector (+ two scalars) per stepping
    assert info["bytes_to_host"] <= rows * row + info["stepping_calls"] * (4 * S + 16)
    assert info["bytes_to_host"] >= rows * row
    # one full-size slot array and at most one smaller one for the tail (8x smaller), and
    # the stiff members' 4-slot Kvaerno5 array if any member was handed over
    sizes = info["slot_array_sizes"]
    explicit = [n for n in sizes if not (res.implicit.any() and n == 4)]
    assert explicit[-1] == S and set(explicit) <= {S, S // 8}
    assert (4 in sizes) == bool(res.implicit.any())
    np.testing.assert_array_equal(np.isfinite(res.theta).all(axis=(1, 2)), True)
