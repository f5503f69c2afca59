# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Saddle-to-saddle dynamics from small initializations
# From u(0) = α ū with α → 0, gradient flow jumps between saddles of the loss (Pesme &
# Flammarion 2023 for depth 2; README: saddle-to-saddle for every depth). Per coordinate the mirror
# coordinate ξ_i = ∇Q_i(θ_i) moves in a straight line, ξ' = −∇L(β_k), while θ sits at a saddle
# β_k; θ_i leaves 0 when ξ_i reaches a threshold e_i^± (∝ α^{−(L−2)} for L ≥ 3, ≈ ln(1/α) for
# L = 2). `dd.saddle_path` runs that recursion; `dd.detect_plateaus` reads jumps off a
# simulated loss curve.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy.integrate import solve_ivp

import ddln_jax as dd

jax.config.update("jax_enable_x64", True)

rng = np.random.default_rng(0)
X, y = rng.standard_normal((4, 8)), rng.standard_normal(4)
problem = dd.LeastSquares(X, y)

# %% [markdown]
# ## The predicted path, depth 3, a non-uniform init shape
# `init_yun` with a non-constant ū: thresholds e_i ∝ |ū_i|^{−1} at depth 3, so the end point
# is a *weighted* ℓ1 interpolator, not the plain min-ℓ1 one.

# %%
alpha, depth = 1e-3, 3
ubar = jnp.asarray(rng.uniform(0.5, 2.0, 8))
layers0 = dd.init_yun(alpha, ubar, depth)
path = dd.saddle_path(layers0, problem)
print("rescaled jump times:", np.round(np.asarray(path.rescaled_jump_times), 4))
print("plateau losses:     ", np.round(np.asarray(path.plateau_losses), 5))
print("active signs per plateau:\n", np.asarray(path.signs))
print("thresholds e+ · α^(L-2):", np.round(np.asarray(path.thresholds[1]) * alpha, 4))

# %% [markdown]
# ## Against a long flow of the layers
# LSODA (stiff on the plateaus) in float64; the flow's jumps from `dd.detect_plateaus`.

# %%
def layer_flow(layers0, ts):
    L, d = layers0.shape

    def rhs(t, f):
        u = f.reshape(L, d)
        g = 2 * X.T @ (X @ np.prod(u, 0) - y)
        return np.stack([-np.prod(np.delete(u, j, 0), 0) * g for j in range(L)]).ravel()

    sol = solve_ivp(rhs, (0, ts[-1]), np.ravel(layers0), t_eval=ts, method="LSODA",
                    rtol=1e-10, atol=1e-13 * alpha)
    return np.prod(sol.y.T.reshape(-1, L, d), axis=1)


t_end = 3 * float(path.jump_times[-1])
ts = np.concatenate([[0.0], np.geomspace(t_end * 1e-8, t_end, 3000)])
theta = layer_flow(layers0, ts)
loss = np.sum((theta @ X.T - y) ** 2, axis=1)
found = dd.detect_plateaus((ts, loss))
print("predicted jumps:", np.round(np.asarray(path.jump_times), 1))
print("flow jumps:     ", np.round(np.asarray(found.jump_times), 1))

fig, ax = plt.subplots(figsize=(6, 3.6))
ax.loglog(ts[1:] * alpha, loss[1:], label="flow")
for t in np.asarray(path.rescaled_jump_times):
    ax.axvline(t, ls=":", color="k", lw=0.8)
ax.set(xlabel="t · α (rescaled time, L = 3)", ylabel="loss", title="dotted: predicted jumps")
ax.legend()
plt.show()

# %% [markdown]
# ## Where it ends
# The path ends at the weighted-ℓ1 interpolator; the finite-α implicit bias (dual Newton) and
# the flow are close to it. The plain min-ℓ1 interpolator coincides with it only when the
# weights leave the linear program's optimal vertex unchanged (as happens for this draw).

# %%
bias = dd.implicit_bias(layers0, X, y)
l1 = dd.min_l1_interpolator(X, y)
print("|end point − implicit bias|:", float(jnp.max(jnp.abs(path.end_point - bias.theta))))
print("|end point − flow at t_end|:", float(np.max(np.abs(np.asarray(path.end_point) - theta[-1]))))
print("|end point − min-ℓ1|:       ", float(jnp.max(jnp.abs(path.end_point - l1))))
