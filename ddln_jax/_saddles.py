"""Small initialization: the saddle-to-saddle path for every depth (README: saddle-to-saddle), and
plateau detection on simulated flows to compare it with.

Per coordinate theta_i = Psi_i(xi_i) with xi' = -grad L (docs/maths.md: mirror maps). From a small
init, theta_i stays O(alpha^L) while xi_i is inside (-e_i^-, e_i^+) and leaves 0 only when xi_i
reaches an edge, so xi moves in straight lines, xi' = -grad L(beta_k), while theta sits at
a saddle beta_k: the minimiser of L with beta_i >= 0 where xi_i = e_i^+, beta_i <= 0 where
xi_i = -e_i^-, beta_i = 0 elsewhere. A jump happens when a free xi_i reaches an edge; an
edge coordinate whose beta_i is 0 and whose gradient points inward leaves (deactivation).
The path stops at grad L = 0. Its end point minimises sum_i e_i^+ beta_i^+ + e_i^- beta_i^-
over the minimisers of L (the KKT conditions are the box conditions on xi): an asymmetric
weighted-l1 interpolator when X beta = y is solvable, theta_LS when X has full column rank.

The recursion runs in real time with the finite-alpha thresholds (not their limits), so its
jump times predict the flow's at the given init; it is plain numpy/scipy (not a hot path).
"""

import warnings

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._loss import LeastSquares
from ._mirror import MirrorMap, ShallowMirrorMap
from ._network import check_assumption_a
from ._validate import check_layers


class SaddlePath(eqx.Module):
    """Result of `saddle_path`. With K jumps, plateau k (k = 0..K) lasts from
    `jump_times[k - 1]` (0 for k = 0) to `jump_times[k]` (inf for k = K).

    **Fields:**

    - `jump_times`: `(K,)` real times of the jumps at the given init: the time at which
        xi_i(t), moving in a straight line, reaches its threshold e_i^± (see `saddle_path`).
    - `rescaled_jump_times`: `(K,)` `jump_times / time_scale`; they converge as alpha -> 0.
    - `saddles`: `(K + 1, dim)` beta_k, the saddle of plateau k (`saddles[0] = 0`).
    - `signs`: `(K + 1, dim)` in {-1, 0, +1}: the active set of plateau k with its sign
        constraint (+1: xi_i = e_i^+, beta_i >= 0; -1: xi_i = -e_i^-, beta_i <= 0).
        A +1/-1 turning into 0 is a deactivation.
    - `plateau_losses`: `(K + 1,)` L(beta_k).
    - `xi`: `(K + 1, dim)` the mirror coordinate at the start of plateau k (`xi[0] = 0`).
    - `thresholds`: `(2, dim)` the edges `(e^-, e^+)` (both > 0): xi_i in (-e_i^-, e_i^+).
    - `end_point`: beta_K, where the path ends.
    - `scale`: alpha used for the time scale; `time_scale`: ln(1/alpha) (L = 2) or
        alpha^{-(L-2)} (L >= 3).
    - `converged`: True when the path ended at grad L = 0 within `max_jumps`.
    """

    jump_times: Float[Array, " K"]
    rescaled_jump_times: Float[Array, " K"]
    saddles: Float[Array, "K1 dim"]
    signs: Int[Array, "K1 dim"]
    plateau_losses: Float[Array, " K1"]
    xi: Float[Array, "K1 dim"]
    thresholds: Float[Array, "2 dim"]
    end_point: Float[Array, " dim"]
    scale: Float[Array, ""]
    time_scale: Float[Array, ""]
    converged: Bool[Array, ""]

    @property
    def num_jumps(self) -> int:
        return int(self.jump_times.shape[0])


