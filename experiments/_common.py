"""Shared helpers of the experiment scripts (entry points: they turn on float64).

Every experiment module `experiments/<name>.py` has `main(*, quick=True, out=...)` returning a
summary dict (with "files") and `caption(summary)` returning the markdown lines for
`results/index.md`; `python -m experiments.<name>` runs it (quick by default, `--full` for the
paper sizes).
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import ddln_jax as dd  # noqa: E402
from ddln_jax.plotting import use_style  # noqa: E402

from ._cli import parser  # noqa: E402


def setup(out) -> Path:
    """float64 on, JAX's persistent compilation cache (`dd.enable_compilation_cache`: off with
    DDLN_JAX_NO_CACHE=1), the shared plot style, and the output folder."""
    jax.config.update("jax_enable_x64", True)
    dd.enable_compilation_cache()
    use_style()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def fmt(x, spec=".3g") -> str:
    return format(float(x), spec)


def save_figure(fig, out: Path, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=130, bbox_inches="tight")
        paths.append(str(p))
    plt.close(fig)
    return paths


def _default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "shape"):
        return np.asarray(o).tolist()
    raise TypeError(type(o))


def save_json(out: Path, name: str, data) -> str:
    p = out / f"{name}.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_default))
    os.replace(tmp, p)
    return str(p)


def save_npz(out: Path, name: str, **arrays) -> str:
    p = out / f"{name}.npz"
    np.savez(p, **{k: np.asarray(v) for k, v in arrays.items()})
    return str(p)


def sparse_problem(key, n, d, k):
    """A k-sparse ±1.5 truth, X with N(0, 1/n) entries, y = X truth (noiseless)."""
    kx, ks, kv = jr.split(key, 3)
    X = jr.normal(kx, (n, d)) / jnp.sqrt(n)
    support = jr.choice(ks, d, (k,), replace=False)
    truth = jnp.zeros(d).at[support].set(jr.choice(kv, jnp.array([-1.0, 1.0]), (k,)) * 1.5)
    return X, X @ truth, truth


def time_to_reach(ts, subopt, level=1e-10):
    """First saved time with L - L* < level, linearly interpolated in log(L - L*)."""
    ts, s = np.asarray(ts), np.asarray(subopt)
    below = np.flatnonzero(s < level)
    if below.size == 0:
        return float("inf")
    i = below[0]
    if i == 0:
        return float(ts[0])
    la, lb, lv = np.log(s[i - 1]), np.log(s[i]), np.log(level)
    return float(ts[i - 1] + (la - lv) / (la - lb) * (ts[i] - ts[i - 1]))


def cli(main, doc: str, default_out: str) -> None:
    """`python -m experiments.<name> [--full] [--out DIR]`: run `main`, print the caption.

    The module's `FULL_ESTIMATE` (a string) states how long `--full` takes."""
    module = sys.modules[main.__module__]
    name = Path(default_out).name
    args = parser(doc, name, getattr(module, "FULL_ESTIMATE", "time not measured"),
                  default_out).parse_args()
    start = time.perf_counter()
    summary = module.main(quick=not args.full, out=args.out)
    print("\n".join(module.caption(summary)))
    print(f"\nfiles: {', '.join(summary.get('files', []))}")
    print(f"time: {time.perf_counter() - start:.1f} s")
