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
# # 04 · Sweeps over depth × init scale × seed
# `dd.sweep` runs a whole grid of gradient flows in compiled, vmapped calls: a fixed number
# of slots each step one trajectory with its own adaptive step size; a finished trajectory is
# retired and its slot refilled with the next grid point, so the batch never waits for its
# slowest member. Depths are padded with frozen unit layers so one compilation serves every
# depth, stiff members continue with an implicit solver, converged flows stop early
# (`stop_when_converged`). With `out=` finished trajectories are written to disk in chunks
# as they finish, and a rerun resumes.

# %%
import tempfile

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dd
from ddln_jax.plotting import heatmap, use_style

jax.config.update("jax_enable_x64", True)
use_style()  # the library's one figure style

kx, ky = jr.split(jr.key(2024))
problem = dd.LeastSquares(jr.normal(kx, (10, 6)), jr.normal(ky, (10,)))
depths, scales, seeds = (2, 3, 4), (0.5, 1.0), 4
t1 = 50.0
ts = jnp.linspace(0.0, t1, 100)
out = tempfile.mkdtemp()
res = dd.sweep(problem, depths=depths, scales=scales, seeds=seeds, t1=t1, ts=ts,
               stop_when_converged=1e-8, out=out, progress=False, key=jr.key(0))
print("trajectories:", len(res.depth), " all ok:", bool(res.ok.all()),
      " lockstep efficiency per chunk:", np.round(res.efficiency, 2),
      " steps per trajectory:", res.num_steps.min(), "..", res.num_steps.max())

# %% [markdown]
# Results are labelled: one row per grid point in `to_dataframe()` (pandas), arrays in
# `to_dict()`.

# %%
df = res.to_dataframe()
df.head()

# %% [markdown]
# A phase diagram: the median suboptimality reached at t = 10 per (depth, scale).

# %%
sub = np.asarray(problem.suboptimality(jnp.asarray(res.theta)))  # (points, T)
i10 = int(np.searchsorted(np.asarray(ts), 10.0))
table = np.zeros((len(depths), len(scales)))
for i, L in enumerate(depths):
    for j, s in enumerate(scales):
        rows = (res.depth == L) & np.isclose(res.scale, s)
        table[i, j] = np.median(sub[rows, i10])
fig, ax = plt.subplots(figsize=(5, 3.5))
heatmap(ax, np.maximum(table, 1e-30), scales, depths, title="median L − L* at t = 10",
        label="median L − L*")
ax.set_xlabel("init scale")
ax.set_ylabel("depth")
plt.show()

# %% [markdown]
# Rerunning with the same `out` resumes: finished chunks are read back, nothing is recomputed.

# %%
again = dd.sweep(problem, depths=depths, scales=scales, seeds=seeds, t1=t1, ts=ts,
                 stop_when_converged=1e-8, out=out, progress=False, key=jr.key(0))
print("identical after resume:", bool(np.array_equal(again.theta, res.theta)))
loaded = dd.load_sweep(out)  # the folder alone, e.g. in another session
print("loaded from the folder:",
      bool(loaded.done.all() and np.array_equal(loaded.theta, res.theta)))

# %% [markdown]
# ## On a GPU, or several
# Install the CUDA wheels (`pip install -e ".[cuda]"`, i.e. `jax[cuda12]`) and run the same
# call. Raise `max_slots` and `memory_budget` to fill a large card (thousands of slots at
# once). Several GPUs or hosts: start one process per GPU, each running the same sweep with
# the same `out` on a shared filesystem; they share the grid's chunks through lease files in
# `out` (nothing computed twice, a dead process's chunks taken over) — see "Several GPUs and
# several hosts" in the sweeps guide (`docs/guides/sweeps.md`). The command-line version with a phase diagram:
#
# ```
# python -m experiments.sweep --full --seeds 256 --out results/sweep
# ```
print("devices:", jax.devices())
