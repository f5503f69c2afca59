"""Argument checks shared by the public functions.

Three levels, as in diffrax: static misuse raises `ValueError`/`TypeError` naming the
argument; checks on values that may be traced use `eqx.error_if`; solver failures are
result codes (see `_trajectory.py`).
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x) -> jax.Array:
    """`x` as an array of the default float dtype, `jnp.result_type(float)`: float64 with
    `jax_enable_x64` on, float32 off. Lists, ints, bools and other float dtypes (float16,
    bfloat16, float32 with x64 on) are converted, so every public function computes in one
    dtype whatever its inputs' (a float32 array with x64 on would otherwise give a float32
    solve at float64 tolerances)."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"`{name}` must be an array of numbers, got {type(x).__name__}.")
    if np.iscomplexobj(x):
        raise TypeError(
            f"`{name}` is complex: pass real values (the library works over the reals; "
            "it does not drop imaginary parts for you)."
        )
    try:
        # a numpy array is put on the device as it is (`jnp.asarray` of one compiles a small
        # program per shape); scalars and lists keep `jnp.asarray`'s (weak) types
        x = jax.device_put(x) if isinstance(x, np.ndarray) else jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"`{name}` must be an array of numbers, got {type(x).__name__}.") from e
    if x.dtype != jnp.result_type(float):
        x = x.astype(jnp.result_type(float))
    return x


def check_finite(name: str, x: jax.Array) -> jax.Array:
    """Raise (concrete input) or attach a runtime error (traced input) if `x` is not finite."""
    msg = f"`{name}` contains NaN or Inf: pass finite values."
    if is_traced(x):
        return eqx.error_if(x, jnp.any(~jnp.isfinite(x)), msg)
    if not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(msg)
    return x


def check_nonnegative(name: str, x) -> None:
    """`scale` and friends: must be >= 0 when concrete."""
    if is_traced(x):
        return
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {x!r}.")


def check_positive(name: str, x) -> None:
    """`rtol`, `atol` and friends: must be > 0 when concrete."""
    if is_traced(x):
        return
    arr = np.asarray(x)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {x!r}.")


def check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
        raise TypeError(f"`depth` must be an int >= 2, got {depth!r}.")
    if depth < 2:
        raise ValueError(
            f"`depth` must be >= 2, got {depth}: a DDLN has at least two layers "
            "(depth 1 is plain gradient flow on theta)."
        )
    return int(depth)


def check_layers(layers, name: str = "layers0") -> jax.Array:
    """Layers of a DDLN: a float array of shape `(depth, dim)` with depth >= 2."""
    layers = as_float_array(name, layers)
    if layers.ndim != 2:
        raise ValueError(
            f"`{name}` must have shape (depth, dim), got shape {tuple(layers.shape)}. "
            "Stack the layers u^1..u^L as rows (use `jax.vmap` for batches)."
        )
    if layers.shape[0] < 2:
        raise ValueError(
            f"`{name}` has depth {layers.shape[0]}; `depth` must be >= 2 (shape (depth, dim))."
        )
    if layers.shape[1] < 1:
        raise ValueError(f"`{name}` must have dim >= 1, got shape {tuple(layers.shape)}.")
    return check_finite(name, layers)


def check_times(t0, t1, ts):
    """Static checks of t0 < t1 and of increasing save times inside [t0, t1]."""
    t0 = as_float_array("t0", t0)
    t1 = as_float_array("t1", t1)
    ts = as_float_array("ts", ts)
    if t0.ndim != 0 or t1.ndim != 0:
        raise ValueError("`t0` and `t1` must be scalars.")
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"`ts` must be a 1-D array of save times, got shape {tuple(ts.shape)}.")
    if not any(is_traced(x) for x in (t0, t1, ts)):
        t0n, t1n, tsn = float(t0), float(t1), np.asarray(ts)
        if not np.isfinite(t0n) or not np.isfinite(t1n) or not t1n > t0n:
            raise ValueError(f"`t1` must be finite and > `t0`, got t0={t0n}, t1={t1n}.")
        if not np.all(np.isfinite(tsn)):
            raise ValueError("`ts` contains NaN or Inf.")
        if np.any(np.diff(tsn) <= 0):
            raise ValueError("`ts` must be strictly increasing.")
        if tsn[0] < t0n or tsn[-1] > t1n:
            raise ValueError(
                f"`ts` must lie in [t0, t1] = [{t0n}, {t1n}], got [{tsn[0]}, {tsn[-1]}]."
            )
    else:
        bad = (ts[0] < t0) | (ts[-1] > t1) | jnp.any(jnp.diff(ts) <= 0) | ~(t1 > t0)
        ts = eqx.error_if(ts, bad, "`ts` must be strictly increasing and inside [t0, t1].")
    return t0, t1, ts


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


# rtol below this many float32 epsilons cannot be met in float32
_F32_RTOL_FLOOR = 1e-6
_warned_f32 = False


def check_tolerances(rtol, atol, max_steps):
    """Positive tolerances and an int step cap. Without float64 (`jax_enable_x64` off),
    tolerances below float32 resolution cost steps and cannot be met: warn once."""
    global _warned_f32
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_int("max_steps", max_steps)
    if jax.config.jax_enable_x64 or _warned_f32 or is_traced(rtol):
        return
    if float(np.min(rtol)) < _F32_RTOL_FLOOR:
        _warned_f32 = True
        warnings.warn(
            f"float64 is off (jax_enable_x64 is False) and `rtol`={float(np.min(rtol)):g} is "
            f"below float32 resolution (use rtol >= {_F32_RTOL_FLOOR:g}, or turn float64 on "
            "with `jax.config.update('jax_enable_x64', True)` before creating arrays). "
            "Steps are wasted on round-off and errors stay ~1e-6.",
            RuntimeWarning,
            stacklevel=3,
        )


def check_gtol(stop_when_converged):
    """`stop_when_converged`: None/False (off) or a gradient tolerance > 0."""
    if stop_when_converged is None or stop_when_converged is False:
        return None
    check_positive("stop_when_converged", stop_when_converged)
    return jnp.asarray(stop_when_converged, dtype=jnp.result_type(float))


def check_key(name: str, key):
    """A JAX PRNG key (`jax.random.key(0)`; a legacy `jax.random.PRNGKey(0)` is accepted)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if dtype == jnp.uint32 and getattr(key, "shape", ())[-1:] == (2,):
        return key
    raise TypeError(f"`{name}` must be a JAX PRNG key such as `jax.random.key(0)`, got "
                    f"{type(key).__name__} {key!r}.")
