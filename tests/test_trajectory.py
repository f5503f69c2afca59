"""The result enumeration (diffrax's codes plus `diverged`) and saving/loading trajectories."""

import re

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_layers, random_problem

import ddln_jax as dd
from ddln_jax._trajectory import result_code


def test_result_codes_extend_diffrax():
    # every diffrax result keeps its name and message; `diverged` and `stop_not_reached` are
    # two more codes
    # diffrax's names from the enumeration's generated docstring ("- `name`: message")
    names = re.findall(r"^- `(\w+)`", dfx.RESULTS.__doc__, flags=re.M)
    assert len(names) == len(dfx.RESULTS) == len(dd.Result) - 2 and "successful" in names
    for name in names:
        item = getattr(dfx.RESULTS, name)
        code = int(getattr(dd.Result, name))
        assert dd.result_message(code).startswith(name)
        assert dfx.RESULTS[item] in dd.result_message(code)
        # the item's code by the enumeration's public `==`, eagerly and traced
        assert int(result_code(item)) == code
        assert int(jax.jit(lambda r: result_code(r))(item)) == code
    assert dd.result_message(dd.Result.diverged).startswith("diverged")
    assert int(result_code(dd.RESULTS.diverged)) == int(dd.Result.diverged)
    assert dd.result_message(dd.Result.stop_not_reached).startswith("stop_not_reached")
    assert int(result_code(dd.RESULTS.stop_not_reached)) == int(dd.Result.stop_not_reached)
    assert int(dd.Result.stop_not_reached) == int(dd.Result.diverged) + 1
    assert int(dd.Result.successful) == 0
    assert len({int(r) for r in dd.Result}) == len(list(dd.Result))
    assert dd.result_message(9999) == "unknown result code 9999"
    assert dd.result_message(-1) == "unknown result code -1"


def test_result_codes_of_a_real_failure():
    # a solve that runs out of steps, one that succeeds, vmapped: diffrax's own items
    term = dfx.ODETerm(lambda t, y, args: -y)

    def solve(max_steps):
        sol = dfx.diffeqsolve(term, dfx.Tsit5(), 0.0, 10.0, 0.1, jnp.ones(2),
                              max_steps=max_steps, throw=False)
        return result_code(sol.result)

    assert int(solve(1000)) == int(dd.Result.successful)
    assert int(solve(3)) == int(dd.Result.max_steps_reached)


def test_save_load_roundtrip(tmp_path):
    X, y = random_problem(0, 6, 4)
    traj = dd.gradient_flow(jnp.asarray(random_layers(0, 3, 4)), dd.LeastSquares(X, y), t1=2.0,
                            ts=jnp.linspace(0, 2, 5))
    path = traj.save(tmp_path / "run")
    assert path.suffix == ".npz"
    back = dd.Trajectory.load(path)
    for name in ("ts", "layers", "theta", "xi", "loss", "layers0", "result", "num_steps", "ok",
                 "t_final"):
        a, b = np.asarray(getattr(traj, name)), np.asarray(getattr(back, name))
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    np.savez(tmp_path / "other.npz", ts=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved Trajectory"):
        dd.Trajectory.load(tmp_path / "other.npz")


def test_save_refuses_pytree_layers(tmp_path):
    X, y = random_problem(1, 6, 4)
    uv = (jnp.full(4, 0.5), jnp.full(4, 0.3))
    traj = dd.gradient_flow(uv, dd.LeastSquares(X, y), t1=1.0, ts=jnp.linspace(0, 1, 3),
                            parameterization=dd.difference(2))
    with pytest.raises(TypeError, match="layers"):
        traj.save(tmp_path / "pytree")


def test_steps_hint_names_the_dtype_resolution():
    from ddln_jax._trajectory import steps_hint

    # float32: eps 1.2e-7, so rtol 1e-8 is below its resolution; float64 (eps 2.2e-16) not
    assert "`rtol`=1e-08 is below" in steps_hint(np.float32, 1e-8)
    assert "turn on float64" in steps_hint(np.float32, 1e-8)
    assert steps_hint(np.float64, 1e-8).startswith("Increase `max_steps`")
    assert "float64 (eps = 2.2e-16)" in steps_hint(np.float64, 1e-15)
    assert "tolerances `rtol`/`atol` near" in steps_hint(np.float64)  # rtol not known
