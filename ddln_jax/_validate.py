"""Argument checks shared by the public functions.

Three levels, as in diffrax: static misuse raises `ValueError`/`TypeError` naming the
argument; checks on values that may be traced use `eqx.error_if`; solver failures are
result codes (see `_flow.py`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x) -> jax.Array:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"`{name}` must be an array of numbers, got {type(x).__name__}.")
    try:
        x = jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"`{name}` must be an array of numbers, got {type(x).__name__}.") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
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
