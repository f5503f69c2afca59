"""Sweeps over depth x scale x seed in compiled, vmapped calls (README: sweeps).

- `_rows`: grid points to initial states, finished slots to result rows.
- `_methods`: the fused explicit Tsit5 (worker threads) and the structured Kvaerno5 for stiff
  members, over slot arrays (`_slots`, `_fused`, `_advance`, `_drive`) (continuous batching).
- `_scheduler`: fixed chunks of the grid as a work queue shared by processes (leases).
- `_store`: the results folder (manifest, chunk files, partial chunks, leases).
- `_result`: `SweepResult`, assembled from the chunks; xarray / netCDF.
"""

from ._check import per_seed as per_seed
from ._result import SweepResult as SweepResult
from ._result import load_sweep as load_sweep
from ._sweep import sweep as sweep
