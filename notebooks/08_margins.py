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
# # 08 · Classification: the max-margin directions of logistic and exponential flows
# On linearly separable data the logistic or exponential loss only tends to 0: ‖θ(t)‖ → ∞ and
# what matters is the direction θ/‖θ‖. For a depth-L network it tends to a KKT point of
# min ‖θ‖_{2/L} s.t. y_n⟨x_n, θ⟩ ≥ 1 (Gunasekar et al. 2018; Lyu & Li 2020): the ℓ1
# max-margin at L = 2 (a linear program), a non-convex quasi-norm for L ≥ 3. Getting there
# takes losses far below 1e-100 (Moroshko et al. 2020), so the flows run in log time
# τ = log(1 + t) with a log-sum-exp loss.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd

jax.config.update("jax_enable_x64", True)

rng = np.random.default_rng(0)
X = rng.standard_normal((6, 5))
y = np.sign(X @ rng.standard_normal(5))
problem = dd.Exponential(X, y)

# %% [markdown]
# ## The predicted directions
# `dd.max_margin` solves the ℓ1 LP at depth 2, enumerates the KKT vertices of the ℓ_{2/L}
# problem at depth ≥ 3 (small problems; multi-start reweighted ℓ1 otherwise) and, with
# `norm="l2"`, the hard-margin SVM (the kernel limit of large initializations).

# %%
svm = dd.max_margin(X, y, depth=2, norm="l2")
for L in (2, 3, 4):
    mm = dd.max_margin(X, y, depth=L)
    print(
        f"L={L}: {mm.method}, {mm.candidates.shape[0]} KKT point(s), margin "
        f"{float(mm.margin):.4f}, theta = {np.round(np.asarray(mm.theta), 3)}"
    )
print("SVM:", np.round(np.asarray(svm.theta), 3))

# %% [markdown]
# ## A long flow in log time
# τ = 1000 is t ≈ e^1000: the loss reaches about e^{-1000}, which `traj.loss` stores as 0;
# `dd.margin_along` keeps log L, the normalised margin, Lyu & Li's smoothed margin (proved
# non-decreasing), the angle to the prediction and the KKT residual.

# %%
ts = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-2, 1000.0, 30)]).at[-1].set(1000.0)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for L in (2, 3):
    u0 = dd.init_yun(0.1, jnp.ones(5), L)
    traj = dd.gradient_flow(u0, problem, t1=1000.0, ts=ts, time="log", rtol=1e-8, atol=1e-10)
    path = dd.margin_along(traj, problem)
    x = -np.asarray(path.log_loss[1:])
    axes[0].loglog(x, np.asarray(path.angle[1:]), label=f"L={L}")
    axes[1].semilogx(x, np.asarray(path.smoothed_margin[1:]) * L ** (L / 2), label=f"L={L}")
    axes[2].loglog(x, np.asarray(path.kkt_residual[1:]), label=f"L={L}")
    print(
        f"L={L}: ok={bool(traj.ok)}, final log L = {float(path.log_loss[-1]):.1f}, angle "
        f"{float(path.angle[-1]):.2e}, KKT residual {float(path.kkt_residual[-1]):.2e}"
    )
axes[0].set(xlabel="log(1/L)", ylabel="angle to dd.max_margin")
axes[1].set(xlabel="log(1/L)", ylabel="smoothed margin × L^{L/2}")
axes[2].set(xlabel="log(1/L)", ylabel="KKT residual")
axes[0].legend()
plt.tight_layout()

# %% [markdown]
# At depth 3 the flow from this init ends at a KKT point that is not the global minimiser:
# the angle to `dd.max_margin`'s `theta` stays large, while the distance to the nearest of
# its `candidates` (every KKT point) goes to 0.

# %%
mm3 = dd.max_margin(X, y, depth=3)
cands = np.asarray(mm3.candidates)
th = np.asarray(traj.theta[-1])
cos = cands @ th / np.linalg.norm(cands, axis=1) / np.linalg.norm(th)
print("angles to each KKT point:", np.round(np.arccos(np.clip(cos, -1, 1)), 6))

# %% [markdown]
# ## Stopping on the loss reached
# `stop_at_loss` stops a flow once L ≤ ε; a run that reaches `t1` first says so
# (`dd.Result.stop_not_reached`, `ok = False`). `stop_when_converged` is a gradient stop,
# not this one.

# %%
u0 = dd.init_yun(0.1, jnp.ones(5), 2)
stop = dd.gradient_flow(u0, problem, t1=1000.0, ts=ts, time="log", stop_at_loss=1e-200)
print(
    "stopped at tau =",
    float(stop.t_final),
    "loss",
    float(stop.loss[-1]),
    dd.result_message(stop.result).split(":")[0],
)

# %% [markdown]
# The (α, ε) phase diagram for depths 2–4 is `python -m experiments.margins`.