def saddle_thresholds(layers0) -> tuple[np.ndarray, np.ndarray]:
    """The edges `(e^-, e^+)` of the mirror coordinate, per coordinate, both > 0.

    - L >= 3: the edges of the (bounded) domain of xi, e_i^+ = int_{theta0_i}^inf dtheta/M_ii
        and e_i^- = int_{-inf}^{theta0_i} dtheta/M_ii (`MirrorMap.domain`); e = c alpha^{-(L-2)}
        exactly when the init is alpha times a fixed shape.
    - L = 2: the edges are infinite; the threshold is where theta_i reaches unit size,
        e_i^± = ±grad Q_i(±1) = ln(1/alpha) + ln(2/|a_i ± b_i|) + O(alpha^4) for
        u(0) = alpha (a, b). Any other O(1) level moves jump times by O(1), which is the
        1/ln(1/alpha) relative error of the L = 2 limit anyway.

    **Raises:** `ValueError` if `layers0` violates (A), or (L = 2) has |theta0_i| >= 1.
    """
    layers0 = check_layers(layers0)
    try:
        check_assumption_a(layers0, strict=True)
    except ValueError as e:
        raise ValueError(f"`saddle_path` needs Assumption (A). {e}") from None
    if layers0.shape[0] == 2:
        mirror, ones = ShallowMirrorMap.from_layers(layers0), jnp.ones(layers0.shape[1])
        e_minus, e_plus = -mirror.grad_q(-ones), mirror.grad_q(ones)
        if not (np.all(np.asarray(e_minus) > 0) and np.all(np.asarray(e_plus) > 0)):
            raise ValueError(
                "`layers0` is not a small initialization: some |theta0_i| >= 1, so theta_i "
                "has no plateau below unit size (depth 2)."
            )
    else:
        lo, hi = MirrorMap.from_layers(layers0).domain()
        e_minus, e_plus = -lo, hi
    return np.asarray(e_minus, float), np.asarray(e_plus, float)


def _time_scale(layers0, scale) -> tuple[float, float]:
    depth = layers0.shape[0]
    alpha = float(np.max(np.abs(np.asarray(layers0)))) if scale is None else float(scale)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"`scale` must be a finite number > 0, got {scale!r}.")
    if depth == 2:
        if alpha >= 1:
            raise ValueError(
                f"`scale` must be < 1 at depth 2 (time scale ln(1/alpha)), got {alpha}."
            )
        return alpha, float(np.log(1 / alpha))
    return alpha, alpha ** (-(depth - 2))


def _constrained_ls(X, y, signs):
    """argmin ||X beta - y||^2 with sign(beta_i) in {0, signs_i} (NNLS on flipped columns)
    and its gradient 2 X^T (X beta - y)."""
    beta = np.zeros(X.shape[1])
    idx = np.flatnonzero(signs)
    if idx.size:
        from scipy.optimize import nnls  # (lazy: scipy.optimize costs ~0.5 s to import)

        z, _ = nnls(X[:, idx] * signs[idx], y, maxiter=50 * max(idx.size, 10))
        beta[idx] = signs[idx] * z
    return beta, 2.0 * X.T @ (X @ beta - y)


def _next_hit(xi, g, signs, e_minus, e_plus, gtol):
    """Time to the next edge hit of a free coordinate moving with xi' = -g, and the hits."""
    free = signs == 0
    up, down = free & (g < -gtol), free & (g > gtol)
    if not (up.any() or down.any()):
        return None, None
    dt = np.full(xi.shape, np.inf)
    dt[up] = (e_plus[up] - xi[up]) / -g[up]
    dt[down] = (e_minus[down] + xi[down]) / g[down]
    dt = np.maximum(dt, 0.0)
    step = float(np.min(dt))
    hit = np.where(dt <= step * (1 + 1e-10) + 1e-300, np.where(up, 1, -1), 0)
    return step, hit


def _recursion(X, y, e_minus, e_plus, max_jumps, tol):
    """The saddle recursion (README: saddle-to-saddle) in real time; returns the lists of the
    path."""
    d = X.shape[1]
    gtol = tol * max(2.0 * np.linalg.norm(X, 2) * np.linalg.norm(y), np.finfo(float).tiny)
    xi, signs, t = np.zeros(d), np.zeros(d, int), 0.0
    beta, g = _constrained_ls(X, y, signs)
    times, betas, sign_hist, xis = [], [beta], [signs.copy()], [xi.copy()]
    converged = False
    for _ in range(max_jumps + 1):
        # deactivation: at an edge with beta_i = 0 while the gradient points inward
        small = np.abs(beta) <= 1e-12 * max(np.max(np.abs(beta)), 1e-300)
        leave = small & (((signs > 0) & (g > gtol)) | ((signs < 0) & (g < -gtol)))
        signs[leave] = 0
        sign_hist[-1] = signs.copy()
        step, hit = _next_hit(xi, g, signs, e_minus, e_plus, gtol)
        if step is None:
            converged = True
            break
        if len(times) == max_jumps:
            break
        xi = np.where(signs == 0, xi - step * g, xi)
        xi = np.where(hit > 0, e_plus, np.where(hit < 0, -e_minus, xi))
        t += step
        signs = np.where(hit != 0, hit, signs)
        beta, g = _constrained_ls(X, y, signs)
        times.append(t)
        betas.append(beta)
        sign_hist.append(signs.copy())
        xis.append(xi.copy())
    return times, betas, sign_hist, xis, converged


