"""The network: layers `(depth, dim)`, theta = prod_j u^j (eq 1), initializations and
Assumption (A) with the permutation to the reduced variables v (Section 2.1), and the maths of
those reduced variables.

Per coordinate i, v^1_i is the layer of minimal |u^k_i(0)| and, by the conservation law,
v^j = sign(v^j(0)) sqrt(v1^2 + Delta_j) with Delta_j = v^j(0)^2 - v^1(0)^2 > 0 (j >= 2).
Hence theta = s v1 prod_{j>=2} sqrt(v1^2 + Delta_j) with s = sign(prod_{j>=2} v^j(0)) (the
paper's printed formula takes |v1| and is wrong once v1 changes sign), and the metric
M_ii = sum_j prod_{k != j} (v^k)^2 depends on w = v1^2 alone.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._validate import (
    as_float_array,
    check_depth,
    check_finite,
    check_layers,
    check_nonnegative,
    is_traced,
)


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

    `scale` (>= 0) may be a traced array (sweeps over scale do not recompile).
    """
    depth, dim = check_depth(depth), _check_dim(dim)
    check_nonnegative("scale", scale)
    return scale * jr.normal(key, (depth, dim))


def init_zero_first(
    key: PRNGKeyArray, depth: int, dim: int, scale=1.0
) -> Float[Array, "depth dim"]:
    """First layer 0, the others `scale * N(0, 1)` (the paper's Fig 4). Satisfies (A) a.s.:
    the zero layer is the unique minimum of every coordinate."""
    depth, dim = check_depth(depth), _check_dim(dim)
    check_nonnegative("scale", scale)
    rest = scale * jr.normal(key, (depth - 1, dim))
    return jnp.concatenate([jnp.zeros((1, dim), rest.dtype), rest], axis=0)


INITS = ("gaussian", "zero_first")


def init_padded(key, depth, padded_depth: int, dim: int, scale, init: str = "gaussian"):
    """A network of `depth` layers padded to `padded_depth` rows with frozen unit layers (so
    that networks of several depths share one array shape): the first `depth` rows of a
    `padded_depth`-row draw of `scale * N(0, 1)` (row 0 zero for `init="zero_first"`), the
    other rows 1. `depth` and `scale` may be traced; the real layers do not depend on
    `padded_depth`'s rows beyond `depth` but do depend on `padded_depth` (the draw's shape)."""
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")
    u = scale * jr.normal(key, (padded_depth, dim))
    rows = jnp.arange(padded_depth)[:, None]
    if init == "zero_first":
        u = jnp.where(rows == 0, 0.0, u)
    return jnp.where(rows < depth, u, 1.0)


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
    # concrete layers: numpy on the host (the same exact operations, no program to compile)
    xp = jnp if is_traced(layers0) or is_traced(rtol) else np
    a = xp.abs(layers0 if xp is jnp else np.asarray(layers0))
    amin = xp.min(a, axis=0)
    scale = xp.maximum(xp.max(a, axis=0), xp.finfo(a.dtype).tiny)
    tied = a <= amin + rtol * scale
    ok = xp.sum(tied, axis=0) == 1
    if strict:
        if xp is jnp:
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
                + ". Perturb the initialization (random inits satisfy (A) almost surely). "
                "Equal layers alpha*1 are the tied network u^{⊙L}: use "
                "`parameterization=dd.tied(L)` with `dd.TiedMirrorMap`, or `dd.init_yun` "
                "(Corollary 1: one zero layer, the others alpha*ubar), which satisfies (A)."
            )
    return ok if xp is jnp else jax.device_put(ok)  # (put: `jnp.asarray` compiles)


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


class ReducedInit(eqx.Module):
    """What the reduced dynamics need from an (A) initialization.

    - `k`: argmin layer per coordinate `(dim,)`.
    - `a`: v^1(0) `(dim,)`.
    - `deltas`: Delta_j for j = 2..L, `(depth - 1, dim)`, all > 0 under (A).
    - `signs`: sign(v^j(0)) for j = 2..L, `(depth - 1, dim)`.
    - `s`: prod of `signs` `(dim,)`.
    """

    k: Int[Array, " dim"]
    a: Float[Array, " dim"]
    deltas: Float[Array, "depth_1 dim"]
    signs: Float[Array, "depth_1 dim"]
    s: Float[Array, " dim"]

    @property
    def depth(self) -> int:
        return self.deltas.shape[0] + 1


