import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd
from ddln_jax._sweep import _advance


def _problem():
    return dd.LeastSquares(jr.normal(jr.key(1), (8, 4)), jr.normal(jr.key(2), (8,)))


TS = jnp.linspace(0.0, 10.0, 11)
KW = dict(depths=[2, 3, 5], scales=[0.6, 1.2], seeds=[0, 1], t1=10.0, ts=TS, max_chunk=4,
          key=jr.key(0),
          progress=False)


def test_grid_points_equal_individual_solves():
    p = _problem()
    res = dd.sweep(p, **KW)
    assert res.theta.shape == (12, 11, 4) and res.ok.all()
    for b in range(12):
        L = int(res.depth[b])
        u0 = res.initial_layers(b)
        assert u0.shape == (L, 4) and np.all(np.isnan(res.layers0[b][L:]))  # no padding shown
        single = dd.gradient_flow(u0[:L], p, t1=10.0, ts=TS)
        # rtol 1e-8: agreement to 10 * rtol with diffrax's Tsit5 (another step sequence: the
        # sweep's stepper lands on every save time instead of interpolating)
        np.testing.assert_allclose(res.theta[b], single.theta, rtol=1e-7, atol=1e-7)
        assert 0.8 < int(res.num_steps[b]) / int(single.num_steps) < 1.5
    # labels and derived quantities
    assert list(res.depth[:4]) == [2, 2, 2, 2] and list(res.seed[:2]) == [0, 1]
    for b in range(12):
        L = int(res.depth[b])
        np.testing.assert_allclose(res.sigma[b], dd.sigma(res.initial_layers(b)), rtol=1e-12)
    assert np.all(res.efficiency > 0) and np.all(res.efficiency <= 1)
    # over the grid: a weighted mean of the chunks' efficiencies
    assert res.efficiency.min() <= res.overall_efficiency <= res.efficiency.max()


def test_initial_layers_are_the_documented_draw():
    # `fold_in(key, seed)`, the first `depth` rows of a (max depth, dim) draw times the scale,
    # as a separately jitted `init_padded` (XLA's default optimisation) gives them, to the bit
    # (the sweep compiles its draws at -O1; op-by-op execution fuses otherwise: ~1 ulp)
    res = dd.sweep(_problem(), **KW)
    draw = jax.jit(dd._network.init_padded, static_argnums=(2, 3, 5))
    for b in range(12):
        L, seed = int(res.depth[b]), int(res.seed[b])
        want = draw(jr.fold_in(KW["key"], seed), L, 5, 4, float(res.scale[b]), "gaussian")
        np.testing.assert_array_equal(res.initial_layers(b), np.asarray(want)[:L])


def test_same_key_same_result_and_init_independent_of_grid():
    p = _problem()
    a = dd.sweep(p, **KW)
    b = dd.sweep(p, **{**KW, "depths": [3]})
    rows = a.depth == 3
    # padded to depth 5 in `a`, unpadded in `b`: the error norm restricted to the real layers
    # gives the very same steps and values
    np.testing.assert_array_equal(a.theta[rows], b.theta)
    np.testing.assert_array_equal(a.num_steps[rows], b.num_steps)


def test_problem_per_seed():
    def make(seed):
        k = jr.fold_in(jr.key(7), seed)
        return dd.LeastSquares(jr.normal(k, (6, 3)), jr.normal(jr.fold_in(k, 1), (6,)))

    res = dd.sweep(dd.per_seed(make), depths=[2, 3], scales=[1.0], seeds=[3, 4], t1=5.0,
                   ts=TS[:6], progress=False, key=jr.key(0))
    for b in range(4):
        single = dd.gradient_flow(res.initial_layers(b), make(int(res.seed[b])), t1=5.0,
                                  ts=TS[:6])
        np.testing.assert_allclose(res.theta[b], single.theta, rtol=1e-7, atol=1e-7)


