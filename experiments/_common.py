"""Shared helpers of the experiment scripts (entry points: they turn on float64)."""

import json
import os
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def setup(out) -> Path:
    jax.config.update("jax_enable_x64", True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig, out: Path, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=130, bbox_inches="tight")
        paths.append(str(p))
    plt.close(fig)
    return paths


def _default(o):
    if isinstance(o, (np.floating, np.integer)):
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


def cli(main, doc: str, default_out: str) -> None:
    """`python -m experiments.<name> [--quick] [--out DIR]`: run `main` and print its summary."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    print(main(quick=args.quick, out=args.out))
