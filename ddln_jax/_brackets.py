"""The gradient fields of a parameterization and their Lie brackets, evaluated at points by
autodiff: the machinery under `lie_rank` and `is_commuting` (`_lie`).

For G: R^D -> R^d (a pytree u, flattened in `jax.flatten_util.ravel_pytree` order, to a
vector theta), the generators are the fields X_i = grad G_i, i.e. J_G(u)^T e_i, and
[X, Y] = DY X - DX Y. A *word* `(i1, ..., ik)` of output indices stands for the right-normed
bracket [X_{i1}, [X_{i2}, ... X_{ik}]]; it is evaluated by nested `jax.jvp` over `jax.vjp`,
vmapped over the words of a level, in batches of two fixed sizes (two compilations).

Scale. Each value is divided by its own scale, |DY X| + |DX Y| for a bracket (what cancels in
it, so round-off in it is ~eps) and |X| for a generator. `rank_cut` reads a rank from the
singular values of such values: the number above `rtol` times the largest.
"""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Float, PRNGKeyArray, PyTree

from ._validate import as_float_array, check_finite

_RTOL = {True: 1e-8, False: 1e-4}  # keyed by jax_enable_x64
_MIN_BATCH, _MAX_BATCH = 128, 1024  # words per compiled call


def _unflatten(spec, flat):
    treedef, shapes = spec
    parts = jnp.split(flat, np.cumsum([math.prod(s) for s in shapes])[:-1].tolist())
    return jtu.tree_unflatten(treedef, [p.reshape(s) for p, s in zip(parts, shapes)])


def _generator(G, spec, v, c):
    """(grad G . c)(v) = J_G(v)^T c: the field of the output combination c."""
    return jax.vjp(lambda w: G(_unflatten(spec, w)), v)[1](c)[0]


def _bracket(G, spec, v, cs):
    """The right-normed bracket [X_c0, [X_c1, ... X_ck]](v) and the norms of its two terms."""
    if cs.shape[0] == 1:
        x = _generator(G, spec, v, cs[0])
        return x, jnp.linalg.norm(x)

    def x_field(w):
        return _generator(G, spec, w, cs[0])

    def y_field(w):
        return _bracket(G, spec, w, cs[1:])[0]

    y, dy_x = jax.jvp(y_field, (v,), (x_field(v),))
    _, dx_y = jax.jvp(x_field, (v,), (y,))
    return dy_x - dx_y, jnp.linalg.norm(dy_x) + jnp.linalg.norm(dx_y)


@eqx.filter_jit
def _batch(G, spec, v, cs):
    return jax.vmap(lambda c: _bracket(G, spec, v, c))(cs)


def evaluate_words(
    G, spec, v: Float[np.ndarray, " D"], words: list[tuple[int, ...]], d: int
) -> tuple[Float[np.ndarray, "D words"], Float[np.ndarray, " words"]]:
    """The values of the bracket `words` (all of one length) at `v`, each divided by its
    scale, as columns; and the scales."""
    eye = np.eye(d, dtype=np.asarray(v).dtype)
    k = len(words[0])
    cols, scales = [], []
    for start in range(0, len(words), _MAX_BATCH):
        chunk = words[start : start + _MAX_BATCH]
        size = _MIN_BATCH if len(chunk) <= _MIN_BATCH else _MAX_BATCH  # two compilations
        cs = np.zeros((size, k, d), eye.dtype)
        cs[: len(chunk)] = eye[np.asarray(chunk)]
        vals, sc = _batch(G, spec, v, jnp.asarray(cs))
        cols.append(np.asarray(vals)[: len(chunk)])
        scales.append(np.asarray(sc)[: len(chunk)])
    vals, sc = np.concatenate(cols), np.concatenate(scales)
    if not np.all(np.isfinite(vals)):
        raise ValueError(
            "`parameterization` has non-finite derivatives at a point: it must be smooth "
            "(twice differentiable and more) near `u`."
        )
    safe = np.where(sc > 0, sc, 1.0)
    return (vals / safe[:, None]).T, sc


