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
# # ddln_jax quickstart
# Gradient flow of a depth-4 diagonal network, its mirror geometry, and where it ends.

# %%
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import ddln_jax as dd

jax.config.update("jax_enable_x64", True)  # before any array is made

kx, ky, ku = jr.split(jr.key(0), 3)
X, y = jr.normal(kx, (5, 10)), jr.normal(ky, (5,))
problem = dd.LeastSquares(X, y)
layers0 = dd.init_gaussian(ku, depth=4, dim=10, scale=0.8)
traj = dd.gradient_flow(layers0, problem, t1=500.0, ts=dd.log_times(500.0, 100),
                        stop_when_converged=1e-9)
print("ok:", bool(traj.ok), "steps:", int(traj.num_steps), "final loss:", float(traj.loss[-1]))

# %% [markdown]
# Conservation (Prop 1) and the metric M = J Jᵀ (eq 11) along the path.

# %%
print("conservation residual:", float(dd.conservation_residual(traj)))
print("sigma:", float(dd.sigma(layers0)), "min lambda_min(M(t)):",
      float(dd.lambda_min_along(traj).min()))

# %% [markdown]
# The implicit bias predicts the limit without simulating it.

# %%
ib = dd.implicit_bias(layers0, X, y)
print("prediction vs flow:", float(jnp.max(jnp.abs(ib.theta - traj.theta[-1]))))
assert np.allclose(ib.theta, traj.theta[-1], atol=1e-6)
