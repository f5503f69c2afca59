"""The network: layers `(depth, dim)`, theta = prod_j u^j (eq 1), initializations and
Assumption (A) with the permutation to the reduced variables v (Section 2.1)."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._validate import as_float_array, check_depth, check_finite, check_layers, is_traced


def theta(layers: Float[Array, "depth dim"]) -> Float[Array, " dim"]:
    """The effective parameter theta = u^1 ⊙ ... ⊙ u^L (eq 1).

    **Arguments:**

    - `layers`: array of shape `(depth, dim)`, row j is the layer u^{j+1}. Extra leading
        axes are batch axes.

    **Returns:** array of shape `(dim,)`.
    """
    return jnp.prod(layers, axis=-2)


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"`dim` must be an int >= 1, got {dim!r}.")
    return int(dim)


def init_gaussian(
    key: PRNGKeyArray, depth: int, dim: int, scale=1.0
) -> Float[Array, "depth dim"]:
    """Every layer i.i.d. `scale * N(0, 1)`. Satisfies Assumption (A) almost surely.

    `scale` may be a traced array (sweeps over scale do not recompile).
    """
    depth, dim = check_depth(depth), _check_dim(dim)
    return scale * jr.normal(key, (depth, dim))


def init_zero_first(
    key: PRNGKeyArray, depth: int, dim: int, scale=1.0
) -> Float[Array, "depth dim"]:
    """First layer 0, the others `scale * N(0, 1)` (the paper's Fig 4). Satisfies (A) a.s.:
    the zero layer is the unique minimum of every coordinate."""
    depth, dim = check_depth(depth), _check_dim(dim)
    rest = scale * jr.normal(key, (depth - 1, dim))
    return jnp.concatenate([jnp.zeros((1, dim), rest.dtype), rest], axis=0)


def init_yun(alpha, ubar, depth: int) -> Float[Array, "depth dim"]:
    """Corollary 1 (Yun et al. 2021): u^L(0) = 0 and u^j(0) = alpha * ubar for j < L.

    **Arguments:**

    - `alpha`: the scale alpha > 0.
    - `ubar`: array `(dim,)` with no zero entry.
    - `depth`: L >= 2.
    """
    depth = check_depth(depth)
    ubar = check_finite("ubar", as_float_array("ubar", ubar))
    if ubar.ndim != 1:
        raise ValueError(f"`ubar` must have shape (dim,), got {tuple(ubar.shape)}.")
    if not is_traced(ubar) and np.any(np.asarray(ubar) == 0):
        raise ValueError("`ubar` must have no zero entry (Corollary 1 needs |ubar_i|^2 >= λ > 0).")
    if not is_traced(alpha) and not np.all(np.asarray(alpha) > 0):
        raise ValueError(f"`alpha` must be > 0, got {alpha!r}.")
    top = jnp.broadcast_to(alpha * ubar, (depth - 1,) + ubar.shape)
    return jnp.concatenate([top, jnp.zeros((1,) + ubar.shape, top.dtype)], axis=0)


def minimal_layer(layers0: Float[Array, "depth dim"]) -> Int[Array, " dim"]:
    """k_i = argmin_k |u^k_i(0)| for every coordinate i (the only layer that may cross 0,
    Prop 1.2). Ties are broken towards the first layer; see `check_assumption_a`."""
    return jnp.argmin(jnp.abs(layers0), axis=-2)


def check_assumption_a(
    layers0: Float[Array, "depth dim"], strict: bool = False, rtol: float = 0.0
) -> Bool[Array, " dim"]:
    """Assumption (A): for each coordinate the argmin over layers of |u^k_i(0)| is unique.

    **Arguments:**

    - `layers0`: initial layers `(depth, dim)`.
    - `strict`: if `True`, raise instead of returning the mask when (A) fails.
    - `rtol`: two layers count as tied when their |u| differ by at most `rtol * max|u|`
        (0 = exact ties only). Near ties satisfy (A) but make the reduced flow stiff.

    **Returns:** boolean array `(dim,)`, True where (A) holds.

    **Raises:** `ValueError` (with `strict=True`) naming the coordinates and the tied layers.
    """
    layers0 = check_layers(layers0)
    a = jnp.abs(layers0)
    amin = jnp.min(a, axis=0)
    scale = jnp.maximum(jnp.max(a, axis=0), jnp.finfo(a.dtype).tiny)
    tied = a <= amin + rtol * scale
    ok = jnp.sum(tied, axis=0) == 1
    if strict:
        if is_traced(ok):
            raise ValueError("`strict=True` needs concrete `layers0` (not under jit/vmap).")
        ok_np = np.asarray(ok)
        if not ok_np.all():
            tied_np = np.asarray(tied)
            bad = [
                f"coordinate {i}: layers {np.flatnonzero(tied_np[:, i]).tolist()}"
                for i in np.flatnonzero(~ok_np)
            ]
            raise ValueError(
                "`layers0` violates Assumption (A): the minimal |u^k_i(0)| is not unique at "
                + "; ".join(bad[:10])
                + (" ..." if len(bad) > 10 else "")
                + ". Perturb the initialization (random inits satisfy (A) almost surely)."
            )
    return ok


def to_reduced(
    layers: Float[Array, "... depth dim"], k: Int[Array, " dim"]
) -> Float[Array, "... depth dim"]:
    """Permute layers per coordinate so that row 0 holds layer k_i (Section 2.1: v^1 gathers
    the minimal layers, v^{k_i} gets u^1, the others stay)."""
    depth = layers.shape[-2]
    perm = _permutation(k, depth)
    return jnp.take_along_axis(layers, jnp.broadcast_to(perm, layers.shape), axis=-2)


def from_reduced(
    v: Float[Array, "... depth dim"], k: Int[Array, " dim"]
) -> Float[Array, "... depth dim"]:
    """Inverse of `to_reduced` (the permutation is a transposition, its own inverse)."""
    return to_reduced(v, k)


def _permutation(k: Int[Array, " dim"], depth: int) -> Int[Array, "depth dim"]:
    rows = jnp.arange(depth)[:, None]
    return jnp.where(rows == 0, k[None, :], jnp.where(rows == k[None, :], 0, rows))
