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
# # 07 · Discrete time: where GD and SGD end, stability, weight decay
# Gradient *flow* ends at `dd.implicit_bias`. Gradient descent with a finite step γ does not:
# every step multiplies the flow's invariants (u^j)² − (u^k)² by 1 − γ²g²∏_{l≠j,k}(u^l)², so
# GD ends at the flow's implicit bias from a *shrunken, effective* initialization.
# `dd.gd_bias` predicts it ahead of time (one gradient flow) or reads it off a run;
# `dd.max_stable_step` predicts the step where that limit turns unstable;
# `dd.weight_decay_limit` says where weight decay ends.

# %%
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
import optax

import ddln_jax as dd
from ddln_jax.plotting import use_style

jax.config.update("jax_enable_x64", True)
use_style()

key = jr.key(0)
X = jr.normal(key, (4, 8)) / 2.0
y = X @ jnp.array([1.5, 0, 0, -1.5, 0, 0, 0, 0])
problem = dd.LeastSquares(X, y)
l1 = dd.min_l1_interpolator(X, y)

# %% [markdown]
# ## The per-step law, checked on one step
# `dd.step_factors` gives the factors; one real GD step on a depth-4 network matches them.

# %%
u = dd.init_gaussian(jr.key(1), 4, 8, 0.8)
g = problem.grad(dd.theta(u))
gamma = 0.05
new = dd.train(u, problem, gamma, steps=1).layers[-1]
f = dd.step_factors(u, g, gamma)
law = (u[0] ** 2 - u[2] ** 2) * f[0, 2]
print(
    "relative error of the law:",
    float(jnp.max(jnp.abs(law - (new[0] ** 2 - new[2] ** 2)) / (new[0] ** 2 + new[2] ** 2))),
)

# %% [markdown]
# ## The threshold, and the limit below it
# Depth 3, Yun init α = 0.5. `max_stable_step` gives γ* where γ λ_max(θ∞(γ)) = 2 for the
# predicted limit θ∞(γ); `gd_bias` predicts θ∞(γ) ahead of time, and from the run.

# %%
u0 = dd.init_yun(0.5, jnp.linspace(0.8, 1.2, 8), 3)
st = dd.max_stable_step(u0, problem)
print(
    f"gamma* = {float(st.step_size):.4f} (2/lambda at the flow's limit: {float(st.flow_step):.4f})"
)
flow = dd.implicit_bias(u0, problem).theta
fracs = np.array([0.2, 0.5, 0.9])
gammas = jnp.asarray(fracs * float(st.step_size))
runs = jax.vmap(lambda g: dd.train(u0, problem, g, steps=30_000, save_every=30_000))(gammas)
for i, gm in enumerate(gammas):
    ahead = dd.gd_bias(u0, problem, float(gm))
    run = dd.gd_bias(
        u0, problem, float(gm), trajectory=jax.tree_util.tree_map(lambda x: x[i], runs)
    )
    th = runs.theta[i, -1]
    print(
        f"gamma/gamma* = {fracs[i]}: |GD - flow bias| = {float(jnp.linalg.norm(th - flow)):.2e}"
        f", |GD - predicted| = {float(jnp.linalg.norm(th - ahead.theta)):.2e}"
        f", |GD - from its run| = {float(jnp.linalg.norm(th - run.theta)):.1e}"
    )

# %% [markdown]
# ## How the effective initialization shrinks
# `log_shrink` = ln Δ_j(eff)/Δ_j(0) per coordinate: the invariants shrink most where the
# gradient was largest (on the support of the solution), which is why GD at large steps
# moves away from the sparse interpolator while SGD's more uniform gains move it less.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for b, name in ((None, "GD"), (2, "SGD, batch 2")):
    res = dd.gd_bias(
        u0, problem, 0.5 * float(st.step_size) * (1 if b is None else 0.5), batch_size=b
    )
    ax.plot(np.asarray(res.log_shrink).min(axis=0), "o-", label=name)
ax.set_xlabel("coordinate i")
ax.set_ylabel("min_j ln Δ_j(eff) / Δ_j(0)")
ax.legend()
plt.show()

# %% [markdown]
# ## Weight decay
# GD with `optax.add_decayed_weights(λ)` ends at a stationary point of
# ‖Xθ − y‖² + (λL/2) Σ|θ_i|^{2/L} with balanced layers; at depth 2 it is the Lasso.

# %%
lam = 0.2
for depth in (2, 3):
    v0 = dd.init_gaussian(jr.key(2), depth, 8, 0.3) + (0.5 if depth > 2 else 0.0)
    wd = dd.weight_decay_limit(v0, problem, lam)
    opt = optax.chain(optax.add_decayed_weights(lam), optax.sgd(0.01))
    gd = dd.train(v0, problem, opt, steps=200_000, save_every=200_000)
    print(
        f"L = {depth}: support {np.flatnonzero(np.asarray(wd.support))}, residual "
        f"{float(wd.residual):.1e}, |GD - predicted| = "
        f"{float(jnp.linalg.norm(gd.theta[-1] - wd.theta)):.1e}"
    )
