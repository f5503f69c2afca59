"""The sweep's argument checks (`ddln_jax/_sweep/_check.py`): every meaning of `seeds`, refused
non-integers and duplicates, the problem's three forms (a problem object, a loss with `dim=`,
`dd.per_seed`), the key, the output folder and the step budgets."""

import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ddln_jax as dd
from ddln_jax._sweep import _check

TS = jnp.linspace(0.0, 4.0, 5)


def _problem():
    return dd.LeastSquares(jr.normal(jr.key(1), (6, 3)), jr.normal(jr.key(2), (6,)))


def _sweep(problem, **kw):
    args = dict(depths=[2], scales=[1.0], seeds=2, t1=4.0, ts=TS, key=jr.key(0), progress=False)
    return dd.sweep(problem, **{**args, **kw})


@pytest.mark.parametrize(
    "n", [3, np.int64(3), np.int32(3), 3.0, np.float32(3.0), jnp.array(3), jnp.array(3.0)]
)
def test_any_integer_valued_scalar_is_a_number_of_seeds(n):
    assert _check.check_seeds(n) == [0, 1, 2]


@pytest.mark.parametrize("bad", [2.5, jnp.array(0.5), np.float64(1e-3)])
def test_non_integer_seed_count_refused(bad):
    with pytest.raises(ValueError, match="`seeds` must hold integers"):
        _check.check_seeds(bad)


def test_seed_and_depth_lists():
    assert _check.check_seeds([4, np.int64(7), 2.0, jnp.array(9)]) == [4, 7, 2, 9]
    assert _check.check_seeds(range(2, 5)) == [2, 3, 4]
    assert _check.check_depths([2, 3.0, np.int8(5)]) == [2, 3, 5]
    with pytest.raises(ValueError, match="`seeds` must hold integers"):
        _check.check_seeds([0.5, 1.7])
    with pytest.raises(ValueError, match="`depths` must hold integers"):
        _check.check_depths([2.5])
    with pytest.raises(TypeError, match="`seeds` must hold integers"):
        _check.check_seeds(True)
    with pytest.raises(TypeError, match="`seeds`"):
        _check.check_seeds(["a"])
    with pytest.raises(ValueError, match="`seeds` as a number"):
        _check.check_seeds(0.0)
    with pytest.raises(ValueError, match="`depth` must be >= 2"):
        _check.check_depths([1])


@pytest.mark.parametrize(
    "name, values", [("depths", [2, 2]), ("seeds", [0, 3, 0]), ("scales", [0.5, 1.0, 0.5])]
)
def test_duplicated_grid_values_refused(name, values):
    grid = {"depths": [2], "scales": [1.0], "seeds": [0], name: values}
    with pytest.raises(ValueError, match=f"`{name}` lists .* more than once"):
        _check.check_grid(**grid)


