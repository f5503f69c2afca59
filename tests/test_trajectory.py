"""The result enumeration (diffrax's codes plus `diverged`) and saving/loading trajectories."""

import diffrax as dfx
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_layers, random_problem

import ddln_jax as dd


def test_result_codes_extend_diffrax():
    # every diffrax result keeps its name and message; `diverged` is one more code
    for name in dir(dfx.RESULTS):
        item = getattr(dfx.RESULTS, name)
        if isinstance(item, type(dfx.RESULTS.successful)):
            code = int(getattr(dd.Result, name))
            assert dd.result_message(code).startswith(name)
            assert dfx.RESULTS[item] in dd.result_message(code)
    assert dd.result_message(dd.Result.diverged).startswith("diverged")
    assert int(dd.Result.successful) == 0
    assert len({int(r) for r in dd.Result}) == len(list(dd.Result))
    assert dd.result_message(9999) == "unknown result code 9999"


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
