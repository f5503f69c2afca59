"""The argument checks of `sweep`: the grid, the problem (fixed, a loss with `dim=`, or
`per_seed`), the key, the output folder and the step budgets. Static misuse raises
`ValueError`/`TypeError` naming the argument and the fix."""

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._loss import FunctionLoss
from .._validate import check_depth, check_int, is_traced
from .._validate import check_key as _check_key


class per_seed:  # noqa: N801 - used as a function: `dd.per_seed(fn)`
    """Marks `fn` as a function `seed -> problem` for `dd.sweep`: grid point (depth, scale,
    seed) then solves the problem `fn(seed)`. `fn` is traced (called inside `jax.vmap` on an
    integer array of seeds), so it must build its problem with JAX operations
    (`jr.fold_in(key, seed)`, ...).

    A plain callable passed to `sweep` is a loss theta -> scalar (with `dim=`), as
    everywhere else in the library.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        if isinstance(fn, per_seed):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(
                f"`dd.per_seed` needs a function seed -> problem, got {type(fn).__name__}."
            )
        self.fn = fn

    def __call__(self, seed):
        return self.fn(seed)

    def __repr__(self) -> str:
        return f"per_seed({getattr(self.fn, '__qualname__', repr(self.fn))})"


def _is_problem(p) -> bool:
    return hasattr(p, "loss") and callable(p.loss)


def _integer_value(name: str, v) -> int:
    """An integer-valued scalar (Python, NumPy or JAX; an int or an integral float) as int."""
    if isinstance(v, (bool, np.bool_)) or is_traced(v):
        raise TypeError(f"`{name}` must hold integers, got {v!r}.")
    a = np.asarray(v)
    if a.dtype == bool or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise TypeError(f"`{name}` must hold integers, got {v!r}.")
    if np.issubdtype(a.dtype, np.floating) and not (np.isfinite(a) and float(a).is_integer()):
        raise ValueError(
            f"`{name}` must hold integers, got {float(a)!r} (not an integer: "
            "it is not rounded for you)."
        )
    return int(a)


def _values(name: str, values) -> list:
    if isinstance(values, (str, bytes)) or values is None:
        raise TypeError(f"`{name}` must be a list of numbers, got {values!r}.")
    if is_traced(values):
        raise TypeError(f"`{name}` must be concrete (the grid is planned on the host).")
    arr = values if isinstance(values, range) else np.asarray(values, dtype=object)
    if np.ndim(arr) > 1:
        raise ValueError(f"`{name}` must be one list of values, got shape {np.shape(arr)}.")
    return list(np.atleast_1d(arr)) if not isinstance(arr, range) else list(arr)


def _no_duplicates(name: str, values: list) -> None:
    seen, twice = set(), []
    for v in values:
        if v in seen and v not in twice:
            twice.append(v)
        seen.add(v)
    if twice:
        raise ValueError(
            f"`{name}` lists {twice} more than once: each grid point would be "
            "computed twice (the same result). Pass each value once."
        )


def check_seeds(seeds) -> list[int]:
    """An integer-valued scalar n means `range(n)`; otherwise a list of distinct ints."""
    if np.ndim(seeds) == 0 and not isinstance(seeds, (str, bytes, range)) and seeds is not None:
        n = _integer_value("seeds", seeds)
        if n < 1:
            raise ValueError(
                f"`seeds` as a number is a number of seeds (range(seeds)): must be >= 1, got {n}."
            )
        return list(range(n))
    out = [_integer_value("seeds", s) for s in _values("seeds", seeds)]
    _no_duplicates("seeds", out)
    return out


def check_depths(depths) -> list[int]:
    out = [check_depth(_integer_value("depths", L)) for L in _values("depths", depths)]
    _no_duplicates("depths", out)
    return out


def check_scales(scales) -> list[float]:
    vals = _values("scales", scales)
    try:
        out = [float(s) for s in vals]
    except (TypeError, ValueError):
        raise TypeError(f"`scales` must be a list of numbers, got {scales!r}.") from None
    if not np.all(np.isfinite(out)) or (out and min(out) < 0):
        raise ValueError(f"`scales` must be finite and >= 0, got {out}.")
    _no_duplicates("scales", out)
    return out


def check_grid(depths, scales, seeds):
    """The grid's axes as lists of distinct values (see `check_seeds`)."""
    depths, scales, seeds = check_depths(depths), check_scales(scales), check_seeds(seeds)
    if not depths or not scales or not seeds:
        raise ValueError("`depths`, `scales` and `seeds` must not be empty.")
    if 0.0 in scales:
        warnings.warn(
            "sweep: `scales` contains 0: those grid points start from all-zero layers, a "
            "stationary point of the flow (the gradient with respect to the layers is 0 for "
            "depth >= 2): they stay there. Use scales > 0.",
            RuntimeWarning,
            stacklevel=3,
        )
    return depths, scales, seeds