def test_kill_and_resume(tmp_path):
    p = _problem()
    full = dd.sweep(p, **KW)
    out = tmp_path / "sweep"
    dd.sweep(p, out=out, **KW)
    chunks = sorted(out.glob("chunk_*.npz"))
    assert len(chunks) == 3 and not list(out.glob("lease_*"))
    # a process killed during chunk 2: chunks 1.. lost, its lease and a half-written
    # temporary left behind (the lease expires: `lease_timeout`)
    first_mtime = chunks[0].stat().st_mtime_ns
    for c in chunks[1:]:
        c.unlink()
    (out / ".chunk_00001.npz.0123.tmp").write_bytes(b"partial")
    (out / "lease_00001").write_text('{"token": "dead", "owner": "x", "expires": 0}')
    resumed = dd.sweep(p, out=out, **KW)
    assert chunks[0].stat().st_mtime_ns == first_mtime  # the finished chunk was not recomputed
    for field in ("theta", "loss", "num_steps", "ok", "t_final", "sigma", "rate"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(full, field))
    assert resumed.done.all() and 0 < resumed.overall_efficiency <= 1
    with pytest.raises(ValueError, match="different sweep"):
        dd.sweep(p, out=out, **{**KW, "scales": [0.5]})


def test_no_retrace_across_chunks():
    p = _problem()
    dd.sweep(p, **KW)
    caches = (_advance.advance._cached, _advance.refill._cached)
    before = [c._cache_size() for c in caches]
    # another grid of the same size: new depths, scales and seeds, more slot refills
    dd.sweep(p, **{**KW, "depths": [2, 4, 5], "scales": [0.7, 1.1], "seeds": [5, 6],
                   "max_chunk": 2})
    assert [c._cache_size() for c in caches] == before


def test_steady_state_stop_and_stiff_fallback():
    p = _problem()
    kw = {**KW, "depths": [2, 3], "scales": [1.0, 2.2], "stop_when_converged": 1e-9,
          "t1": 50.0, "ts": jnp.linspace(0, 50, 11), "explicit_max_steps": 2**12}
    res = dd.sweep(p, **kw)
    assert res.ok.all()
    assert res.implicit.any()  # the large init exhausted the explicit budget
    ls = p.theta_ls
    np.testing.assert_allclose(res.theta_final, np.broadcast_to(ls, res.theta_final.shape),
                               atol=1e-6)
    for b in np.flatnonzero(res.implicit)[:2]:
        single = dd.gradient_flow(res.initial_layers(b), p, t1=50.0, ts=kw["ts"],
                                  solver="kvaerno5", stop_when_converged=1e-9)
        np.testing.assert_allclose(res.theta[b], single.theta, atol=1e-6)


def _per_seed(seed):
    k = jr.fold_in(jr.key(7), seed)
    return dd.LeastSquares(jr.normal(k, (8, 4)), jr.normal(jr.fold_in(k, 1), (8,)))


@pytest.mark.parametrize("per_seed", [False, True])
def test_stiffness_detection_hands_over_early(per_seed):
    # a large init is stiff after its transient: Hairer's test (h x stiff eigenvalue at the
    # stability boundary) hands it to the batched Kvaerno5 long before the explicit budget
    p = dd.per_seed(_per_seed) if per_seed else _problem()
    kw = {**KW, "depths": [3], "scales": [2.2], "seeds": [0, 1, 2, 3],
          "stop_when_converged": 1e-9, "t1": 1000.0, "ts": jnp.linspace(0, 1000, 11)}
    res = dd.sweep(p, **kw)
    assert res.ok.all() and res.implicit.any()
    assert np.all(res.num_steps < 2**14)  # explicit + implicit, well under the 2^16 budget
    for b in np.flatnonzero(res.implicit)[:2]:
        problem = _per_seed(int(res.seed[b])) if per_seed else p
        single = dd.gradient_flow(res.initial_layers(b), problem, t1=1000.0, ts=kw["ts"],
                                  solver="kvaerno5", stop_when_converged=1e-9)
        np.testing.assert_allclose(res.theta[b], single.theta, atol=1e-6)


