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
# # 03 · Implicit bias: mirror potentials and the ℓ1 ↔ ℓ2 transition
# The mirror flow θ' = −M(θ)∇L means ∇Q(θ(t)) = ξ(t) = −∫∇L for a convex potential Q that
# depends on the init. On an underdetermined problem the flow therefore ends at
# θ∞ = argmin_{Xθ = y} D_Q(θ, θ0): `dd.implicit_bias` computes it without simulating the flow.

# %%
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd
from ddln_jax.plotting import use_style

jax.config.update("jax_enable_x64", True)
use_style()  # the library's one figure style

# %% [markdown]
# ## Mirror potentials for depth 2..4
# One coordinate, the Yun init u^1 = 0, u^j = α (j ≥ 2) — Corollary 1's setting. Depth 2 has
# the hyperbolic-entropy closed form; deeper maps are computed numerically
# (`dd.MirrorMap.from_layers`, any depth, any (A) init) and have a bounded dual domain.

# %%
alpha = 0.5
thetas = jnp.linspace(-2.0, 2.0, 201)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for depth in (2, 3, 4):
    layers0 = dd.init_yun(alpha, jnp.ones(1), depth)
    mm = dd.MirrorMap.from_layers(layers0)
    q = jax.vmap(lambda t: mm.q(t[None]))(thetas)
    grad = jax.vmap(lambda t: mm.grad_q(t[None])[0])(thetas)
    axes[0].plot(thetas, q, label=f"L = {depth}")
    axes[1].plot(thetas, grad, label=f"L = {depth}")
axes[0].set_title(f"Q(θ) (one coordinate, α = {alpha})")
axes[0].set_ylabel("Q(θ)")
axes[1].set_title("∇Q(θ) = ξ")
axes[1].set_ylabel("ξ = ∇Q(θ)")
for ax in axes:
    ax.set_xlabel("θ")
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Depth 2 against the closed form (eq 16): ∇Q(θ) = ½ arcsinh(2θ/α²) for this init.

# %%
mm2 = dd.MirrorMap.from_layers(dd.init_yun(alpha, jnp.ones(1), 2))
closed = 0.5 * jnp.arcsinh(2 * thetas / alpha**2)
print("max |numerical − closed form|:",
      float(jnp.max(jnp.abs(jax.vmap(lambda t: mm2.grad_q(t[None])[0])(thetas) - closed))))

# %% [markdown]
# ## The ℓ1 ↔ ℓ2 transition
# A sparse regression (n = 8 < d = 16, 2-sparse truth). Small α: the limit is close to the
# minimum-ℓ1 interpolator (sparse recovery); large α: to the minimum-ℓ2 one. Deeper networks
# reach the ℓ1 regime at larger α.

# %%
n, d = 8, 16
kx, = jr.split(jr.key(0), 1)
X = jr.normal(kx, (n, d)) / jnp.sqrt(n)
truth = jnp.zeros(d).at[jnp.array([2, 9])].set(jnp.array([1.5, -1.5]))
y = X @ truth
l1 = dd.min_l1_interpolator(X, y)
l2 = dd.min_l2_interpolator(X, y)
alphas = np.logspace(-1.5, 1, 5)
fig, ax = plt.subplots(figsize=(6, 3.6))
for depth in (2, 3):
    d1, d2 = [], []
    for a in alphas:
        ib = dd.implicit_bias(dd.init_yun(float(a), jnp.ones(d), depth), X, y)
        d1.append(float(jnp.linalg.norm(ib.theta - l1)))
        d2.append(float(jnp.linalg.norm(ib.theta - l2)))
    (line,) = ax.loglog(alphas, d1, "o-", label=f"L = {depth}: ‖θ∞ − θ_ℓ1‖")
    ax.loglog(alphas, d2, "s--", color=line.get_color(), label=f"L = {depth}: ‖θ∞ − θ_ℓ2‖")
ax.set_xlabel("α")
ax.set_ylabel("distance of the predicted limit θ∞")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# The prediction agrees with a long gradient flow from the same init.

# %%
layers0 = dd.init_yun(0.3, jnp.ones(d), 3)
ib = dd.implicit_bias(layers0, X, y)
flow = dd.gradient_flow(layers0, dd.LeastSquares(X, y), t1=1e4, ts=jnp.array([0.0, 1e4]),
                        stop_when_converged=1e-12, rtol=1e-10, atol=1e-12)
print("converged:", bool(ib.converged), " |θ∞(predicted) − θ(flow)|:",
      float(jnp.max(jnp.abs(ib.theta - flow.theta[-1]))))

# %% [markdown]
# Stochasticity changes the bias too: `dd.stochastic_flow` (SGD's minibatch noise as an SDE)
# ends closer to min-ℓ1 than the flow from the same init — see
# `python -m experiments.stochastic_bias`.