def saddle_path(
    layers0, problem, *, scale=None, max_jumps: int | None = None, tol: float = 1e-9
) -> SaddlePath:
    """The saddle-to-saddle path of gradient flow from a small initialization
    (README: saddle-to-saddle; Pesme & Flammarion 2023 for L = 2), for every depth and any (A) init.

    Along the path xi(t) is piecewise linear, xi' = -grad L(beta_k) on plateau k, and a
    jump happens when a free coordinate of xi reaches its threshold e_i^± (see
    `saddle_thresholds`). **Jump time** at finite alpha means that hitting time, computed
    with the finite-alpha thresholds. It predicts the flow's jump (`detect_plateaus`: the
    loss halfway between the plateau levels) with an error O(1) in real time: relative
    O(1/ln(1/alpha)) for L = 2, O(alpha^{L-2}) for L >= 3.

    **Arguments:**

    - `layers0`: initial layers `(depth, dim)`, depth >= 2, satisfying (A); the path is the
        alpha -> 0 picture, meaningful for small inits.
    - `problem`: a `dd.LeastSquares(X, y)`, L = ||X theta - y||^2, any shape of X.
    - `scale`: alpha for the time scale (default max |u^j_i(0)|).
    - `max_jumps`: cap on the number of jumps (default 10 dim + 10).
    - `tol`: relative tolerance for a zero gradient coordinate (times 2 ||X|| ||y||).

    **Returns:** a `SaddlePath`. When X beta = y is not solvable the path ends at the
    least-squares minimiser with the smallest weighted l1 norm (theta_LS if X has full
    column rank), and its last plateau loss is L* > 0.

    **Raises:** `ValueError` for depth < 2, an init violating (A), a depth-2 init that is
    not small (|theta0_i| >= 1), `scale` <= 0 (or >= 1 at depth 2), dimension mismatch;
    `TypeError` if `problem` is not a `dd.LeastSquares`. A path that does not end within
    `max_jumps` warns and has `converged = False`.
    """
    if not isinstance(problem, LeastSquares):
        raise TypeError(
            f"`problem` must be a `dd.LeastSquares(X, y)`, got {type(problem).__name__}."
        )
    layers0 = check_layers(layers0)
    X, y = np.asarray(problem.X, float), np.asarray(problem.y, float)
    if X.shape[1] != layers0.shape[1]:
        raise ValueError(
            f"`layers0` has dim {layers0.shape[1]} but the problem's `X` has {X.shape[1]} "
            "columns: they must match."
        )
    e_minus, e_plus = saddle_thresholds(layers0)
    alpha, time_scale = _time_scale(layers0, scale)
    max_jumps = 10 * X.shape[1] + 10 if max_jumps is None else int(max_jumps)
    times, betas, sign_hist, xis, converged = _recursion(X, y, e_minus, e_plus, max_jumps, tol)
    if not converged:
        warnings.warn(
            f"saddle_path: no end within `max_jumps`={max_jumps} jumps; raise `max_jumps`.",
            RuntimeWarning,
            stacklevel=2,
        )
    betas = np.stack(betas)
    losses = np.sum((betas @ X.T - y) ** 2, axis=1)
    times = np.asarray(times, float)
    return SaddlePath(
        jump_times=jnp.asarray(times),
        rescaled_jump_times=jnp.asarray(times / time_scale),
        saddles=jnp.asarray(betas),
        signs=jnp.asarray(np.stack(sign_hist)),
        plateau_losses=jnp.asarray(losses),
        xi=jnp.asarray(np.stack(xis)),
        thresholds=jnp.asarray(np.stack([e_minus, e_plus])),
        end_point=jnp.asarray(betas[-1]),
        scale=jnp.asarray(alpha),
        time_scale=jnp.asarray(time_scale),
        converged=jnp.asarray(converged),
    )


class Plateaus(eqx.Module):
    """Result of `detect_plateaus`, with P plateaus and P - 1 jumps.

    - `starts`, `ends`: `(P,)` the save times bounding each plateau.
    - `levels`: `(P,)` the loss at the flattest save point of each plateau (the last level is
        the final loss when the curve ends in a drop rather than a plateau).
    - `jump_times`: `(P - 1,)` the first time the loss falls below the midpoint
        (levels[k] + levels[k+1]) / 2, linearly interpolated between saves.
    """

    starts: Float[Array, " P"]
    ends: Float[Array, " P"]
    levels: Float[Array, " P"]
    jump_times: Float[Array, " P1"]


