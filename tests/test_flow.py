
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import random_layers, random_problem, run_float32, scipy_layers
from scipy.integrate import solve_ivp

import ddln_jax as dd
from experiments._bench_tools import _counting_compiles


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shallow_closed_form(seed):
    # L = 2: theta(t) = |u0^2 - v0^2|/2 sinh(2 xi(t) + log|(u0 + v0)/(u0 - v0)|) (eq 16), with
    # xi the integrated -grad L: an identity between two independently integrated quantities.
    X, y = random_problem(seed, 6, 4)
    u0 = random_layers(seed, 2, 4)
    traj = dd.gradient_flow(
        u0, dd.LeastSquares(X, y), t1=5.0, ts=jnp.linspace(0, 5, 50), rtol=1e-10, atol=1e-12
    )
    assert bool(traj.ok)
    a, b = u0
    delta = np.abs(a**2 - b**2)
    rho = np.log(np.abs((a + b) / (a - b)))
    psi = delta / 2 * np.sinh(2 * np.asarray(traj.xi) + rho)
    np.testing.assert_allclose(traj.theta, psi, atol=1e-8, rtol=0)  # rtol 1e-10 -> 1e-8


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_orthogonal_design_decouples(depth):
    # X^T X = I: L = ||theta - X^T y||^2 and each coordinate is an independent L-dim ODE.
    rng = np.random.default_rng(depth)
    d = 4
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    y = rng.standard_normal(d)
    b = Q.T @ y
    u0 = 0.8 * rng.standard_normal((depth, d))
    ts = np.linspace(0, 3, 31)
    traj = dd.gradient_flow(
        u0, dd.LeastSquares(Q, y), t1=3.0, ts=ts, rtol=1e-11, atol=1e-13, solver="dopri8"
    )
    for i in range(d):

        def rhs(t, u, i=i):
            th = np.prod(u)
            return np.array(
                [-np.prod(np.delete(u, j)) * 2 * (th - b[i]) for j in range(depth)]
            )

        ref = solve_ivp(rhs, (0, 3), u0[:, i], t_eval=ts, rtol=1e-12, atol=1e-14, method="DOP853")
        np.testing.assert_allclose(np.asarray(traj.layers)[:, :, i], ref.y.T, atol=1e-8)


@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conservation_law(depth, seed):
    # Prop 1 (eq 5): (u^j)^2 - (u^j(0))^2 is the same for every j along the path.
    X, y = random_problem(seed, 8, 5)
    u0 = random_layers(seed, depth, 5)
    traj = dd.gradient_flow(
        u0, dd.LeastSquares(X, y), t1=20.0, ts=dd.log_times(20.0, 60), rtol=1e-10, atol=1e-12
    )
    assert bool(traj.ok)
    d = np.asarray(traj.layers) ** 2 - u0**2
    assert np.max(d.max(axis=1) - d.min(axis=1)) <= 1e-8


def test_against_scipy_depth4():
    X, y = random_problem(7, 10, 5)
    u0 = random_layers(7, 4, 5)
    ts = np.linspace(0, 10, 41)
    traj = dd.gradient_flow(
        u0, dd.LeastSquares(X, y), t1=10.0, ts=ts, rtol=1e-12, atol=1e-14, solver="dopri8"
    )
    ref = scipy_layers(X, y, u0, ts)
    np.testing.assert_allclose(traj.theta, np.prod(ref, axis=1), atol=1e-8)
    np.testing.assert_allclose(traj.layers, ref, atol=1e-8)


@pytest.mark.parametrize("solver", ["tsit5", "dopri5", "kvaerno5"])
def test_solvers_agree_with_scipy(solver):
    X, y = random_problem(3, 6, 3)
    u0 = random_layers(3, 3, 3)
    ts = np.linspace(0, 5, 11)
    traj = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=5.0, ts=ts, rtol=1e-9, atol=1e-11,
                            solver=solver)
    ref = scipy_layers(X, y, u0, ts)
    np.testing.assert_allclose(traj.layers, ref, atol=1e-6)  # rtol 1e-9, accumulated