def test_long_stiff_members_go_to_kvaerno5_short_ones_stay_explicit():
    # depth 6 from scale-1 inits: seed 89's flow is stiff (stiff eigenvalue ~3e3 for all
    # t) and diffrax's Tsit5 cannot reach t1 within 2^14 steps (it takes ~6e4); seed 548
    # takes ~5.5e3. The sweep hands over a stiff member whose whole trajectory would take
    # over 2^14 explicit steps, and only those
    kx, ky = jr.split(jr.key(1))
    p = dd.LeastSquares(jr.normal(kx, (10, 8)), jr.normal(ky, (10,)))
    ts = jnp.linspace(0.0, 50.0, 11)
    kw = dict(t1=50.0, ts=ts, rtol=1e-8, atol=1e-10, stop_when_converged=1e-7)
    res = dd.sweep(p, depths=[6], scales=[1.0], seeds=[89, 548], key=jr.key(0),
                   progress=False, **kw)
    assert res.ok.all()
    with pytest.warns(RuntimeWarning, match="max_steps_reached"):
        capped = dd.gradient_flow(res.initial_layers(0), p, max_steps=2**14, **kw)
    assert not capped.ok and float(capped.t_final) < 50.0
    short = dd.gradient_flow(res.initial_layers(1), p, **kw)
    assert short.ok and int(short.num_steps) < 2**14
    np.testing.assert_array_equal(res.implicit, [True, False])
    stiff = dd.gradient_flow(res.initial_layers(0), p, solver="kvaerno5", **kw)
    # rtol 1e-8: both within 1e-7 of independent solves (another method / step sequence)
    np.testing.assert_allclose(res.theta[0], stiff.theta, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(res.theta[1], short.theta, rtol=1e-7, atol=1e-7)


def test_accelerator_stiff_array_size_gives_the_same_bits(monkeypatch):
    # on accelerators the stiff members' Kvaerno5 array holds an eighth of the explicit
    # slots (at least 16), not the CPU's 4: simulated here on the CPU, the stiff member's
    # rows (and every other) are the same bits in a 4-slot and a 16-slot array
    from ddln_jax._sweep import _methods

    kx, ky = jr.split(jr.key(1))
    p = dd.LeastSquares(jr.normal(kx, (10, 8)), jr.normal(ky, (10,)))
    kw = dict(depths=[6], scales=[1.0], seeds=[89, 548, 3], t1=50.0,
              ts=jnp.linspace(0.0, 50.0, 11), rtol=1e-8, atol=1e-10, stop_when_converged=1e-7,
              key=jr.key(0), progress=False, workers=1, max_slots=128)
    cpu = dd.sweep(p, **kw)
    sizes = []

    def recorded(on_cpu, explicit_slots):
        sizes.append(_methods.implicit_slots.__wrapped__(on_cpu, explicit_slots))
        return sizes[-1]

    recorded.__wrapped__ = _methods.implicit_slots
    monkeypatch.setattr(_methods, "implicit_slots", recorded)
    monkeypatch.setattr(_methods.Methods, "on_cpu", lambda self: False)
    accel = dd.sweep(p, **kw)
    assert sizes == [16] and 16 in accel.info["slot_array_sizes"]
    assert 4 in cpu.info["slot_array_sizes"] and 4 not in accel.info["slot_array_sizes"]
    assert cpu.implicit[0] and accel.implicit[0]
    np.testing.assert_array_equal(accel.implicit, cpu.implicit)
    np.testing.assert_array_equal(accel.num_steps, cpu.num_steps)
    np.testing.assert_array_equal(accel.theta, cpu.theta)


def test_workers_do_not_change_results():
    # the worker threads take grid points from one queue; slot arrays hold whole blocks of
    # SLOT_QUANTUM slots, so a trajectory's bits do not depend on where it ran
    p = _problem()
    one = dd.sweep(p, workers=1, **KW)
    three = dd.sweep(p, workers=3, **KW)
    np.testing.assert_array_equal(one.theta, three.theta)
    np.testing.assert_array_equal(one.num_steps, three.num_steps)
    # fewer grid points than workers: the idle workers are dropped
    small = {**KW, "depths": [3], "scales": [1.2], "seeds": [1, 0]}
    np.testing.assert_array_equal(dd.sweep(p, workers=3, **small).theta, one.theta[[7, 6]])
    with pytest.raises(ValueError, match="`workers`"):
        dd.sweep(p, workers=0, **KW)


def test_same_arguments_same_bits_with_threads():
    # three worker threads take grid points from one queue in a timing-dependent order; a
    # trajectory's bits must not depend on which slot of its array it lands in
    kx, ky = jr.split(jr.key(11))
    p = dd.LeastSquares(jr.normal(kx, (10, 8)), jr.normal(ky, (10,)))
    kw = dict(depths=[2, 4, 6], scales=[0.75, 1.5], seeds=24, t1=5.0,
              ts=jnp.linspace(0.0, 5.0, 6), progress=False, key=jr.key(0), workers=3)
    a = dd.sweep(p, **kw)
    b = dd.sweep(p, **kw)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.num_steps, b.num_steps)


