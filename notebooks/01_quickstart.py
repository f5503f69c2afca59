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
# # 01 · Quickstart: a deep diagonal network and its gradient flow
# θ = u¹ ⊙ u² ⊙ … ⊙ u^L, trained by gradient flow on the layers, solved exactly by an
# adaptive ODE solver (diffrax). We build a problem, run the flow, and look at the loss and
# at the nodes u^j_i(t).

# %%
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd
from ddln_jax.plotting import plot_nodes, plot_suboptimality, use_style

jax.config.update("jax_enable_x64", True)  # before any array is made
use_style()  # the library's one figure style

# %% [markdown]
# A random least-squares problem L(θ) = ‖Xθ − y‖² (the paper's convention, no ½), and a
# depth-4 network with Gaussian layers.

# %%
kx, ky, ku = jr.split(jr.key(0), 3)
X, y = jr.normal(kx, (10, 5)), jr.normal(ky, (10,))
problem = dd.LeastSquares(X, y)
layers0 = dd.init_gaussian(ku, depth=4, dim=5, scale=1.0)
print("layers0 shape (depth, dim):", layers0.shape, " Assumption (A):",
      bool(dd.check_assumption_a(layers0).all()))

# %% [markdown]
# The flow. `stop_when_converged=gtol` stops once ‖∇L‖∞ ≤ gtol (the later save times hold the
# final state); `traj.ok` reports failures per trajectory instead of raising. The tolerance
# must be reachable: the solver's error (rtol 1e-8) leaves ‖∇L‖∞ ≈ 2e-7 at this problem's
# minimum (n > dim: L* > 0), so 1e-6 stops early and 1e-10 would never trigger (a warning
# says so, and the solve runs to t1).

# %%
ts = dd.log_times(50.0, 300)
traj = dd.gradient_flow(layers0, problem, t1=50.0, ts=ts, stop_when_converged=1e-6)
print("ok:", bool(traj.ok), " steps:", int(traj.num_steps), " stopped at t =",
      float(traj.t_final), "of t1 = 50")
print("final suboptimality L − L*:", float(problem.suboptimality(traj.theta[-1])))

# %%
# log time axes (t = 0 itself cannot be shown on them: the curves start at the first save
# time after 0, 5e-5 here)
later = slice(1, None)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
plot_suboptimality(axes[0], traj.ts[later], problem.suboptimality(traj.theta[later]),
                   label="L = 4", bound=dd.theorem2_bound(layers0, problem, traj.ts[later]))
axes[0].set_xscale("log")
axes[0].set_xlabel("t (log)")
axes[0].legend(fontsize=8)
k = int(dd.minimal_layer(layers0)[0])
plot_nodes(axes[1], traj.ts[later], traj.layers[later], 0, argmin_layer=k)
axes[1].set_xscale("log")
axes[1].set_xlabel("t (log)")
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# Only the layer of smallest |u^j_i(0)| can cross zero (Prop 1): its sign is not preserved,
# all others keep their sign, because (u^j)² − (u^k)² is conserved along the flow.

# %%
print("conservation residual max|Δ((u^j)² − (u^k)²)|:", float(dd.conservation_residual(traj)))
for c in dd.zero_crossings(traj):  # pass `problem` to refine the times to ~1e-8
    print(f"layer {c.layer + 1} crosses zero at coordinate {c.coordinate + 1}, t = {c.time:.6f}")

# %% [markdown]
# The same network trained by gradient descent (any optax optimizer) returns the same
# `Trajectory`; with step η it follows the flow at t = kη up to O(η).

# %%
gd = dd.train(layers0, problem, 1e-3, steps=2000, save_every=100)
flow = dd.gradient_flow(layers0, problem, t1=2.0, ts=gd.ts, rtol=1e-10, atol=1e-12)
print("max |θ_GD − θ_GF| at t = kη:", float(jnp.max(jnp.abs(gd.theta - flow.theta))))
assert np.all(np.isfinite(np.asarray(gd.theta)))