def test_random_inits_succeed_default_solver(getkey):
    # DESIGN §4: Tsit5 with diffrax's automatic dt0 rejected every step on such problems.
    X = jr.normal(getkey(), (10, 5))
    y = jr.normal(getkey(), (10,))
    for _ in range(8):
        u0 = dd.init_gaussian(getkey(), 4, 5)
        traj = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=1.0, ts=jnp.linspace(0, 1, 5))
        assert bool(traj.ok) and int(traj.num_steps) < 10_000


def test_vmap_equals_loop_and_no_retrace(getkey):
    X = jr.normal(getkey(), (10, 5))
    y = jr.normal(getkey(), (10,))
    inits = jax.vmap(lambda k: dd.init_gaussian(k, 3, 5))(jr.split(getkey(), 16))
    ts = jnp.linspace(0.0, 5.0, 20)

    def _run(u0, X, y, t1, ts):
        return dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=t1, ts=ts)

    run = eqx.debug.assert_max_traces(_run, max_traces=1)

    batched = jax.jit(jax.vmap(run, in_axes=(0, None, None, None, None)))
    traj = batched(inits, X, y, 5.0, ts)
    assert traj.theta.shape == (16, 20, 5) and bool(jnp.all(traj.ok))
    for b in range(16):
        single = dd.gradient_flow(inits[b], dd.LeastSquares(X, y), t1=5.0, ts=ts)
        np.testing.assert_allclose(traj.theta[b], single.theta, rtol=1e-6, atol=1e-9)
    # New numeric values (data, init, times) reuse the compiled function.
    batched(inits * 0.9, X + 0.1, y - 0.1, 4.0, ts * 0.8)
    single_run = eqx.debug.assert_max_traces(_run, max_traces=1)
    jit_single = jax.jit(single_run)
    jit_single(inits[0], X, y, 5.0, ts)
    jit_single(inits[1], X * 2, y, 3.0, ts * 0.5)


def test_no_recompile_outside_jit(getkey):
    X = jr.normal(getkey(), (6, 3))
    y = jr.normal(getkey(), (6,))
    u0 = dd.init_gaussian(getkey(), 3, 3)
    from ddln_jax import _flow

    dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=1.0, ts=jnp.linspace(0, 1, 5))
    size = _flow._solve_layers._cached._cache_size()
    dd.gradient_flow(1.1 * u0, dd.LeastSquares(X + 1, y), t1=2.0, ts=jnp.linspace(0, 2, 5),
                     rtol=1e-7, atol=1e-9)
    assert _flow._solve_layers._cached._cache_size() == size


def test_max_steps_reported_per_trajectory(getkey):
    X = jr.normal(getkey(), (6, 3))
    y = jr.normal(getkey(), (6,))
    u0 = dd.init_gaussian(getkey(), 3, 3)
    with pytest.warns(RuntimeWarning, match="max_steps"):
        traj = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=50.0, ts=jnp.linspace(0, 50, 5),
                                max_steps=8)
    assert not bool(traj.ok)
    assert int(traj.result) == dd.Result.max_steps_reached
    assert "max_steps" in dd.result_message(traj.result)
    # Under vmap: the large init (stiff: ~5000 steps) fails, the small one (~200) does not.
    inits = jnp.stack([u0, 3.0 * u0])
    f = jax.vmap(lambda u: dd.gradient_flow(u, dd.LeastSquares(X, y), t1=5.0,
                                            ts=jnp.linspace(0, 5, 3), max_steps=1000))
    trajs = f(inits)
    assert trajs.ok.shape == (2,)
    assert bool(trajs.ok[0]) and not bool(trajs.ok[1])


