"""`SweepResult`: a sweep's rows in grid order, assembled from its chunks (complete or not),
and its conversions (pandas, xarray, netCDF)."""

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import numpy as np
from jaxtyping import Bool, Float, Int

from ._rows import DERIVED, RAW
from ._store import MANIFEST, Store, release_free_memory

# what each shared axis is, for the errors of `SweepResult.__check_init__`
_AXES = {
    "B": "every per-row field holds one row per grid point (select rows of all fields at once)",
    "T": "`theta` and `loss` hold one column per save time in `ts`",
    "dim": "`theta`, `theta_final` and `layers0` share the coordinate axis",
}
_SCALARS = ["depth", "scale", "seed", "done", "num_steps", "ok", "result", "t_final",
            "implicit", "sigma", "rate", "theorem2_rate", "chunk"]


class SweepResult(eqx.Module):
    """Labelled results of `sweep` or `load_sweep`, one row per grid point (order: depth, then
    scale, then seed). Arrays are numpy (others are converted); B is the number of grid
    points, T the number of save times, `dim` the number of coordinates.

    **Fields:**

    - `depth`, `scale`, `seed`: the grid point of each row.
    - `ts`: the save times.
    - `theta`, `loss`: theta and the loss at `ts`; `theta_final`: theta at the last of them.
    - `num_steps`, `ok`, `result`, `t_final`: as in `Trajectory`.
    - `implicit`: finished by the Kvaerno5 phase (stiff members).
    - `sigma`: sigma of the initial layers (eq 13); `rate`: the empirical exponential rate
        (least squares only); `theorem2_rate`: 2 sigma mu.
    - `layers0`: the initial layers, `max(depths)` rows each (rows past a grid point's depth
        are NaN: use `initial_layers(b)`).
    - `chunk`: the work unit of each row; `done`: False where the row is not computed yet
        (its values are NaN / -1 / False).
    - `efficiency`: per chunk, the lockstep efficiency (slot-steps / slot-iterations) of the
        stepping recorded with it (from the previous chunk written by its process to it);
        `overall_efficiency`: the same over all chunks (a resumed run's also counts the
        stepping of the trajectories in flight at the interrupt, done again).
    - `info`: the sweep's settings (times, tolerances, init, chunk size) and the versions
        that ran it; from `sweep` also this call's host-loop counters: `host_syncs`,
        `bytes_to_host`, `rows_to_host` (gathered rows, buffer padding included),
        `retirements`, `iterations`, `stepping_calls` and
        `slot_array_sizes`.

    **Raises:** `ValueError` when built with fields whose dtypes or axes disagree (one row
    per grid point in every per-row field, `T = len(ts)`, one `efficiency` per chunk).
    """

    depth: Int[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    scale: Float[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    seed: Int[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    ts: Float[np.ndarray, " T"] = eqx.field(converter=np.asarray)
    theta: Float[np.ndarray, "B T dim"] = eqx.field(converter=np.asarray)
    loss: Float[np.ndarray, "B T"] = eqx.field(converter=np.asarray)
    theta_final: Float[np.ndarray, "B dim"] = eqx.field(converter=np.asarray)
    num_steps: Int[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    ok: Bool[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    result: Int[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    t_final: Float[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    implicit: Bool[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    sigma: Float[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    rate: Float[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    theorem2_rate: Float[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    layers0: Float[np.ndarray, "B max_depth dim"] = eqx.field(converter=np.asarray)
    chunk: Int[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    done: Bool[np.ndarray, " B"] = eqx.field(converter=np.asarray)
    efficiency: Float[np.ndarray, " chunks"] = eqx.field(converter=np.asarray)
    overall_efficiency: float
    info: dict

    def __check_init__(self):
        first = {}  # axis name -> (field, size) where it was first seen
        for f in dataclasses.fields(self):
            if not hasattr(f.type, "dim_str"):
                continue
            x, axes = getattr(self, f.name), f.type.dim_str.split()
            if not isinstance(x, f.type):
                kind = f.type.dtype.__name__.lower()
                raise ValueError(
                    f"`SweepResult.{f.name}` must be a {len(axes)}-D {kind} array "
                    f"({', '.join(axes)}), got dtype {x.dtype}, shape {x.shape}: convert it "
                    f"(`np.asarray(x, {kind})`) or reshape it (B grid points, T = len(ts), dim "
                    "coordinates).")
            for axis, n in zip(axes, x.shape):
                other, m = first.setdefault(axis, (f.name, n))
                if n != m:
                    raise ValueError(
                        f"`SweepResult.{f.name}` has {axis} = {n} (shape {x.shape}) but "
                        f"`{other}` has {axis} = {m}: {_AXES.get(axis, 'make them agree')}.")
        if self.depth.size and self.layers0.shape[1] < self.depth.max():
            raise ValueError(
                f"`SweepResult.layers0` has {self.layers0.shape[1]} layer rows but `depth` "
                f"goes up to {self.depth.max()}: pad it with NaN rows to `max(depth)` rows.")
        if self.chunk.size and self.chunk.max() >= self.efficiency.size:
            raise ValueError(
                f"`SweepResult.chunk` holds chunk {self.chunk.max()} but `efficiency` has "
                f"{self.efficiency.size} entries: it needs one per chunk, indexed by `chunk`.")

    def initial_layers(self, b: int) -> Float[np.ndarray, "depth dim"]:
        """The initial layers of grid point `b` (its first `depth[b]` rows of `layers0`)."""
        return self.layers0[b, : int(self.depth[b])]

    def to_dict(self) -> dict:
        """The arrays by name (`info` left out)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "info"}

    def to_dataframe(self):
        """One row per grid point with the scalar columns (needs pandas)."""
        pd = _optional("pandas")
        df = pd.DataFrame({c: np.asarray(getattr(self, c)) for c in _SCALARS})
        df["final_loss"] = np.asarray(self.loss)[:, -1]
        return df

    def to_xarray(self):
        """An `xarray.Dataset` with dimensions depth, scale, seed, time, coordinate (and layer
        for `layers0`); `attrs`: the sweep's settings and versions."""
        xr = _optional("xarray")
        depths, scales, seeds = (list(dict.fromkeys(a.tolist()))
                                 for a in (self.depth, self.scale, self.seed))
        grid = (len(depths), len(scales), len(seeds))
        dims = ("depth", "scale", "seed")
        data = {}
        for name, extra in [("theta", ("time", "coordinate")), ("loss", ("time",)),
                            ("theta_final", ("coordinate",)), ("layers0", ("layer", "coordinate"))]:
            a = np.asarray(getattr(self, name))
            data[name] = (dims + extra, a.reshape(grid + a.shape[1:]))
        for name in _SCALARS[3:]:
            data[name] = (dims, np.asarray(getattr(self, name)).reshape(grid))
        attrs = {k: (v if isinstance(v, (int, float, str)) else str(v))
                 for k, v in self.info.items() if v is not None}
        attrs["overall_efficiency"] = float(self.overall_efficiency)
        return xr.Dataset(data, coords={"depth": depths, "scale": scales, "seed": seeds,
                                        "time": np.asarray(self.ts)}, attrs=attrs)

    def to_netcdf(self, path) -> str:
        """Write `to_xarray()` to `path` as netCDF (or as zarr when xarray has no netCDF
        backend). Returns the path written."""
        ds = self.to_xarray()
        for name, v in ds.data_vars.items():  # netCDF3 has no booleans
            if v.dtype == bool:
                ds[name] = v.astype(np.int8)
        try:
            ds.to_netcdf(path)
        except ValueError as e:
            if "engine" not in str(e).lower():
                raise
            _optional("zarr")
            ds.to_zarr(path, mode="w")
        return str(path)


def _optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"this needs `{name}`: pip install ddln_jax[xarray]") from e


def _empty(spec: dict) -> tuple[dict, dict]:
    """Uninitialised result arrays (`np.empty`: the pages of a large one are not touched,
    so not resident, until rows are written into them) and each field's fill value for the
    rows no chunk holds."""
    B = len(spec["depths"]) * len(spec["scales"]) * len(spec["seeds"])
    T, d, Lmax = len(spec["ts"]), spec["dim"], max(spec["depths"])
    fill = dict(theta=np.nan, num_steps=-1, ok=False, result=-1, t_final=np.nan,
                implicit=False, loss=np.nan, sigma=np.nan, rate=np.nan, theorem2_rate=np.nan,
                layers0=np.nan)
    shapes = dict(theta=(B, T, d), loss=(B, T), layers0=(B, Lmax, d))
    rows = {f: np.empty(shapes.get(f, (B,)), np.asarray(v).dtype) for f, v in fill.items()}
    rows["index"] = np.arange(B)
    return rows, fill


def _merge(spec: dict, parts, consume: bool = False) -> tuple[dict, Bool[np.ndarray, " B"]]:
    """The rows of `parts` in grid order, filled one field of one chunk at a time (chunk
    files are read lazily); an exact duplicate is dropped, a conflicting one raises.
    `consume` (parts held in memory, not needed afterwards): each field of a part is
    dropped from it once copied, so the result is not held twice."""
    rows, fill = _empty(spec)
    source = np.full(len(rows["index"]), -1)
    for k, (name, part) in enumerate(parts):
        idx = np.asarray(part["index"])
        dup = np.flatnonzero(source[idx] >= 0)
        for f in RAW + DERIVED:
            values = part.pop(f) if consume and f != "index" else part[f]
            for j in dup:
                if not np.array_equal(rows[f][idx[j]], values[j], equal_nan=True):
                    raise ValueError(
                        f"conflicting results for grid point {idx[j]} in "
                        f"{parts[source[idx[j]]][0]!r} and {name!r}: the folder mixes "
                        "different runs; delete one of the files.")
            rows[f][idx] = values
            del values
        source[idx] = k
        if consume:
            release_free_memory()  # the part's arrays, freed: the result does not double
    missing = source < 0
    if missing.any():
        for f, v in fill.items():
            rows[f][missing] = v
    return rows, ~missing


def assemble(manifest: dict, parts, consume: bool = False) -> SweepResult:
    """The `SweepResult` of a sweep's manifest and chunks (missing rows marked); `consume`:
    see `_merge`."""
    spec = manifest["spec"]
    rows, done = _merge(spec, parts, consume)
    grid = [(L, s, r) for L in spec["depths"] for s in spec["scales"] for r in spec["seeds"]]
    depth, scale, seed = (np.array([g[i] for g in grid]) for i in range(3))
    order, size = np.asarray(manifest["order"]), int(spec["chunk"])
    chunk = np.empty(len(order), int)
    chunk[order] = np.arange(len(order)) // size
    # the stepping's slot-steps and slot-iterations recorded with each chunk (once per chunk)
    spent = np.zeros((-(-len(order) // size), 2))
    for c, part in {int(chunk[p["index"][0]]): p for _, p in reversed(parts)}.items():
        spent[c] = part.get("work", 0), part.get("slot_iters", 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(spent[:, 1] > 0, spent[:, 0] / spent[:, 1], np.nan)
        total = spent.sum(axis=0)
        overall = float(total[0] / total[1]) if total[1] else float("nan")
    layers0 = np.where(np.arange(rows["layers0"].shape[1])[None, :, None] < depth[:, None, None],
                       rows["layers0"], np.nan)
    info = {k: spec[k] for k in ("t0", "t1", "init", "rtol", "atol", "gtol", "chunk",
                                 "explicit_max_steps", "max_steps")}
    info.update(manifest.get("versions", {}))
    return SweepResult(
        depth=depth, scale=scale, seed=seed, ts=np.asarray(spec["ts"]), theta=rows["theta"],
        loss=rows["loss"], theta_final=rows["theta"][:, -1], num_steps=rows["num_steps"],
        ok=rows["ok"], result=rows["result"], t_final=rows["t_final"],
        implicit=rows["implicit"], sigma=rows["sigma"], rate=rows["rate"],
        theorem2_rate=rows["theorem2_rate"], layers0=layers0, chunk=chunk, done=done,
        efficiency=eff, overall_efficiency=overall, info=info)


def load_sweep(out) -> SweepResult:
    """The results in the sweep folder `out` (written by `sweep(..., out=out)` from any
    number of processes), complete or not: rows not computed yet have `done` False and NaN
    values (-1 for integers, False for flags).

    A folder that holds no sweep itself but exactly one in a subfolder (the sweep CLI's
    `--out` keeps it in `OUT/chunks`) is read from there.

    **Raises:** `FileNotFoundError` when `out` holds no sweep (naming the subfolders that
    do, if several); `ValueError` when two files hold different results for one grid point
    (exact duplicates are fine)."""
    folder = Path(out)
    if not (folder / MANIFEST).exists():
        inner = (sorted(p.parent for p in folder.glob(f"*/{MANIFEST}"))
                 if folder.is_dir() else [])
        if len(inner) != 1:
            where = (f"; its subfolders {[str(p) for p in inner]} hold one each: pass one"
                     if inner else "")
            raise FileNotFoundError(f"no sweep in `out`={str(out)!r} (no {MANIFEST}){where}.")
        folder = inner[0]
    return assemble_from(json.loads((folder / MANIFEST).read_text()), Store(folder, "load", 0.0))


def assemble_from(manifest: dict, store: Store, tries: int = 5,
                  consume: bool = False) -> SweepResult:
    """`assemble` of the chunks in `store`, listed again if a partial chunk file listed
    disappears while it is read (its chunk completed meanwhile, in another process).
    `consume`: an in-memory store's chunks are emptied field by field as they are merged
    (the store is not usable afterwards)."""
    for k in range(tries):
        try:
            return assemble(manifest, store.parts(), consume and store.path is None)
        except FileNotFoundError:
            if k == tries - 1:
                raise
