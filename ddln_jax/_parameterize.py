"""Other parameterizations that share the machinery (flows, metric via jacfwd)."""

import functools

import jax.numpy as jnp


def tied(depth: int):
    """The redundant (tied) network theta = u^{⊙L} (App. A.3) as a parameterization
    `u (dim,) -> theta`, for `gradient_flow(..., parameterization=dd.tied(L))` and
    `dd.metric(u, dd.tied(L))`."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"`depth` must be an int >= 2, got {depth!r}.")
    return functools.partial(_tied, depth=depth)


def _tied(u, depth):
    return u**depth


def difference(depth: int):
    """theta = u^{⊙L} - v^{⊙L} on the pytree `(u, v)` (Woodworth et al., Moroshko et al.)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"`depth` must be an int >= 2, got {depth!r}.")
    return functools.partial(_difference, depth=depth)


def _difference(uv, depth):
    u, v = uv
    return jnp.power(u, depth) - jnp.power(v, depth)
