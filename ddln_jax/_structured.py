"""Kvaerno5's Newton systems for the layer flow (eq 2-3) in O(d^3 + d L^3), not O((L d)^3).

The flow's state is (u, xi), u of shape (L, d); its Jacobian is J = -(B + U H V^T) with
H = hess L(theta) (d x d), B block-diagonal over the coordinates (B_i = g_i P_i, the L x L
matrix of products P^{jk}_i = prod_{l != j, k} u^l_i for j != k, 0 on the diagonal) and
U = [diag(excl^1); ...; diag(excl^L); I] ((L+1) d x d), V = [diag(excl^j)]_j padded with zero
rows for xi (excl^j = prod_{k != j} u^k). An implicit stage solves (I - gh J) delta = r, with
A0 = I + gh B (d blocks of L x L, and I for xi) and Woodbury's identity:

    delta = w - Z c,  w = A0^-1 r,  Z = A0^-1 U,  (I + gh H V^T Z) c = gh H V^T w,

where V^T Z = diag(s), s_m = excl_m . (A0_m^-1 excl_m): one d x d system per Jacobian.
`LayerNewton` is diffrax's `VeryChord` (one linearisation per step, reused by every stage)
with this solve; `structured_kvaerno5` puts it into a `diffrax.Kvaerno5`.
"""

from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Scalar


def _products(u):
    """excl^j = prod_{k != j} u^k (L, d) and P^{jk} = prod_{l != j, k} u^l (L, L, d)."""
    L = u.shape[0]
    eye = jnp.eye(L, dtype=bool)
    one = jnp.ones_like(u[0])
    # each product over the layers that are kept, by masking (no division by u)
    keep1 = ~eye  # (j, l): l != j
    excl = jnp.prod(jnp.where(keep1[:, :, None], u[None], one), axis=1)
    keep2 = keep1[:, None, :] & keep1[None, :, :]  # (j, k, l): l != j and l != k
    pair = jnp.prod(jnp.where(keep2[..., None], u[None, None], one), axis=2)
    return excl, jnp.where(eye[..., None], 0.0, pair)


def _block_solve(lu, piv, r):
    """A0_m x_m = r_m for every coordinate m, from the blocks' LU factors."""
    return jax.vmap(lambda a, p, b: jax.scipy.linalg.lu_solve((a, p), b))(lu, piv, r)


class _Factors(eqx.Module):
    """The linear algebra of one Jacobian: A0's blocks, Z's columns, the capacitance LU."""

    blocks: Float[Array, "dim depth depth"]  # LU factors of A0_m, per coordinate
    block_piv: Array
    z: Float[Array, "dim depth"]  # A0_m^-1 excl_m
    excl: Float[Array, "depth dim"]
    ghH: Float[Array, "dim dim"]
    lu: Float[Array, "dim dim"]
    piv: Array

    def solve(self, r):
        ru, rxi = r
        wu = _block_solve(self.blocks, self.block_piv, ru.T)  # (d, L)
        vw = jnp.sum(self.excl.T * wu, axis=1)  # V^T w, (d,)
        c = jax.scipy.linalg.lu_solve((self.lu, self.piv), self.ghH @ vw)
        return (wu - self.z * c[:, None]).T, rxi - c


def layer_factors(u, problem, gh) -> _Factors:
    """The factors of I - gh J at layers `u` (see the module docstring)."""
    excl, pair = _products(u)
    theta = jnp.prod(u, axis=0)
    g = jax.grad(problem.loss)(theta)
    H = jax.hessian(problem.loss)(theta)
    L, d = u.shape
    blocks = jnp.eye(L, dtype=u.dtype)[None] + gh * jnp.moveaxis(pair * g, -1, 0)
    blocks, block_piv = jax.vmap(jax.scipy.linalg.lu_factor)(blocks)
    z = _block_solve(blocks, block_piv, excl.T)  # (d, L)
    s = jnp.sum(excl.T * z, axis=1)
    ghH = gh * H
    lu, piv = jax.scipy.linalg.lu_factor(jnp.eye(d, dtype=u.dtype) + ghH * s[None, :])
    return _Factors(blocks=blocks, block_piv=block_piv, z=z, excl=excl, ghH=ghH, lu=lu, piv=piv)