def _logistic_per_seed(seed):
    k = jr.fold_in(jr.key(5), seed)
    X = jr.normal(k, (12, 8))
    return dd.Logistic(X, jnp.sign(X @ jr.normal(jr.fold_in(k, 1), (8,))))


@pytest.mark.parametrize("case", ["gram", "two_stage", "per_seed_logistic"])
def test_slot_array_size_does_not_change_bits(case):
    # depth 6, dim 8: the same 128 trajectories in one 128-slot array and in 48-slot arrays
    # (refilled as they finish) give the same bits. XLA's own reductions and matmuls change
    # their order with the array size (from 128 slots on): before the ordered sums, 50 of
    # these rows took other steps.
    kx, ky = jr.split(jr.key(3))
    n = {"gram": 10, "two_stage": 3, "per_seed_logistic": 12}[case]
    p = (dd.per_seed(_logistic_per_seed) if case == "per_seed_logistic"
         else dd.LeastSquares(jr.normal(kx, (n, 8)), jr.normal(ky, (n,))))
    kw = dict(depths=[6], scales=[0.75, 1.25], seeds=64, t1=4.0, ts=jnp.linspace(0, 4.0, 5),
              progress=False, key=jr.key(0), workers=1, max_chunk=128)
    small = dd.sweep(p, max_slots=48, **kw)
    large = dd.sweep(p, max_slots=128, **kw)
    np.testing.assert_array_equal(small.num_steps, large.num_steps)
    np.testing.assert_array_equal(small.theta, large.theta)