def test_zero_scale_warns_stationary():
    with pytest.warns(RuntimeWarning, match="stationary point"):
        _check.check_grid([2], [0.0, 1.0], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check.check_grid([2], [1e-3], 1)


def test_key_checks():
    for good in (jr.key(0), jr.PRNGKey(0)):
        assert _check.check_key(good) is good
    for bad in (0, np.uint32(3), jnp.zeros(3)):
        with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
            _check.check_key(bad)
    with pytest.raises(ValueError, match="one PRNG key"):
        _check.check_key(jr.split(jr.key(0)))
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        _sweep(_problem(), key=0)


def test_out_checks(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    with pytest.raises(ValueError, match="`out`=.* is an existing file"):
        _check.check_out(file)
    # below a file: the folder cannot be created (NotADirectoryError, an OSError)
    with pytest.raises(ValueError, match="`out`=.* cannot be created"):
        _check.check_out(file / "sweep")
    made = _check.check_out(tmp_path / "new" / "sweep")
    assert made.is_dir()
    with pytest.raises(ValueError, match="`out`=.* is an existing file"):
        _sweep(_problem(), out=file)


def test_step_budgets():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="`explicit_max_steps` must be >= 1"):
            _sweep(_problem(), explicit_max_steps=bad)
    with pytest.raises(TypeError, match="`explicit_max_steps` must be an int"):
        _sweep(_problem(), explicit_max_steps=2.5)


def _make(seed):
    k = jr.fold_in(jr.key(7), seed)
    return dd.LeastSquares(jr.normal(k, (5, 3)), jr.normal(jr.fold_in(k, 1), (5,)))


def test_problem_forms():
    p = _problem()
    fixed, batched, _, dim = _check.resolve_problem(p, None, [0])
    assert fixed is p and not batched and dim == 3
    fn, batched, sample, dim = _check.resolve_problem(dd.per_seed(_make), None, [4])
    assert fn is _make and batched and dim == 3
    assert isinstance(dd.per_seed(dd.per_seed(_make)), dd.per_seed)
    # a plain callable is a loss theta -> scalar: it needs `dim`
    loss, batched, _, dim = _check.resolve_problem(lambda th: jnp.sum(th**4), 7, [0])
    assert isinstance(loss, dd.FunctionLoss) and not batched and dim == 7
    with pytest.raises(TypeError, match=r"needs `dim=`.*dd.per_seed\(fn\)"):
        _check.resolve_problem(lambda th: jnp.sum(th**4), None, [0])
    with pytest.raises(TypeError, match=r"needs `dim=`.*dd.per_seed\(fn\)"):
        _check.resolve_problem(_make, None, [0])  # the old meaning: now explicit
    # a seed -> problem function passed as a loss (with `dim`): it does not give a scalar
    with pytest.raises(TypeError, match=r"dd.per_seed\(fn\)"):
        _check.resolve_problem(_make, 3, [0])
    with pytest.raises(TypeError, match="must return a scalar loss, got shape"):
        _check.resolve_problem(lambda th: 2.0 * th, 3, [0])
    with pytest.raises(TypeError, match="must return a problem"):
        _check.resolve_problem(dd.per_seed(lambda s: jnp.ones(3) * s), None, [0])
    with pytest.raises(ValueError, match="`dim`=4 but the problem's `X` has 3"):
        _check.resolve_problem(p, 4, [0])
    with pytest.raises(TypeError, match="`dim=`"):
        _check.resolve_problem(dd.FunctionLoss(lambda th: jnp.sum(th**2)), None, [0])
    with pytest.raises(TypeError, match="`problem` must be a problem object"):
        _check.resolve_problem(3.0, None, [0])


def test_sweep_of_a_plain_loss_equals_gradient_flow():
    # a loss theta -> scalar without a design matrix (quartic, minimum at c): the sweep's rows
    # against diffrax's solve of the same flow (another stepper: agreement to ~10 rtol)
    c = jnp.array([0.5, -1.0, 2.0])

    def loss(th):
        return jnp.sum((th - c) ** 4) + jnp.sum(th**2)

    res = _sweep(loss, dim=3, depths=[3], seeds=[0, 5], rtol=1e-9, atol=1e-11)
    assert res.ok.all() and list(res.seed) == [0, 5]
    for b in range(2):
        u0 = res.initial_layers(b)
        single = dd.gradient_flow(u0, loss, t1=4.0, ts=TS, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.theta[b], single.theta, rtol=1e-7, atol=1e-8)


def test_seed_counts_of_every_type_run_seeds_0_to_n():
    p = _problem()
    ref = _sweep(p, seeds=[0, 1, 2])
    for n in (3.0, jnp.array(3), np.int16(3)):
        res = _sweep(p, seeds=n)
        assert list(res.seed) == [0, 1, 2]
        np.testing.assert_array_equal(res.theta, ref.theta)
    with pytest.raises(ValueError, match="`seeds` must hold integers"):
        _sweep(p, seeds=[0.5, 1.7])
    with pytest.raises(ValueError, match="`depths` must hold integers"):
        _sweep(p, depths=[2.5])
    with pytest.raises(ValueError, match="`depths` lists"):
        _sweep(p, depths=[2, 2])


def test_sweep_float32_inputs_promoted():
    # x64 on: float32 data is converted (exactly) to float64, so the sweep is the float64 one
    p = _problem()
    p32 = dd.LeastSquares(np.asarray(p.X, np.float32), np.asarray(p.y, np.float32))
    p64 = dd.LeastSquares(np.asarray(p32.X, np.float64), np.asarray(p32.y, np.float64))
    assert p32.X.dtype == jnp.float64 and jax.config.jax_enable_x64
    np.testing.assert_array_equal(_sweep(p32).theta, _sweep(p64).theta)
