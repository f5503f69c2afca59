"""`SweepResult`: a sweep's rows in grid order, assembled from its chunks (complete or not),
and its conversions (pandas, xarray, netCDF)."""

import json
from pathlib import Path

import equinox as eqx
import numpy as np

from ._rows import DERIVED, RAW
from ._store import MANIFEST, Store

_SCALARS = ["depth", "scale", "seed", "done", "num_steps", "ok", "result", "t_final",
            "implicit", "sigma", "rate", "theorem2_rate", "chunk"]


class SweepResult(eqx.Module):
    """Labelled results of `sweep` or `load_sweep`, one row per grid point (order: depth, then
    scale, then seed).

    Arrays: `depth, scale, seed (B,)`, `ts (T,)`, `theta (B, T, dim)`, `loss (B, T)`,
    `theta_final (B, dim)`, `num_steps, ok, result, t_final (B,)`, `implicit (B,)` (finished by
    the Kvaerno5 phase: stiff members), `sigma (B,)` (eq 13), `rate (B,)` (empirical
    exponential rate, least squares only), `theorem2_rate (B,)` (2 sigma mu), `layers0 (B,
    max_depth, dim)` (rows past a grid point's depth are NaN: use `initial_layers(b)`),
    `chunk (B,)` (its work unit), `done (B,)` (False: not computed yet, the row is NaN / -1 /
    False). `efficiency (num_chunks,)`: lockstep efficiency (slot-steps / slot-iterations) of
    the stepping recorded with each chunk (from the previous chunk written by its process to
    it), `overall_efficiency` the same over all chunks (a resumed run's also counts the
    stepping of the trajectories in flight at the interrupt, done again). `info`: the
    sweep's settings (times, tolerances, init, chunk size) and the versions that ran it.
    """

    depth: np.ndarray
    scale: np.ndarray
    seed: np.ndarray
    ts: np.ndarray
    theta: np.ndarray
    loss: np.ndarray
    theta_final: np.ndarray
    num_steps: np.ndarray
    ok: np.ndarray
    result: np.ndarray
    t_final: np.ndarray
    implicit: np.ndarray
    sigma: np.ndarray
    rate: np.ndarray
    theorem2_rate: np.ndarray
    layers0: np.ndarray
    chunk: np.ndarray
    done: np.ndarray
    efficiency: np.ndarray
    overall_efficiency: float
    info: dict

    def initial_layers(self, b: int) -> np.ndarray:
        """The initial layers `(depth, dim)` of grid point `b`."""
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


def _empty(spec: dict) -> dict:
    B = len(spec["depths"]) * len(spec["scales"]) * len(spec["seeds"])
    T, d, Lmax = len(spec["ts"]), spec["dim"], max(spec["depths"])
    f = np.full
    return dict(index=np.arange(B), theta=f((B, T, d), np.nan), num_steps=f(B, -1),
                ok=f(B, False), result=f(B, -1), t_final=f(B, np.nan), implicit=f(B, False),
                loss=f((B, T), np.nan), sigma=f(B, np.nan),
                rate=f(B, np.nan), theorem2_rate=f(B, np.nan), layers0=f((B, Lmax, d), np.nan))


def _merge(spec: dict, parts) -> tuple[dict, np.ndarray]:
    """The rows of `parts` in grid order; an exact duplicate is dropped, a conflicting one
    raises."""
    rows = _empty(spec)
    source = np.full(len(rows["index"]), -1)
    for k, (name, part) in enumerate(parts):
        idx = np.asarray(part["index"])
        for j in np.flatnonzero(source[idx] >= 0):
            g = idx[j]
            same = all(np.array_equal(rows[f][g], part[f][j], equal_nan=True)
                       for f in RAW + DERIVED)
            if not same:
                raise ValueError(
                    f"conflicting results for grid point {g} in {parts[source[g]][0]!r} and "
                    f"{name!r}: the folder mixes different runs; delete one of the files.")
        for f in RAW + DERIVED:
            rows[f][idx] = part[f]
        source[idx] = k
    return rows, source >= 0


def assemble(manifest: dict, parts) -> SweepResult:
    """The `SweepResult` of a sweep's manifest and chunks (missing rows marked)."""
    spec = manifest["spec"]
    rows, done = _merge(spec, parts)
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

    **Raises:** `FileNotFoundError` when `out` holds no sweep; `ValueError` when two files
    hold different results for one grid point (exact duplicates are fine)."""
    path = Path(out) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no sweep in {str(out)!r} (no {MANIFEST}).")
    return assemble(json.loads(path.read_text()), Store(out, "load", 0.0).parts())