def reduced_init(layers0: Float[Array, "depth dim"]) -> ReducedInit:
    """Permute to v (Section 2.1) and collect Delta_j, the signs and v^1(0)."""
    if not is_traced(layers0):
        return _reduced_init_host(np.asarray(layers0))
    k = minimal_layer(layers0)
    v0 = to_reduced(layers0, k)
    a = v0[0]
    deltas = v0[1:] ** 2 - a**2
    signs = jnp.where(v0[1:] >= 0, 1.0, -1.0).astype(v0.dtype)
    return ReducedInit(k=k, a=a, deltas=deltas, signs=signs, s=jnp.prod(signs, axis=0))


def _reduced_init_host(layers0: np.ndarray) -> ReducedInit:
    """`reduced_init` of concrete layers in numpy: the same exact, elementwise operations (a
    gather, one square and one subtraction per entry, signs) as op-by-op JAX, so the same
    bits, without compiling a program for each of them."""
    depth = layers0.shape[-2]
    k = np.argmin(np.abs(layers0), axis=-2)
    rows = np.arange(depth)[:, None]
    perm = np.where(rows == 0, k[None, :], np.where(rows == k[None, :], 0, rows))
    v0 = np.take_along_axis(layers0, perm, axis=-2)
    a = v0[0]
    deltas = v0[1:] ** 2 - a**2
    signs = np.where(v0[1:] >= 0, 1.0, -1.0).astype(v0.dtype)
    # (put, not `jnp.asarray`: that compiles a small program per shape)
    k, a, deltas, signs, s = jax.device_put(
        (k.astype(jnp.result_type(int)), a, deltas, signs, np.prod(signs, axis=0)))
    return ReducedInit(k=k, a=a, deltas=deltas, signs=signs, s=s)


def theta_from_v1(v1, red: ReducedInit):
    """theta = s v1 prod_{j>=2} sqrt(v1^2 + Delta_j) (corrected formula after eq 6)."""
    return red.s * v1 * jnp.prod(jnp.sqrt(v1**2 + red.deltas), axis=0)


def layers_from_v1(v1, red: ReducedInit):
    """All layers from v1: v^j = sign(v^j(0)) sqrt(v1^2 + Delta_j), then the inverse
    permutation back to u."""
    rest = red.signs * jnp.sqrt(v1**2 + red.deltas)
    return from_reduced(jnp.concatenate([v1[None], rest], axis=0), red.k)


def metric_from_w(w, deltas):
    """M_ii = sum_j prod_{k != j} (w + Delta_k), Delta_1 = 0, as a function of w = v1^2."""
    factors = w + deltas
    prod_rest = jnp.prod(factors, axis=0)
    # sum_{j>=2} w prod_{k>=2, k != j} (w + Delta_k), without division (factors may vanish).
    depth_1 = deltas.shape[0]
    others = jnp.stack(
        [jnp.prod(jnp.delete(factors, j, axis=0, assume_unique_indices=True), axis=0)
         for j in range(depth_1)]
    )
    return prod_rest + w * jnp.sum(others, axis=0)


def w_from_theta(theta, deltas, iterations: int = 60):
    """Solve w prod_{j>=2} (w + Delta_j) = theta^2 for w = v1^2 >= 0.

    Newton in x = log w on g(x) = x + sum_j log(e^x + Delta_j) - log theta^2, which is
    increasing (g' in [1, L]) and convex, so Newton converges from any start; it starts
    from the larger of the small-w and large-w asymptotic roots.
    """
    t2 = theta**2
    safe = t2 > 0
    log_t2 = jnp.log(jnp.where(safe, t2, 1.0))
    depth = deltas.shape[0] + 1
    x_small = log_t2 - jnp.sum(jnp.log(deltas), axis=0)
    x_large = log_t2 / depth
    x0 = jnp.maximum(x_small, x_large)

    def body(_, x):
        ex = jnp.exp(x)
        g = x + jnp.sum(jnp.log(ex + deltas), axis=0) - log_t2
        gp = 1.0 + jnp.sum(ex / (ex + deltas), axis=0)
        return x - g / gp

    x = jax.lax.fori_loop(0, iterations, body, x0)
    return jnp.where(safe, jnp.exp(x), 0.0)


def v1_from_theta(theta, red: ReducedInit):
    """Invert theta_from_v1: sign(v1) = sign(theta) s, |v1| = sqrt(w)."""
    w = w_from_theta(theta, red.deltas)
    return jnp.sign(theta) * red.s * jnp.sqrt(w)


def reduced_gap(layers0: Float[Array, "depth dim"]) -> Float[Array, ""]:
    """min over coordinates and j >= 2 of Delta_j / max_k u^k_i(0)^2: how close a
    coordinate is to violating (A). Small gaps make the reduced ODE nearly singular."""
    red = reduced_init(layers0)
    scale = jnp.maximum(jnp.max(layers0**2, axis=0), jnp.finfo(layers0.dtype).tiny)
    return jnp.min(red.deltas / scale)
