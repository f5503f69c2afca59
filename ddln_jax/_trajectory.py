"""`Trajectory`, the result of every flow and of `train`, and the one result enumeration.

`RESULTS` is diffrax's enumeration extended with `diverged` and `stop_not_reached`; `Result`
gives its items as plain integers (the codes stored in `Trajectory.result`, in sweep results
and in saved files), and `result_message` turns a code into words.
"""

import enum
import warnings
from pathlib import Path

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._validate import is_traced


class RESULTS(dfx.RESULTS):
    diverged = (
        "The state or the loss became non-finite (for `train`: or the loss exceeded `blowup` "
        "times its initial value)."
    )
    stop_not_reached = (
        "The run reached `t1` before the requested stop (`stop_at_loss`): the loss is still "
        "above it."
    )


# The library's own table of result codes: diffrax's results (in diffrax 0.7's order),
# `diverged` and `stop_not_reached` (appended: earlier codes keep their values). Codes are
# ours, so saved files keep their meaning whatever a diffrax release does to its
# enumeration's internals; `result_code` maps an item to its code with the
# enumeration's public `==`. tests/test_trajectory.py checks the table against diffrax's
# messages and size.
_NAMES = (
    "successful", "max_steps_reached", "singular", "breakdown", "stagnation", "conlim",
    "nonfinite_input", "nonlinear_max_steps_reached", "nonlinear_divergence", "nonfinite",
    "dt_min_reached", "event_occurred", "max_steps_rejected", "internal_error", "diverged",
    "stop_not_reached",
)

# Every code the library reports, as integers: `traj.result == dd.Result.successful`.
Result = enum.IntEnum("Result", {name: i for i, name in enumerate(_NAMES)})
Result.__doc__ = (
    "The integer codes of `RESULTS` (diffrax's results, `diverged`, `stop_not_reached`)."
)

# a code for an item this table lacks (a result added by a later diffrax): never success
_UNKNOWN = -1


def result_code(item) -> Int[Array, ""]:
    """The integer code of a diffrax or `RESULTS` item (traceable; `-1` for an item of a
    diffrax release newer than this table)."""
    if not isinstance(item, RESULTS):
        item = RESULTS.promote(item)
    code = jnp.asarray(_UNKNOWN, dtype=jnp.int32)
    for i, name in enumerate(_NAMES):
        code = jnp.where(item == getattr(RESULTS, name), jnp.int32(i), code)
    return code


def result_message(code) -> str:
    """The name and message of a result code (`Trajectory.result`, an int or a `Result`)."""
    code = int(code)
    try:
        name = Result(code).name
    except ValueError:
        return f"unknown result code {code}"
    msg = RESULTS[getattr(RESULTS, name)]
    return name if not msg else f"{name}: {msg}"


_FIELDS = ("ts", "layers", "theta", "xi", "loss", "layers0", "result", "num_steps", "ok",
           "t_final")