def test_pilot_order_and_slot_migration_do_not_change_results():
    # 64 trajectories in 64 slots, moved to 16-slot arrays as they finish; with the pilot they
    # are queued longest first. Each trajectory's arithmetic is independent of its slot.
    p = _problem()
    kw = {**KW, "seeds": range(16), "max_chunk": 64}
    plain = dd.sweep(p, **kw)
    piloted = dd.sweep(p, pilot=True, **kw)
    np.testing.assert_allclose(piloted.theta, plain.theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(piloted.num_steps, plain.num_steps)
    for b in (0, 63):
        single = dd.gradient_flow(plain.initial_layers(b), p, t1=10.0, ts=TS)
        np.testing.assert_allclose(plain.theta[b], single.theta, rtol=1e-7, atol=1e-7)


def test_compiled_code_released_near_the_mapping_limit():
    from ddln_jax._sweep import _sweep

    def maps():
        return sum(1 for _ in open("/proc/self/maps"))

    dd.sweep(_problem(), **KW)  # compiled programs held by JAX's caches
    held = _advance.advance._cached._cache_size()
    assert held > 0
    before = maps()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sweep._release_compiled_code(lambda: (100, 65530))  # far from the limit: kept
    assert _advance.advance._cached._cache_size() == held
    with pytest.warns(RuntimeWarning, match="max_map_count"):
        _sweep._release_compiled_code(lambda: (40000, 65530))
    assert _advance.advance._cached._cache_size() == 0
    # the mappings of the freed programs' code are returned to the kernel (a sweep's
    # programs hold ~500 here)
    assert maps() < before - 100
    got = _sweep._memory_maps()
    assert got is not None and got[1] > 0 and abs(got[0] - maps()) < 50


def test_bad_arguments():
    p = _problem()
    with pytest.raises(ValueError, match="`depth`"):
        dd.sweep(p, **{**KW, "depths": [1, 2]})
    with pytest.raises(ValueError, match="`init`"):
        dd.sweep(p, init="orthogonal", **KW)
    with pytest.raises(ValueError, match="`rtol`"):
        dd.sweep(p, rtol=0.0, **KW)
    with pytest.raises(ValueError, match="`scales`"):
        dd.sweep(p, **{**KW, "scales": [0.5, -1.0]})
    for bad in (0, -3):
        with pytest.raises(ValueError, match="`seeds`"):
            dd.sweep(p, **{**KW, "seeds": bad})


def test_int_seeds_mean_range():
    p = _problem()
    kw = {**KW, "depths": [2], "scales": [1.0]}
    a = dd.sweep(p, **{**kw, "seeds": 3})
    b = dd.sweep(p, **{**kw, "seeds": range(3)})
    assert list(a.seed) == [0, 1, 2]
    np.testing.assert_array_equal(a.theta, b.theta)


# a grid with stiff members (see the stiffness test), as plain Python values
_STIFF_ARGS = dict(depths=[3], scales=[2.2], seeds=[0, 1, 2, 3], t1=1000.0,
                   stop_when_converged=1e-9, max_chunk=4, progress=False)


def _stiff_kwargs():
    return {**_STIFF_ARGS, "ts": jnp.linspace(0.0, 1000.0, 11), "key": jr.key(0)}


@pytest.mark.slow
def test_four_host_devices_equal_one(tmp_path):
    # each device steps its own slot arrays (no cross-device reduction), with the arithmetic
    # of one device: the same bits
    script = textwrap.dedent(
        """
        import sys
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, jax.random as jr, numpy as np
        import ddln_jax as dd
        assert len(jax.devices()) == 4, jax.devices()
        p = dd.LeastSquares(jr.normal(jr.key(1), (8, 4)), jr.normal(jr.key(2), (8,)))
        res = dd.sweep(p, depths=[2, 3, 5], scales=[0.6, 1.2], seeds=8, t1=10.0,
                       ts=jnp.linspace(0.0, 10.0, 11), max_chunk=4, progress=False,
                       key=jr.key(0))  # 48 points: each of the 4 arrays of 8 slots gets some
        # stiff members: the Kvaerno5 phase too
        stiff = dd.sweep(p, ts=jnp.linspace(0.0, 1000.0, 11), key=jr.key(0), **STIFF)
        np.savez(sys.argv[1], theta=res.theta, num_steps=res.num_steps,
                 devices=res.info["devices"], stiff_theta=stiff.theta,
                 stiff_implicit=stiff.implicit, stiff_steps=stiff.num_steps)
        """.replace("**STIFF", "**" + repr(_STIFF_ARGS))
    )
    path = tmp_path / "devices.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, timeout=600)
    four = np.load(path)
    # slots were stepped on several devices (which ones depends on the threads' timing: a
    # device's first call compiles for it)
    assert len(four["devices"]) >= 2 and set(four["devices"]) <= {0, 1, 2, 3}
    single = dd.sweep(_problem(), **{**KW, "seeds": 8})
    assert single.info["devices"] == [0]
    np.testing.assert_array_equal(four["theta"], single.theta)
    np.testing.assert_array_equal(four["num_steps"], single.num_steps)
    stiff = dd.sweep(_problem(), **_stiff_kwargs())
    assert stiff.implicit.any()
    np.testing.assert_array_equal(four["stiff_implicit"], stiff.implicit)
    np.testing.assert_array_equal(four["stiff_theta"], stiff.theta)
    np.testing.assert_array_equal(four["stiff_steps"], stiff.num_steps)


def test_to_dataframe():
    res = dd.sweep(_problem(), **{**KW, "depths": [2], "seeds": [0]})
    df = res.to_dataframe()
    assert list(df["depth"]) == [2, 2] and list(df["scale"]) == [0.6, 1.2]
    np.testing.assert_allclose(df["final_loss"], res.loss[:, -1])
    assert set(res.to_dict()) >= {"theta", "ok", "num_steps", "sigma", "done"}


def test_chunk_rows_in_chunk_order_whatever_the_arrivals():
    # rows of two chunks arrive in pieces, out of order and mixed; a complete chunk's file
    # holds them in the chunk's order (as `order` lists them), a partial one the rows that
    # arrived (in that order), and integer fields keep the widest type that arrived
    from ddln_jax._sweep._rows import RAW
    from ddln_jax._sweep._scheduler import Book
    from ddln_jax._sweep._store import Store

    rng = np.random.default_rng(0)
    order = rng.permutation(10)
    store = Store(None, "test", 60.0)
    book = Book(store, order, 6, lambda c, raw, partial: {k: np.array(v) for k, v in raw.items()})
    for c in (0, 1):
        assert store.claim(c)
        book.open(c)

    def rows(gids, steps_dtype):
        gids = np.asarray(gids)
        return dict(index=gids, theta=gids[:, None, None] + np.zeros((1, 3, 2)),
                    num_steps=(10 * gids).astype(steps_dtype), ok=gids % 2 == 0,
                    result=gids.astype(np.int32), t_final=gids / 7.0, implicit=gids > 4)

    arrival = rng.permutation(10)
    book.add(rows(arrival[:3], np.int32))
    book.add(rows(arrival[3:7], np.int64))
    done = [c for c in (0, 1) if set(order[6 * c:6 * c + 6]) <= set(arrival[:7])]
    book.save_partial()
    for name, part in store.parts():
        c = int(name.split("_")[1][:5])
        members = order[6 * c:6 * c + 6]
        want = members[np.isin(members, arrival[:7])]  # in the chunk's order
        if c in done:
            assert not name.endswith("partial.npz")
        np.testing.assert_array_equal(part["index"], want)
        expect = rows(want, np.int64)
        for k in RAW:  # values (types: below)
            np.testing.assert_array_equal(part[k], expect[k])
        wide = np.isin(members, arrival[3:7]).any()
        assert part["num_steps"].dtype == (np.int64 if wide else np.int32)


def test_failed_chunk_write_leaves_the_books_intact():
    # `out` deleted during a run: writing a completed chunk fails; the error is that one
    # (FileNotFoundError), and the save of the held rows that follows finds its books intact
    # (it raised `KeyError: <chunk>` from the error handler, hiding the cause)
    from ddln_jax._sweep._scheduler import Book
    from ddln_jax._sweep._store import Store

    class Gone(Store):
        def write_chunk(self, c, arrays, partial=False):
            raise FileNotFoundError(f"chunk {c}: folder deleted")

    store = Gone(None, "test", 60.0)
    book = Book(store, np.arange(4), 2, lambda c, raw, partial: dict(raw))
    for c in (0, 1):
        assert store.claim(c)
        book.open(c)
    gids = np.array([0, 1])
    raw = dict(index=gids, theta=np.zeros((2, 3, 2)), num_steps=gids, ok=gids > 0,
               result=gids, t_final=gids / 2.0, implicit=gids > 5)
    book.spend(7, 9)
    with pytest.raises(FileNotFoundError, match="folder deleted"):
        book.add(raw)  # completes chunk 0
    assert 0 in book.rows and 0 in book.carried and list(book.spent) == [7, 9]
    with pytest.raises(FileNotFoundError, match="folder deleted"):
        book.save_partial()


def test_interrupt_saves_at_once_and_again_with_later_rows():
    # Ctrl-C: the rows finished so far are saved before the threads end (`keep`: the chunks
    # stay held); rows the threads finish meanwhile still go to their chunks (a chunk
    # completed then replaces its partial file), the final save writes the rest, and every
    # slot-step is counted in exactly one file
    from ddln_jax._sweep._scheduler import Book
    from ddln_jax._sweep._store import Store

    order = np.random.default_rng(1).permutation(10)
    store = Store(None, "test", 60.0)
    book = Book(store, order, 6, lambda c, raw, partial: {k: np.array(v) for k, v in raw.items()})
    for c in (0, 1):
        assert store.claim(c)
        book.open(c)

    def rows(gids):
        gids = np.asarray(gids)
        return dict(index=gids, theta=gids[:, None, None] + np.zeros((1, 3, 2)),
                    num_steps=10 * gids, ok=gids % 2 == 0, result=gids.astype(np.int32),
                    t_final=gids / 7.0, implicit=gids > 4)

    book.spend(100, 200)
    book.add(rows(order[:2]))  # chunk 0: 2 of 6 rows
    book.add(rows(order[6:7]))  # chunk 1: 1 of 4
    book.save_partial(keep=True)
    early = dict(store.parts())
    assert sorted(early) == ["chunk_00000.partial.npz", "chunk_00001.partial.npz"]
    np.testing.assert_array_equal(early["chunk_00000.partial.npz"]["index"], order[:2])
    np.testing.assert_array_equal(early["chunk_00001.partial.npz"]["index"], order[6:7])

    book.spend(10, 20)  # the threads go on until their segments end
    book.add(rows(order[2:6]))  # chunk 0 complete
    book.add(rows(order[7:8]))
    book.save_partial()
    final = dict(store.parts())
    assert sorted(final) == ["chunk_00000.npz", "chunk_00001.partial.npz"]
    np.testing.assert_array_equal(final["chunk_00000.npz"]["index"], order[:6])
    np.testing.assert_array_equal(final["chunk_00001.partial.npz"]["index"], order[6:8])
    np.testing.assert_array_equal(final["chunk_00001.partial.npz"]["theta"][:, 0, 0], order[6:8])
    work = sum(int(p["work"]) for p in final.values())
    slot_iters = sum(int(p["slot_iters"]) for p in final.values())
    assert (work, slot_iters) == (110, 220)