class _State(eqx.Module):
    factors: _Factors
    diffsize: Scalar
    diffsize_prev: Scalar
    result: optx.RESULTS
    step: Scalar


class LayerNewton(optx.AbstractRootFinder):
    """diffrax's `VeryChord` (the simplified Newton iteration of its implicit Runge-Kutta
    methods, its Jacobian recomputed once per step) for the layer flow of the product
    network, with the Newton system solved by its structure (module docstring). Its
    termination test is `VeryChord`'s. Use through `structured_kvaerno5`."""

    rtol: float
    atol: float
    norm: Callable = optx.max_norm
    kappa: float = 1e-2

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        try:
            return options["init_state"]
        except KeyError:
            pass
        # (stage_index, diagonal, vf, prod, ti, yi_partial, args, control): the arguments
        # diffrax's implicit Runge-Kutta stages pass to their root finder
        _, diagonal, _, prod, _, yi_partial, problem, control = args
        u = yi_partial[0] + diagonal * prod(y, control)[0]
        factors = layer_factors(jax.lax.stop_gradient(u), problem, diagonal * control)
        inf = jnp.array(jnp.inf, u.dtype)
        return _State(
            factors=factors,
            diffsize=inf,
            diffsize_prev=jnp.array(1.0, u.dtype),
            result=optx.RESULTS.successful,
            step=jnp.array(0),
        )

    def step(self, fn, y, args, options, state, tags):
        fx, aux = fn(y, args)
        diff = state.factors.solve(fx)
        new_y = jax.tree_util.tree_map(lambda a, b: a - b, y, diff)
        scale = jax.tree_util.tree_map(lambda x: self.atol + self.rtol * jnp.abs(x), new_y)
        diffsize = self.norm(jax.tree_util.tree_map(jnp.divide, diff, scale))
        finite = jnp.isfinite(diffsize)
        new = _State(
            factors=state.factors,
            diffsize=diffsize,
            diffsize_prev=state.diffsize,
            result=optx.RESULTS.where(finite, optx.RESULTS.successful, optx.RESULTS.singular),
            step=state.step + 1,
        )
        return new_y, new, aux

    def terminate(self, fn, y, args, options, state, tags):
        # as diffrax's VeryChord: at least two iterations, then stop when the update is at
        # round-off, when the contraction rate says the iteration diverges, or when the
        # predicted remaining error is below kappa
        at_least_two = state.step >= 2
        rate = state.diffsize / state.diffsize_prev
        factor = state.diffsize * rate / (1 - rate)
        small = state.diffsize < 10 ** (2 - jnp.finfo(state.diffsize.dtype).precision)
        diverged = ~jnp.isfinite(rate) | (rate > 2)
        converged = (factor > 0) & (factor < self.kappa)
        stop = at_least_two & (small | diverged | converged)
        result = optx.RESULTS.where(
            at_least_two & ~small & (diverged | ~converged),
            optx.RESULTS.nonlinear_divergence,
            optx.RESULTS.successful,
        )
        failed = state.result != optx.RESULTS.successful
        return failed | stop, optx.RESULTS.where(failed, state.result, result)

    def postprocess(self, fn, y, aux, args, options, state, tags, result) -> tuple[Any, Any, dict]:
        return y, aux, {}


def structured_kvaerno5(solver, parameterization, product) -> Any:
    """`solver` with `LayerNewton` as its root finder when it is a `diffrax.Kvaerno5` with
    the default root finder and the flow is the product network's (`parameterization is
    product`); any other solver as it is."""
    if (
        type(solver) is dfx.Kvaerno5
        and parameterization is product
        and solver.root_finder == dfx.Kvaerno5().root_finder
    ):
        return eqx.tree_at(
            lambda s: s.root_finder, solver, dfx.with_stepsize_controller_tols(LayerNewton)()
        )
    return solver