def _flat_runs(t, loss, flat, min_span):
    """Runs of save intervals with |d ln L / d ln t| < flat spanning >= min_span in ln t."""
    x = np.log(t)
    z = np.log(np.maximum(loss, np.finfo(float).tiny))
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.abs(np.diff(z) / np.diff(x))
    rate = np.where(np.isfinite(rate), rate, np.inf)
    runs, start = [], None
    for j, ok in enumerate(np.append(rate < flat, False)):
        if ok and start is None:
            start = j
        elif not ok and start is not None:
            if x[j] - x[start] >= min_span:
                flattest = start + int(np.argmin(rate[start:j]))
                runs.append((start, j, flattest))
            start = None
    return runs


def detect_plateaus(
    traj, *, flat: float = 0.05, min_span: float = 0.005, rtol: float = 1e-3, floor: float = 1e-10
) -> Plateaus:
    """Plateaus and jumps of a loss curve saved at log-spaced (or any increasing) times.

    **Criterion.** A plateau is a run of consecutive saves along which the loss is flat in
    log-log scale, |d ln L / d ln t| < `flat`, lasting at least `min_span` in ln t (0.5 %
    of the elapsed time by default); its level is the loss at its flattest interval.
    Neighbouring plateaus whose levels differ by less than `rtol` (relative) plus
    `floor` times the largest loss (round-off noise once converged) are merged.
    If the curve ends below the last plateau (e.g. the final drop to L = 0), the final
    loss is appended as the last level. Jump k is the first time after plateau k that the
    loss crosses halfway, (levels[k] + levels[k+1]) / 2, linearly interpolated in t: the
    steepest part of the drop for a sigmoid-like jump, defined without derivatives.

    **Arguments:**

    - `traj`: a `dd.Trajectory` (one trajectory, not a batch) or a pair `(ts, loss)`.
    - `flat`, `min_span`, `rtol`, `floor`: the thresholds above.

    **Returns:** a `Plateaus`.

    **Raises:** `ValueError` on a batch or a failed trajectory, or bad save times.
    """
    if isinstance(traj, tuple):
        ts, loss = traj
    else:
        if np.ndim(traj.loss) != 1:
            raise ValueError("`traj` must be one trajectory; index a batch first (traj[i]).")
        if not bool(traj.ok):
            raise ValueError("`traj` is a failed solve (`traj.ok` is False): rerun it first.")
        ts, loss = traj.ts, traj.loss
    t, loss = np.asarray(ts, float), np.asarray(loss, float)
    if t.ndim != 1 or t.shape != loss.shape or t.size < 3 or np.any(np.diff(t) <= 0):
        raise ValueError("`ts` and `loss` must be 1-D, of equal length >= 3, `ts` increasing.")
    keep = t > 0
    t, loss = t[keep], loss[keep]
    runs, atol = [], floor * np.max(np.abs(loss))
    for start, end, flattest in _flat_runs(t, loss, flat, min_span):
        level = loss[flattest]
        prev = runs[-1][2] if runs else None
        if prev is not None and abs(level - prev) <= rtol * max(level, prev) + atol:
            runs[-1] = (runs[-1][0], end, runs[-1][2])
        else:
            runs.append((start, end, level))
    if not runs:
        runs = [(0, 0, loss[0])]
    if loss[-1] < runs[-1][2] * (1 - rtol) - atol and runs[-1][1] < t.size - 1:
        runs.append((t.size - 1, t.size - 1, loss[-1]))
    jumps = []
    for (_, end, a), (start, _, b) in zip(runs, runs[1:]):
        mid = 0.5 * (a + b)
        j = end + int(np.argmax(loss[end:] < mid))
        j = max(j, 1)
        f = (loss[j - 1] - mid) / (loss[j - 1] - loss[j]) if loss[j - 1] != loss[j] else 1.0
        jumps.append(t[j - 1] + f * (t[j] - t[j - 1]))
    return Plateaus(
        starts=jnp.asarray(t[[r[0] for r in runs]]),
        ends=jnp.asarray(t[[r[1] for r in runs]]),
        levels=jnp.asarray([r[2] for r in runs]),
        jump_times=jnp.asarray(jumps),
    )