def test_bad_inputs(getkey):
    X = jr.normal(getkey(), (6, 3))
    y = jr.normal(getkey(), (6,))
    p = dd.LeastSquares(X, y)
    u0 = dd.init_gaussian(getkey(), 3, 3)
    ts = jnp.linspace(0, 1, 4)
    flow = dd.gradient_flow
    with pytest.raises(ValueError, match="`depth`"):
        dd.init_gaussian(getkey(), 1, 3)
    with pytest.raises(ValueError, match="`depth`"):
        flow(u0[:1], p, t1=1.0, ts=ts)
    with pytest.raises(ValueError, match="`layers0`"):
        flow(u0[0], p, t1=1.0, ts=ts)
    with pytest.raises(ValueError, match="dim"):
        flow(dd.init_gaussian(getkey(), 3, 4), p, t1=1.0, ts=ts)
    with pytest.raises(ValueError, match="`y`"):
        dd.LeastSquares(X, y[:5])
    with pytest.raises(ValueError, match="`X`"):
        dd.LeastSquares(X[0], y)
    with pytest.raises(ValueError, match="`X` contains NaN"):
        dd.LeastSquares(X.at[0, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match="`y` contains NaN"):
        dd.LeastSquares(X, y.at[0].set(jnp.inf))
    with pytest.raises(ValueError, match="`layers0` contains NaN"):
        flow(u0.at[0, 0].set(jnp.nan), p, t1=1.0, ts=ts)
    with pytest.raises(ValueError, match="`rtol`"):
        flow(u0, p, t1=1.0, ts=ts, rtol=0.0)
    with pytest.raises(ValueError, match="`atol`"):
        flow(u0, p, t1=1.0, ts=ts, atol=-1.0)
    with pytest.raises(ValueError, match="`ts`"):
        flow(u0, p, t1=1.0, ts=ts[::-1])
    with pytest.raises(ValueError, match="`ts`"):
        flow(u0, p, t1=0.5, ts=ts)
    with pytest.raises(ValueError, match="`t1`"):
        flow(u0, p, t1=-1.0, ts=jnp.zeros(1))
    with pytest.raises(ValueError, match="`solver`"):
        flow(u0, p, t1=1.0, ts=ts, solver="euler2")
    with pytest.raises(TypeError, match="`problem`"):
        flow(u0, 3.0, t1=1.0, ts=ts)
    with pytest.raises(ValueError, match="labels"):
        dd.Logistic(X, y)
    with pytest.raises(ValueError, match="`ubar`"):
        dd.init_yun(1.0, jnp.array([1.0, 0.0]), 3)
    with pytest.raises(ValueError, match="`alpha`"):
        dd.init_yun(-1.0, jnp.array([1.0, 2.0]), 3)
    # traced non-finite data raise at run time, not silently
    with pytest.raises(Exception, match="NaN or Inf"):
        jax.jit(lambda u: flow(u, p, t1=1.0, ts=ts).theta)(u0.at[0, 0].set(jnp.nan))


def test_steady_state_stop_matches_full_solve():
    # Converged-and-stopped trajectories agree with full solves: before the stop to the
    # solver tolerance, after it to the distance left to the optimum (L - L* <~ gtol^2/mu).
    X, y = random_problem(11, 10, 4)
    u0 = random_layers(11, 3, 4)
    p = dd.LeastSquares(X, y)
    ts = np.linspace(0, 200, 401)
    full = dd.gradient_flow(u0, p, t1=200.0, ts=ts, rtol=1e-10, atol=1e-12)
    stop = dd.gradient_flow(u0, p, t1=200.0, ts=ts, rtol=1e-10, atol=1e-12,
                            stop_when_converged=1e-8)
    assert bool(stop.ok) and float(stop.t_final) < 200.0
    assert int(stop.num_steps) < int(full.num_steps)
    before = ts <= float(stop.t_final)
    np.testing.assert_allclose(stop.theta[before], full.theta[before], atol=1e-7)
    np.testing.assert_allclose(stop.theta[~before], full.theta[~before], atol=1e-7)
    np.testing.assert_array_equal(stop.theta[~before], np.broadcast_to(
        stop.theta[-1], stop.theta[~before].shape))
    ls = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(stop.theta[-1], ls, atol=1e-7)


def test_stationary_init_warns():
    # two zero layers in every coordinate: grad wrt the layers is 0, grad L(theta0) is not
    X, y = random_problem(40, 6, 3)
    with pytest.warns(RuntimeWarning, match="stationary point"):
        traj = dd.gradient_flow(jnp.zeros((3, 3)), dd.LeastSquares(X, y), t1=1.0,
                                ts=jnp.linspace(0, 1, 3))
    np.testing.assert_array_equal(traj.theta, 0.0)


def test_float32_tolerances_warn(tmp_path):
    # x64 cannot be switched off inside this process (conftest turns it on): a subprocess
    code = (
        "import warnings, jax.numpy as jnp, numpy as np, ddln_jax as dd\n"
        "X = np.random.default_rng(0).standard_normal((6, 3))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    traj = dd.gradient_flow(jnp.ones((2, 3)) * jnp.arange(1, 4), "
        "dd.LeastSquares(X, X @ np.ones(3)), t1=1.0, ts=jnp.linspace(0, 1, 3))\n"
        "print(traj.theta.dtype, any('float32 resolution' in str(m.message) for m in w))\n"
    )
    assert run_float32(code, tmp_path) == ["float32", "True"]


@pytest.mark.parametrize("t1", [50.0, 3e4, 1234.567])
def test_log_times_end_exactly_at_t1(t1):
    ts = dd.log_times(t1, 300, t0=0.1)
    assert float(ts[-1]) == t1 and float(ts[0]) == 0.1
    assert np.all(np.diff(np.asarray(ts)) > 0)


def test_log_time_flow_and_the_loss_stop():
    # time="log": tau = log(1 + t). Against scipy's DOP853 on the layer ODE in linear time
    # (logistic gradient written out by hand) at t = expm1(tau)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 4))
    y = np.sign(X @ rng.standard_normal(4))
    u0 = 0.5 * rng.standard_normal((3, 4))

    def rhs(t, f):
        u = f.reshape(3, 4)
        m = y * (X @ np.prod(u, 0))
        g = -X.T @ (y / (1 + np.exp(m)))
        return np.stack([-np.prod(np.delete(u, j, 0), 0) * g for j in range(3)]).ravel()

    taus = np.array([0.0, 0.5, 2.0, 4.0])
    ref = solve_ivp(rhs, (0, np.expm1(4.0)), u0.ravel(), t_eval=np.expm1(taus), method="DOP853",
                    rtol=1e-12, atol=1e-14).y.T.reshape(-1, 3, 4)
    traj = dd.gradient_flow(jnp.asarray(u0), dd.Logistic(X, y), t1=4.0, ts=jnp.asarray(taus),
                            time="log", rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(traj.layers, ref, rtol=1e-7, atol=1e-9)
    # a loss stop that is met: event_occurred, ok, the loss at the stop <= eps and above it at
    # the save before; later saves hold the final state
    ts = jnp.linspace(0.0, 700.0, 15)
    problem = dd.Exponential(X, y)
    stop = dd.gradient_flow(jnp.asarray(u0), problem, t1=700.0, ts=ts, time="log",
                            stop_at_loss=1e-200)
    assert bool(stop.ok) and int(stop.result) == dd.Result.event_occurred
    final = float(problem.log_loss(stop.theta[-1]))
    assert final <= np.log(1e-200) and float(stop.t_final) < 700.0
    before = np.asarray(ts) < float(stop.t_final)
    assert np.all(np.asarray(jax.vmap(problem.log_loss)(stop.theta[before])) > np.log(1e-200))
    assert np.all(np.isfinite(stop.loss)) and float(stop.loss[-1]) < 1e-200
    # float64 losses of 1e-200 without NaN or overflow anywhere in the trajectory
    assert all(np.all(np.isfinite(np.asarray(a))) for a in (stop.theta, stop.layers, stop.xi))
    # not met by t1: never a success
    with pytest.warns(RuntimeWarning, match="stop_at_loss"):
        short = dd.gradient_flow(jnp.asarray(u0), problem, t1=5.0, ts=jnp.linspace(0, 5, 3),
                                 time="log", stop_at_loss=1e-200)
    assert not bool(short.ok) and int(short.result) == dd.Result.stop_not_reached
    with pytest.raises(ValueError, match="`time`"):
        dd.gradient_flow(jnp.asarray(u0), problem, t1=1.0, ts=jnp.ones(1), time="exp")
    with pytest.raises(ValueError, match="`stop_at_loss`"):
        dd.gradient_flow(jnp.asarray(u0), problem, t1=1.0, ts=jnp.ones(1), stop_at_loss=0.0)


def test_float32_and_int_inputs_promoted_with_x64():
    # x64 on: float32 (and int, list) inputs are converted exactly to float64, so the solve is
    # the float64 one on the same values, to the bit (a float32 solve took ~10x the steps)
    X, y = random_problem(3, 6, 4)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    u32 = random_layers(3, 3, 4).astype(np.float32)
    ts = jnp.linspace(0, 5, 6)
    f32 = dd.gradient_flow(u32, dd.LeastSquares(X32, y32), t1=5.0, ts=ts)
    f64 = dd.gradient_flow(u32.astype(np.float64),
                           dd.LeastSquares(X32.astype(np.float64), y32.astype(np.float64)),
                           t1=5.0, ts=ts)
    assert f32.theta.dtype == jnp.float64 and f32.layers0.dtype == jnp.float64
    np.testing.assert_array_equal(f32.theta, f64.theta)
    assert int(f32.num_steps) == int(f64.num_steps)
    ints = dd.gradient_flow([[1, 2, 1, 1], [1, 1, -1, 2], [2, 1, 1, 1]], dd.LeastSquares(X, y),
                            t1=0.1, ts=[0.0, 0.1])
    assert ints.theta.dtype == jnp.float64 and bool(ints.ok)


def test_out_of_steps_names_round_off_tolerances():
    X, y = random_problem(0, 6, 4)
    u0, p, ts = random_layers(0, 3, 4), dd.LeastSquares(X, y), jnp.linspace(0, 5, 3)
    # rtol far below float64's resolution: round-off rejects the steps, the likely cause
    with pytest.warns(RuntimeWarning, match=r"`rtol`=1e-17 is below .*resolution of float64"):
        dd.gradient_flow(u0, p, t1=5.0, ts=ts, rtol=1e-17, atol=1e-20, max_steps=64)
    # an ordinary rtol with a small step cap: the usual advice, no round-off diagnosis
    with pytest.warns(RuntimeWarning, match="Increase `max_steps`") as w:
        dd.gradient_flow(u0, p, t1=5.0, ts=ts, max_steps=4)
    assert not any("resolution" in str(m.message) for m in w)


def test_unreached_stop_tolerance_warns():
    X, y = random_problem(1, 8, 4)  # n > dim: L* > 0 and grad L = 0 only at the minimiser
    p, u0, ts = dd.LeastSquares(X, y), random_layers(1, 2, 4), jnp.linspace(0, 20, 21)
    with pytest.warns(RuntimeWarning, match="`stop_when_converged`=1e-30 was not reached"):
        traj = dd.gradient_flow(u0, p, t1=20.0, ts=ts, stop_when_converged=1e-30)
    # independent of the flag: ||grad L||_inf, by the closed-form gradient, stayed above it
    grads = np.abs(2 * (X @ np.asarray(traj.theta).T - y[:, None]).T @ X).max(axis=1)
    assert grads.min() > 1e-30 and float(traj.t_final) == 20.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stopped = dd.gradient_flow(u0, p, t1=20.0, ts=ts, stop_when_converged=1e-3)
    g = 2 * X.T @ (X @ np.asarray(stopped.theta[-1]) - y)
    assert float(stopped.t_final) < 20.0 and np.abs(g).max() <= 1e-3 * (1 + 1e-6)


def test_vector_valued_loss_refused_naming_problem():
    with pytest.raises(TypeError, match="`problem` must return a scalar loss.*shape \\(3,\\)"):
        dd.gradient_flow(jnp.ones((2, 3)), lambda th: th**2, t1=1.0, ts=[0.0, 1.0])


def test_one_program_per_call(getkey):
    # after a first call (JAX's own small programs), a call of a new shape compiles exactly
    # one program, the check of a stationary init included; new values compile nothing
    X, y = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (4,))
    dd.gradient_flow(dd.init_gaussian(getkey(), 2, 3), dd.LeastSquares(X, y), t1=1.0,
                     ts=jnp.linspace(0, 1, 3))
    X, y = jr.normal(getkey(), (5, 6)), jr.normal(getkey(), (5,))
    u0, u1 = dd.init_gaussian(getkey(), 3, 6), dd.init_gaussian(getkey(), 3, 6)
    ts = jnp.linspace(0, 1, 4)
    with _counting_compiles() as seen:
        first = dd.gradient_flow(u0, dd.LeastSquares(X, y), t1=1.0, ts=ts)
        n_first = seen["n"]
        second = dd.gradient_flow(u1, dd.LeastSquares(X, y), t1=1.0, ts=ts, rtol=1e-7)
    assert n_first == 1 and seen["n"] == 1
    assert first.ok and second.ok