def check_key(key):
    """One JAX PRNG key (see `_validate.check_key`)."""
    key = _check_key("key", key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape:
        raise ValueError(f"`key` must be one PRNG key, got a batch of shape {key.shape}.")
    return key


def check_out(out) -> Path | None:
    """`out`: a folder, created if missing; an existing file or an unwritable place is an
    error naming `out`."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"`out`={str(out)!r} is an existing file: `out` is a folder for the "
            "sweep's files. Pass a folder (new or of this sweep)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"`out`={str(out)!r} cannot be created ({e.strerror or e}): pass a "
            "folder where this process may write."
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(
            f"`out`={str(out)!r} is not writable by this process: pass a folder where it may write."
        )
    return path


def check_steps(explicit_max_steps, max_steps) -> None:
    check_int("explicit_max_steps", explicit_max_steps)
    check_int("max_steps", max_steps)


def resolve_problem(problem, dim, seeds):
    """(problem or seed -> problem function, batched, a sample problem, dim).

    - a problem object (`dd.LeastSquares`, ...): the same problem at every grid point;
    - `dd.per_seed(fn)`: the problem `fn(seed)` at each seed;
    - a plain callable: a loss theta -> scalar, with `dim=` (the number of coordinates)."""
    if isinstance(problem, per_seed):
        fn = problem.fn
        try:
            sample = jax.eval_shape(fn, jnp.asarray(seeds[0]))
        except Exception as e:
            raise TypeError(f"`problem` = dd.per_seed(fn): calling fn(seed) failed ({e}).") from e
        if not _is_problem(sample):
            raise TypeError(
                f"`problem` = dd.per_seed(fn): fn(seed) must return a problem "
                f"(e.g. `dd.LeastSquares(X, y)`), got {type(sample).__name__}."
            )
        batched, fixed = True, None
    elif _is_problem(problem):
        batched, fixed, sample = False, problem, problem
    elif callable(problem):
        if dim is None:
            raise TypeError(
                "`problem` is a plain callable: `sweep` takes it as a loss theta -> scalar, "
                "which needs `dim=` (the number of coordinates of theta). If it is a function "
                "seed -> problem, wrap it: `dd.sweep(dd.per_seed(fn), ...)`."
            )
        fixed = sample = FunctionLoss(problem)
        batched = False
    else:
        raise TypeError(
            "`problem` must be a problem object (e.g. `dd.LeastSquares(X, y)`), a "
            "loss theta -> scalar (with `dim=`), or `dd.per_seed(fn)` for a "
            f"function seed -> problem; got {type(problem).__name__}."
        )
    pdim = getattr(sample, "dim", None)
    if dim is not None:
        dim = check_int("dim", dim)
        if pdim is not None and pdim != dim:
            raise ValueError(
                f"`dim`={dim} but the problem's `X` has {pdim} columns: drop `dim` "
                "or make them match."
            )
    elif pdim is None:
        raise TypeError(
            "`sweep` needs the number of coordinates of theta: pass `dim=` (the "
            "problem has no design matrix `X` to read it from)."
        )
    dim = int(pdim if dim is None else dim)
    if batched:
        seed0 = jnp.asarray(seeds[0])
        check_scalar_loss(lambda th: problem.fn(seed0).loss(th), dim, False)
    else:
        check_scalar_loss(fixed.loss, dim, isinstance(fixed, FunctionLoss))
    return (problem.fn if batched else fixed), batched, sample, dim


def check_scalar_loss(loss, dim: int, plain: bool) -> None:
    """`loss` maps a `(dim,)` theta to a scalar (traced only: nothing runs). `plain`: a
    plain callable given as `problem` (it may be a seed -> problem function)."""
    theta = jax.ShapeDtypeStruct((dim,), jnp.result_type(float))
    try:
        out = jax.eval_shape(loss, theta)
    except Exception as e:
        hint = "; a function seed -> problem must be wrapped: `dd.per_seed(fn)`" if plain else ""
        raise TypeError(f"`problem` failed on a theta of shape ({dim},): {e}{hint}") from e
    shape = getattr(out, "shape", None)
    if shape != ():
        what = f"shape {shape}" if shape is not None else type(out).__name__
        hint = (
            " (a function seed -> problem? wrap it: `dd.per_seed(fn)`)"
            if _is_problem(out)
            else ": reduce it, e.g. with `jnp.sum`"
        )
        raise TypeError(f"`problem` must return a scalar loss, got {what}{hint}.")