def rank_cut(s: Float[np.ndarray, " k"], rtol: float) -> tuple[int, float, float]:
    """Rank, absolute tolerance and gap of the descending singular values `s`."""
    tol = rtol * s[0] if s.size and s[0] > 0 else 0.0
    rank = int(np.sum(s > tol)) if tol > 0 else 0
    padded = np.concatenate([s, [0.0]])
    below = padded[rank]
    gap = float("inf") if rank == 0 or below == 0 else float(padded[rank - 1] / below)
    return rank, float(tol), gap


def prepare_points(
    parameterization, u: PyTree, key: PRNGKeyArray | None, num_points: int, rtol: float | None
) -> tuple[tuple, Float[np.ndarray, "points D"], int, float]:
    """Check the arguments shared by `lie_rank` and `is_commuting` (warning, at their caller,
    when float64 is off); return the pytree spec of `u`, the points (`u` flattened, then
    `num_points - 1` random ones), d and `rtol` (its default filled in)."""
    if not callable(parameterization):
        raise TypeError(
            "`parameterization` must be a callable u -> theta, got "
            f"{type(parameterization).__name__}."
        )
    x64 = bool(jax.config.jax_enable_x64)
    if not x64:
        warnings.warn(
            "float64 is off: ranks are decided with rtol=1e-4 and may be wrong. Call "
            "`jax.config.update('jax_enable_x64', True)` at your program's entry point.",
            RuntimeWarning,
            stacklevel=3,
        )
    rtol = _RTOL[x64] if rtol is None else rtol
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"`rtol` must be a number in (0, 1), got {rtol!r}.")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"`num_points` must be an int >= 1, got {num_points!r}.")
    leaves, treedef = jtu.tree_flatten(u)
    if not leaves:
        raise ValueError("`u` must be a pytree with at least one array leaf, got none.")
    # numpy on the host: eager jax ops would compile once per new shape
    dtype = np.float64 if x64 else np.float32
    leaves = [np.asarray(check_finite("u", as_float_array("u", x)), dtype) for x in leaves]
    spec = (treedef, tuple(x.shape for x in leaves))
    flat = np.concatenate([x.ravel() for x in leaves])
    if flat.size == 0:
        raise ValueError("`u` has no entries.")
    d = _check_output(parameterization, spec, flat)
    rms = [np.sqrt(np.mean(x**2)) if np.any(x) else 1.0 for x in leaves]
    scale = np.concatenate([np.full(x.size, r, dtype) for x, r in zip(leaves, rms)])
    key = jr.key(0) if key is None else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jr.key_data(key)
    seed = np.asarray(key).ravel()
    extra = scale * np.random.default_rng(seed).standard_normal((num_points - 1, flat.size))
    points = np.concatenate([flat[None], extra.astype(dtype)])
    _check_differentiable(parameterization, spec, points, d)
    return spec, points, d, rtol


def _check_output(G, spec, flat) -> int:
    """d, from G's output shape (traced only, with `jax.eval_shape`: nothing compiles)."""
    try:
        out = jax.eval_shape(lambda w: G(_unflatten(spec, w)), flat)
    except jax.errors.JAXTypeError as e:
        raise TypeError(
            "`parameterization` must be traceable by JAX (no numpy conversions or Python "
            f"control flow on values). {type(e).__name__}: {e}"
        ) from e
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(
            f"`parameterization` failed on `u` (leaf shapes {list(spec[1])}): `u` does not "
            f"match what it expects. {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 1:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"`parameterization` must return a 1-D array theta, got {shape}; return "
            "`theta.ravel()` (or stack the outputs) for matrix-valued maps."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating) or out.shape[0] == 0:
        raise TypeError(
            f"`parameterization` must return a non-empty float vector, got dtype {out.dtype}, "
            f"shape {out.shape}."
        )
    return int(out.shape[0])


def _check_differentiable(G, spec, points, d):
    """Level 1 at every point, with errors that name a non-differentiable G."""
    try:
        fields = [evaluate_words(G, spec, p, [(i,) for i in range(d)], d)[0] for p in points]
    except TypeError as e:  # JAX's tracer errors (array conversion, concretization) included
        raise TypeError(
            "`parameterization` must be differentiable by JAX (no numpy conversions, int casts "
            f"or Python control flow on values). {type(e).__name__}: {e}"
        ) from e
    if not any(np.any(f) for f in fields):
        raise ValueError(
            "`parameterization` has a zero Jacobian at every point tried: it is constant, or "
            "not differentiable (rounding, `stop_gradient`, integer steps)."
        )
