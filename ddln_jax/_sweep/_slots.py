"""Slot arrays: the layout of the sweep's batched solver state (one trajectory per slot),
their creation, selection and placement on devices. No maths here (see `_fused`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

ACTIVE, DONE, CONVERGED, BUDGET, FAILED, EMPTY, STIFF = 0, 1, 2, 3, 4, 5, 6
# Slot arrays hold a multiple of this many slots (XLA's CPU kernels treat the
# last few columns of a vectorised loop differently; with whole blocks and the ordered sums
# of `_fused`, a trajectory's bits depend neither on its slot nor on the array size).
SLOT_QUANTUM = 8


class Slots(eqx.Module):
    """The state of every slot. The solver state is stored slot-last (the slot axis is the
    contiguous one, which XLA vectorises best); bookkeeping is slot-first."""

    u: Float[Array, "Lmax d S"]  # layers (padded ones frozen at 1)
    xi: Float[Array, "d S"]
    fu: Float[Array, "Lmax d S"]  # the derivative at (t, u) (first-same-as-last)
    fxi: Float[Array, "d S"]
    mask: Float[Array, "Lmax 1 S"]  # 1 on real layers
    t: Float[Array, " S"]
    dt: Float[Array, " S"]  # the proposed next step
    steps: Int[Array, " S"]  # attempted steps
    save_i: Int[Array, " S"]  # the next save index
    status: Int[Array, " S"]
    saves: Float[Array, "S T d"]  # theta at the save times
    gid: Int[Array, " S"]  # grid index, -1 when empty
    stiff_run: Int[Array, " S"]  # accepted steps in a row at the stability boundary
    problem: PyTree  # batched problem (leading axis S), or None when shared
    carry: PyTree = None  # the stepping method's own per-slot state (slot axis last)

    def __check_init__(self):
        S, (L, d) = self.t.shape[0], self.u.shape[:2]
        want = {"u": (L, d, S), "xi": (d, S), "fu": (L, d, S), "fxi": (d, S),
                "mask": (L, 1, S), "saves": (S, self.saves.shape[1], d)}
        for f in ("dt", "steps", "save_i", "status", "gid", "stiff_run"):
            want[f] = (S,)
        for f, shape in want.items():
            if getattr(self, f).shape != shape:
                raise ValueError(f"`Slots.{f}` has shape {getattr(self, f).shape}, expected "
                                 f"{shape} (S = {S} slots, Lmax = {L}, d = {d}).")


_SLOT_LAST = ("u", "xi", "fu", "fxi", "mask")
# pytree fields, and their slot axis
_TREES = {"problem": 0, "carry": -1}


def slot_axis(name: str) -> int:
    return -1 if name in _SLOT_LAST else 0


def _pick(cond, a, b, axis=0):
    """`where(cond, a, b)` with `cond` (S,) along the slot axis `axis` (0 or -1) of a, b."""
    if axis == 0:
        return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)
    return jnp.where(cond, a, b)


def _pick_slots(cond, new: Slots, old: Slots) -> Slots:
    fields = {f: _pick(cond, getattr(new, f), getattr(old, f), slot_axis(f))
              for f in Slots.__dataclass_fields__ if f not in _TREES}
    trees = {f: jax.tree_util.tree_map(lambda a, b, ax=ax: _pick(cond, a, b, ax),
                                       getattr(new, f), getattr(old, f))
             for f, ax in _TREES.items()}
    return Slots(**fields, **trees)


def _theta(u):
    """theta of slot-last layers: (L, d, S) -> (S, d), multiplied in layer order."""
    th = u[0]
    for j in range(1, u.shape[0]):
        th = th * u[j]
    return th.T


def empty_slots(num: int, max_depth: int, dim: int, num_saves: int, dtype, problem_rows=None):
    # built on the host and put (`jnp.zeros` and the like compile a program per shape)
    z = np.zeros
    fields = dict(
        u=np.ones((max_depth, dim, num), dtype), xi=z((dim, num), dtype),
        fu=z((max_depth, dim, num), dtype), fxi=z((dim, num), dtype),
        mask=z((max_depth, 1, num), dtype), t=z((num,), dtype), dt=np.ones((num,), dtype),
        steps=z((num,), np.int32), save_i=z((num,), np.int32),
        status=np.full((num,), EMPTY, np.int32), saves=z((num, num_saves, dim), dtype),
        gid=np.full((num,), -1, np.int32), stiff_run=z((num,), np.int32))
    return Slots(**jax.device_put(fields), problem=problem_rows)


@jax.jit
def _gather(slots: Slots, idx) -> Slots:
    fields = {f: jnp.take(getattr(slots, f), idx, axis=slot_axis(f))
              for f in Slots.__dataclass_fields__ if f not in _TREES}
    trees = {f: jax.tree_util.tree_map(lambda x, ax=ax: jnp.take(x, idx, axis=ax),
                                       getattr(slots, f))
             for f, ax in _TREES.items()}
    return Slots(**fields, **trees)


def platform(device) -> str:
    """The platform ("cpu", "gpu", ...) of `device` (None: JAX's default device)."""
    return jax.default_backend() if device is None else device.platform


def _placer(device):
    """A function putting arrays, pytrees and `Slots` on `device` (committed: the jitted
    stepping then runs there), or leaving them where they are (`device` None)."""
    if device is None:
        return lambda x: x

    def put(tree):  # array leaves only (a problem may hold callables, python floats)
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(x, device) if isinstance(x, jax.Array | np.ndarray) else x,
            tree)

    return put


@jax.jit
def take_rows(slots: Slots, idx) -> dict:
    """The slots `idx` (a fixed-size index buffer) as slot-first arrays, gathered on the
    device: only these rows cross to the host."""
    return {
        "saves": slots.saves[idx], "u": jnp.moveaxis(jnp.take(slots.u, idx, axis=-1), -1, 0),
        "xi": jnp.take(slots.xi, idx, axis=-1).T, "t": slots.t[idx], "steps": slots.steps[idx],
        "status": slots.status[idx], "save_i": slots.save_i[idx],
    }
