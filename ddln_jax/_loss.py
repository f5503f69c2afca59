"""Losses of theta. Least squares uses the paper's convention L(theta) = ||X theta - y||^2
(no 1/2), so grad L = 2 X^T (X theta - y). Logistic and exponential losses for labels ±1.
Any callable theta -> scalar is accepted wherever a problem is (see `as_problem`)."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Scalar

from ._validate import as_float_array, check_finite, check_int, is_traced


def _check_data(X, y):
    X = as_float_array("X", X)
    y = as_float_array("y", y)
    if X.ndim != 2:
        raise ValueError(f"`X` must have shape (n, dim), got shape {tuple(X.shape)}.")
    if y.ndim != 1:
        raise ValueError(f"`y` must have shape (n,), got shape {tuple(y.shape)}.")
    if y.shape[0] != X.shape[0]:
        raise ValueError(
            f"`X` has {X.shape[0]} rows but `y` has {y.shape[0]} entries: they must match "
            "(X of shape (n, dim), y of shape (n,))."
        )
    return check_finite("X", X), check_finite("y", y)


class LeastSquares(eqx.Module):
    """L(theta) = ||X theta - y||^2 (the paper's convention: no 1/2).

    **Arguments:**

    - `X`: design matrix `(n, dim)`, any shape and rank.
    - `y`: targets `(n,)`.

    The derived quantities (`theta_ls`, `min_value`, `pl_constant`) are computed on demand
    from an SVD, so the module stays a plain pytree of `X, y` (jit/vmap friendly).
    """

    X: Float[Array, "n dim"]
    y: Float[Array, " n"]

    def __init__(self, X, y):
        self.X, self.y = _check_data(X, y)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    def loss(self, theta: Float[Array, " dim"]) -> Scalar:
        r = self.X @ theta - self.y
        return jnp.sum(r * r)

    def grad(self, theta: Float[Array, " dim"]) -> Float[Array, " dim"]:
        """2 X^T (X theta - y)."""
        return 2.0 * self.X.T @ (self.X @ theta - self.y)

    @property
    def theta_ls(self) -> Float[Array, " dim"]:
        """The minimum-norm least-squares solution pinv(X) y."""
        return jnp.linalg.pinv(self.X) @ self.y

    @property
    def min_value(self) -> Scalar:
        """L* = min_theta ||X theta - y||^2 (0 when y is in the range of X)."""
        r = self.X @ self.theta_ls - self.y
        return jnp.sum(r * r)

    def suboptimality(self, theta: Float[Array, "... dim"]) -> Float[Array, "..."]:
        """L(theta) - L* computed as ||X (theta - theta_LS)||^2: exact identity for least
        squares, and free of the cancellation of L - L* when both are large."""
        r = (theta - self.theta_ls) @ self.X.T
        return jnp.sum(r * r, axis=-1)

    @property
    def pl_constant(self) -> Scalar:
        """mu = 2 * lambda+_min(X^T X), the smallest non-zero eigenvalue: the PL inequality
        2 mu (L - L*) <= ||grad L||^2 holds for any shape and rank of X."""
        s = jnp.linalg.svd(self.X, compute_uv=False)
        ev = s * s
        tol = jnp.max(ev) * max(self.X.shape) * jnp.finfo(ev.dtype).eps
        return 2.0 * jnp.min(jnp.where(ev > tol, ev, jnp.inf))

    def __call__(self, theta):
        return self.loss(theta)


class _Classification(eqx.Module):
    """Margin losses sum_i phi(y_i <x_i, theta>) for labels y_i = ±1 (unnormalised, as the
    least-squares loss); inf L = 0, approached as the margins grow."""

    X: Float[Array, "n dim"]
    y: Float[Array, " n"]

    def __init__(self, X, y):
        self.X, self.y = _check_data(X, y)
        _check_labels(self.y)

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    def margin_loss(self, m):
        raise NotImplementedError

    def loss(self, theta):
        return jnp.sum(self.margin_loss(self.y * (self.X @ theta)))

    def grad(self, theta):
        return jax.grad(self.loss)(theta)

    @property
    def min_value(self):
        return jnp.zeros((), self.X.dtype)

    def __call__(self, theta):
        return self.loss(theta)


class Logistic(_Classification):
    """L(theta) = sum_i log(1 + exp(-y_i <x_i, theta>)) for labels y_i = ±1.

    `log_loss` is log L computed without underflow (a log-sum-exp of log phi(m_i), with
    log log(1 + e^{-m}) = -m + log(log1p(x)/x), x = e^{-m}, for m > 0, and the series
    -x/2 + 5x^2/24 - x^3/8 of the last term for x < 1e-4): finite for every finite theta,
    with finite derivatives, where L itself underflows to 0 once the margins pass ~745."""

    def margin_loss(self, m):
        return jnp.logaddexp(0.0, -m)

    def log_margin_loss(self, m):
        pos = m > 0
        mp = jnp.where(pos, m, 1.0)  # every branch stays finite: no NaN in the gradients
        mn = jnp.where(pos, -1.0, m)
        x = jnp.exp(-mp)
        small = x < 1e-4
        xl = jnp.where(small, 1.0, x)
        tail = jnp.where(small, x * (-0.5 + x * (5.0 / 24.0 - x / 8.0)),
                         jnp.log(jnp.log1p(xl) / xl))
        return jnp.where(pos, -mp + tail, jnp.log(jnp.logaddexp(0.0, -mn)))

    def log_loss(self, theta):
        """log L(theta), stable for arbitrarily large margins."""
        return jax.nn.logsumexp(self.log_margin_loss(self.y * (self.X @ theta)))


class Exponential(_Classification):
    """L(theta) = sum_i exp(-y_i <x_i, theta>) for labels y_i = ±1.

    `log_loss` is log L = logsumexp(-m_i), finite where L underflows."""

    def margin_loss(self, m):
        return jnp.exp(-m)

    def log_margin_loss(self, m):
        return -m

    def log_loss(self, theta):
        """log L(theta), stable for arbitrarily large margins."""
        return jax.nn.logsumexp(-(self.y * (self.X @ theta)))


def scaled_gradient(problem, theta, log_scale):
    """exp(log_scale) * grad L(theta). For a loss with `log_loss` it is computed as
    exp(log_scale + log L) * grad log L, which stays finite when L underflows and
    exp(log_scale) overflows (the log-time flows, where log_scale = tau ~ log(1/L))."""
    log_loss = getattr(problem, "log_loss", None)
    if log_loss is None:
        return jnp.exp(log_scale) * jax.grad(problem.loss)(theta)
    value, g = jax.value_and_grad(log_loss)(theta)
    return jnp.exp(log_scale + value) * g


def _check_labels(y):
    if not is_traced(y) and not np.all(np.abs(np.asarray(y)) == 1):
        raise ValueError("`y` must hold labels ±1 for a classification loss.")


class FunctionLoss(eqx.Module):
    """Wraps any differentiable callable theta -> scalar; the gradient is `jax.grad`."""

    fn: Callable = eqx.field(static=True)

    @property
    def dim(self):
        return None

    def loss(self, theta):
        return self.fn(theta)

    def grad(self, theta):
        return jax.grad(self.fn)(theta)

    def __call__(self, theta):
        return self.fn(theta)


def as_problem(problem):
    """A problem object (with `.loss`) is returned as is; a callable is wrapped."""
    if hasattr(problem, "loss") and callable(problem.loss):
        return problem
    if callable(problem):
        return FunctionLoss(problem)
    raise TypeError(
        "`problem` must be a loss object (e.g. `dd.LeastSquares(X, y)`) or a callable "
        f"theta -> scalar, got {type(problem).__name__}."
    )


def num_rows(problem) -> int:
    X = getattr(problem, "X", None)
    if X is None:
        raise TypeError(
            "minibatches need a problem with data rows (`dd.LeastSquares`, `dd.Logistic`, "
            f"`dd.Exponential`), got {type(problem).__name__}."
        )
    return X.shape[0]


def row_problem(problem, idx, weight):
    """The sub-problem on rows `idx`, its loss multiplied by `weight` (n/b makes the minibatch
    loss an unbiased estimate of the full sum-over-rows loss)."""
    sub = eqx.tree_at(lambda p: (p.X, p.y), problem, (problem.X[idx], problem.y[idx]))
    return lambda th: weight * sub.loss(th)


def check_batch_size(problem, batch_size):
    if batch_size is None:
        return None
    n = num_rows(problem)
    batch_size = check_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"`batch_size` must be <= the number of rows n = {n}, got {batch_size}.")
    return batch_size