class Trajectory(eqx.Module):
    """A solved flow, saved at `ts`. Every flow of the library (and `train`) returns this type.

    **Fields:**

    - `ts`: save times `(T,)`.
    - `layers`: layers at `ts`, `(T, depth, dim)` (or the parameterization's pytree).
    - `theta`: effective parameter at `ts`, `(T, dim)`.
    - `xi`: mirror coordinate xi(t) = -int_0^t grad L, `(T, dim)`.
    - `loss`: L(theta(t)), `(T,)`.
    - `layers0`: the initial layers.
    - `result`: an integer code of `dd.Result` (0 = successful); `dd.result_message(code)`
        says what it means.
    - `num_steps`: solver steps taken (accepted + rejected; for `train`, the steps run).
    - `ok`: True when the run reached `t1` (or a requested steady-state stop) successfully.
    - `t_final`: where the run ended: `t1`, the time of a steady-state stop, or the time of
        a failure; saved values at `ts > t_final` are not valid after a failure.

    Under `jax.vmap` every field gains a leading batch axis, so failures are reported per
    trajectory. `save(path)` / `Trajectory.load(path)` write and read an `.npz` file (array
    layers only).
    """

    ts: Float[Array, " T"]
    layers: PyTree
    theta: Float[Array, "T dim"]
    xi: Float[Array, "T dim"]
    loss: Float[Array, " T"]
    layers0: PyTree
    result: Int[Array, ""]
    num_steps: Int[Array, ""]
    ok: Bool[Array, ""]
    t_final: Float[Array, ""]

    def save(self, path) -> Path:
        """Write every field to `path` (`.npz`, numpy's format; no pickling)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        arrays = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (jax.Array, np.ndarray)):
                raise TypeError(
                    f"`Trajectory.save` needs array `{name}`, got {type(value).__name__} "
                    "(a pytree parameterization): save its leaves with numpy instead."
                )
            arrays[name] = np.asarray(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "Trajectory":
        """Read a file written by `Trajectory.save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            missing = [name for name in _FIELDS if name not in data.files]
            if missing:
                raise ValueError(f"`path` {path} is not a saved Trajectory (missing {missing}).")
            return cls(**{name: jnp.asarray(data[name]) for name in _FIELDS})


def make_trajectory(ts, ys, result, num_steps, ok, t_final, layers0, problem,
                    parameterization=None, theta=None):
    """A `Trajectory` from saved `(layers, xi)`; theta is `parameterization` of the layers
    unless given (the reduced flows solve for theta itself)."""
    layers_ts, xi_ts = ys
    theta_ts = jax.vmap(parameterization)(layers_ts) if theta is None else theta
    return Trajectory(
        ts=ts,
        layers=layers_ts,
        theta=theta_ts,
        xi=xi_ts,
        loss=jax.vmap(problem.loss)(theta_ts),
        layers0=layers0,
        result=result,
        num_steps=num_steps,
        ok=ok,
        t_final=t_final,
    )


# rtol within this many epsilons of the state's dtype: the error estimate is round-off
_ROUNDOFF_RTOL = 1e3


def steps_hint(dtype, rtol=None) -> str:
    """What to do when a solve ran out of steps: tolerances near the dtype's resolution
    (steps rejected on round-off) first, when `rtol` is that small or unknown."""
    eps = float(jnp.finfo(dtype).eps)
    usual = ("increase `max_steps`, shorten `t1`, or use `solver='kvaerno5'` for stiff "
             "(large) initializations.")
    tight = rtol is not None and not is_traced(rtol) and float(np.min(rtol)) < _ROUNDOFF_RTOL * eps
    if rtol is not None and not tight:
        return usual[0].upper() + usual[1:]
    f64 = (" or turn on float64 (`jax.config.update('jax_enable_x64', True)`)"
           if jnp.dtype(dtype) != jnp.float64 else "")
    told = f"`rtol`={float(np.min(rtol)):g} is" if tight else "tolerances `rtol`/`atol` near or"
    return (f"Out of steps: {told} below ~{_ROUNDOFF_RTOL * eps:.0e}, the resolution of "
            f"{jnp.dtype(dtype).name} (eps = {eps:.1e}) for an error estimate, the likely "
            f"cause: round-off rejects the steps; loosen them{f64}. Otherwise {usual}")


def warn_if_failed(traj: Trajectory, what: str = "gradient_flow", hint: str | None = None,
                   rtol=None) -> None:
    """Outside of jit/vmap: warn, with the reason and the fix, when a run failed (`rtol`:
    the solve's, to say whether it is the likely cause of running out of steps)."""
    if is_traced(traj.ok):
        return
    ok = np.asarray(traj.ok)
    if ok.all():
        return
    codes = np.asarray(traj.result).reshape(-1)[~ok.reshape(-1)]
    reasons = sorted({result_message(c) for c in codes})
    t_fail = np.asarray(traj.t_final).reshape(-1)[~ok.reshape(-1)]
    if hint is None and np.any(codes == Result.max_steps_reached):
        hint = steps_hint(np.asarray(traj.theta).dtype, rtol)
    hint = hint or (
        "Increase `max_steps`, shorten `t1`, or use `solver='kvaerno5'` for stiff (large) "
        "initializations."
    )
    warnings.warn(
        f"{what}: {int((~ok).sum())} trajectory(ies) failed ({'; '.join(reasons)}), first at "
        f"t = {float(t_fail.min()):.6g}. Their values after `t_final` are not valid. {hint}",
        RuntimeWarning,
        stacklevel=3,
    )


def warn_if_unreached(traj: Trajectory, gtol, what: str = "gradient_flow") -> None:
    """Outside of jit/vmap: warn when a steady-state stop (`stop_when_converged=gtol`) was
    asked for and a successful run reached `t1` without it (||grad L||_inf stayed above
    `gtol`: often a floor set by round-off, or a flow still converging)."""
    if gtol is None or is_traced(traj.ok) or is_traced(gtol):
        return
    missed = np.asarray(traj.ok) & (np.asarray(traj.result) != Result.event_occurred)
    if not missed.any():
        return
    warnings.warn(
        f"{what}: `stop_when_converged`={float(gtol):g} was not reached by "
        f"{int(missed.sum())} trajectory(ies): ||grad L||_inf stayed above it up to t1 = "
        f"{float(np.max(np.asarray(traj.ts)[..., -1])):g} (they ran to t1). Raise the "
        "tolerance (round-off and the solver's `rtol`/`atol` set a floor on ||grad L||), or "
        "a longer `t1`.",
        RuntimeWarning,
        stacklevel=3,
    )