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
# # 05 · Conservation laws of any model, by autodiff
# Gradient flow u' = −J_G(u)ᵀ∇L stays tangent to W(u) = span{∇G_i(u)} for every loss. The
# quantities it conserves for *every* loss are counted by the Lie algebra the fields generate
# (Marcotte, Gribonval & Peyré 2023): near a generic u there are exactly D − dim Lie(W)(u)
# independent laws. `dd.count_conservation_laws` computes this with nested `jax.jvp`
# brackets, for any G written in JAX.

# %%
import jax
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd

jax.config.update("jax_enable_x64", True)

# %% [markdown]
# ## A deep diagonal network: the laws of Prop 1
# For θ = u¹ ⊙ … ⊙ u^L the count is d(L − 1): the (u^j_i)² − (u^1_i)². The normal space
# returned (the gradients of the laws at u) is the span of their gradients.

# %%
depth, dim = 4, 3
u = jr.normal(jr.key(0), (depth, dim))
laws = dd.count_conservation_laws(dd.theta, u)
print(f"D = {laws.dimension}, laws = {laws.count} (d(L−1) = {dim * (depth - 1)})")

grads = []
for j in range(1, depth):
    for i in range(dim):
        g = np.zeros((depth, dim))
        g[j, i], g[0, i] = 2 * u[j, i], -2 * u[0, i]
        grads.append(g.ravel())
q, _ = np.linalg.qr(np.array(grads).T)
n = np.asarray(laws.normal)
print("distance between the two subspaces:", np.linalg.norm(q @ q.T - n.T @ n, 2))
print("commuting:", dd.is_commuting(dd.theta, u).commuting)

# %% [markdown]
# ## Other models
# A two-layer linear network U Vᵀ keeps the r(r + 1)/2 entries of UᵀU − VᵀV and is not
# commuting: its brackets add directions (bracket depth 1). A two-layer ReLU network, on a
# region of fixed activations, is G = (v_j u_j)_j: one law ‖u_j‖² − v_j² per neuron.


# %%
def uv(params):
    U, V = params
    return (U @ V.T).ravel()


def relu_region(params):
    w, v = params
    return (v[:, None] * w).ravel()


k1, k2, k3, k4 = jr.split(jr.key(1), 4)
models = {
    "DDLN L=4, d=3": (dd.theta, u),
    "tied u^3": (dd.tied(3), jr.normal(k1, (4,))),
    "U V^T, r=2": (uv, (jr.normal(k2, (4, 2)), jr.normal(k3, (3, 2)))),
    "ReLU, 3 neurons": (relu_region, (jr.normal(k4, (3, 4)), jr.normal(k1, (3,)))),
}
results = {}
for name, (G, point) in models.items():
    lie = dd.lie_rank(G, point)
    com = dd.is_commuting(G, point)
    results[name] = lie
    print(f"{name:16s} D={lie.dimension:3d} laws={lie.dimension - lie.rank:2d} "
          f"bracket depth={lie.bracket_depth} commuting={com.commuting} gap={lie.gap:.1e}")

# %% [markdown]
# ## The gap behind each rank
# The rank is read off the singular values of the stacked, normalised field values: the
# kept ones are O(1), the dropped ones round-off (or exactly 0).

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, lie in results.items():
    s = np.asarray(lie.singular_values)
    ax.semilogy(np.arange(1, s.size + 1), np.maximum(s / s[0], 1e-20), "o-", ms=3, label=name)
ax.axhline(lie.rtol, color="k", ls="--", lw=0.8, label="rtol")
ax.set_xlabel("index $i$")
ax.set_ylabel("$s_i / s_1$")
ax.legend(fontsize=7)
plt.show()
