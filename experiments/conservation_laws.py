"""Conservation laws of any model by autodiff (README: conservation laws): the number of independent
laws, D - dim Lie(W)(u) (Marcotte, Gribonval & Peyré 2023), next to the count known by hand, and
whether the parameterization is commuting (Li, Wang, Lee & Arora 2022), for DDLNs, the tied and
difference networks, U V^T and a two-layer ReLU network. The figure shows the singular values of the
stacked Lie-algebra field values at u: the gap that decides each rank."""

import time

import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import ddln_jax as dd

from ._common import cli, save_figure, save_json, save_npz, setup

FULL_ESTIMATE = "about 2 minutes"


def _uv(params):
    """Two-layer linear network U V^T."""
    U, V = params
    return (U @ V.T).ravel()


def _relu_region(params):
    """Two-layer ReLU network on a region of fixed activations: (v_j u_j)_j."""
    u, v = params
    return (v[:, None] * u).ravel()


def _models(quick: bool):
    """(name, mathtext label, G, shapes of u, known count, known commuting)."""
    ddln = [(6, 8)] if quick else [(2, 8), (3, 4), (4, 8), (6, 8), (8, 4)]
    tied = [4] if quick else [3, 6]
    diff = [3] if quick else [2, 4]
    uv = [(4, 3, 2)] if quick else [(4, 3, 2), (3, 3, 3), (5, 4, 3)]
    relu = [(3, 4)] if quick else [(3, 4), (4, 1), (2, 6)]
    out = [(f"DDLN L={L}, d={d}", f"DDLN $L={L}$, $d={d}$", dd.theta, (L, d), d * (L - 1), True)
           for L, d in ddln]
    out += [(f"tied u^{L}, d=5", f"tied $u^{{\\odot {L}}}$, $d=5$", dd.tied(L), (5,), 0, True)
            for L in tied]
    out += [(f"u^{L} - v^{L}, d=4", f"$u^{{\\odot {L}}} - v^{{\\odot {L}}}$, $d=4$",
             dd.difference(L), ((4,), (4,)), 4, True) for L in diff]
    out += [(f"U V^T, {n}x{m}, r={r}", f"$UV^\\top$, ${n}\\times{m}$, $r={r}$", _uv,
             ((n, r), (m, r)), r * (r + 1) // 2, False) for n, m, r in uv]
    out += [(f"ReLU, {r} neurons, input {p}", f"ReLU, ${r}$ neurons, input ${p}$",
             _relu_region, ((r, p), (r,)), r, p == 1) for r, p in relu]
    return out


def _point(key, shapes):
    if isinstance(shapes[0], int):
        return jr.normal(key, shapes)
    return tuple(jr.normal(k, s) for k, s in zip(jr.split(key, len(shapes)), shapes))


def main(*, quick: bool = True, out="results/conservation_laws", progress: bool = True) -> dict:
    out = setup(out)
    models = _models(quick)
    num_points = 3 if quick else 5
    rows, svals = [], {}
    keys = jr.split(jr.key(0), len(models))
    for key, (name, label, G, shapes, known, known_commuting) in zip(
        keys, tqdm(models, desc="conservation laws", disable=not progress)
    ):
        u = _point(key, shapes)
        start = time.perf_counter()
        laws = dd.count_conservation_laws(G, u, num_points=num_points)
        seconds = time.perf_counter() - start
        com = dd.is_commuting(G, u, num_points=num_points)
        rows.append({
            "model": name, "label": label, "D": laws.dimension, "count": laws.count, "known": known,
            "commuting": com.commuting, "known_commuting": known_commuting,
            "max_bracket": com.max_bracket, "jacobian_rank": com.jacobian_rank,
            "bracket_depth": laws.lie.bracket_depth, "gap": laws.lie.gap,
            "agreement": laws.lie.agreement, "seconds": seconds,
        })
        svals[name] = np.asarray(laws.lie.singular_values)
    rtol = float(laws.lie.rtol)
    fig = _figure(rows, svals, rtol)
    files = save_figure(fig, out, "conservation_laws")
    files.append(save_npz(out, "conservation_laws",
                          **{f"singular_values_{i}": svals[r["model"]] for i, r in enumerate(rows)},
                          D=[r["D"] for r in rows], count=[r["count"] for r in rows],
                          known=[r["known"] for r in rows]))
    summary = {
        "rows": rows, "rtol": rtol, "num_points": num_points,
        "all_counts_match": all(r["count"] == r["known"] for r in rows),
        "all_commuting_match": all(r["commuting"] == r["known_commuting"] for r in rows),
        "min_gap": min(r["gap"] for r in rows),
        "ddln_6x8_seconds": next((r["seconds"] for r in rows if r["model"] == "DDLN L=6, d=8"),
                                 None),
    }
    files.append(save_json(out, "conservation_laws", summary))
    summary["files"] = files
    return summary


def _figure(rows, svals, rtol):
    cols = 4
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.7 * nrows), squeeze=False)
    floor = 1e-20
    for ax, row in zip(axes.flat, rows):
        s = svals[row["model"]]
        rel = s / s[0]
        rank = row["D"] - row["count"]
        idx = np.arange(1, s.size + 1)
        ax.semilogy(idx[:rank], rel[:rank], "o", ms=3, label="kept")
        ax.semilogy(idx[rank:], np.maximum(rel[rank:], floor), "x", ms=4, label="dropped")
        ax.axhline(rtol, color="k", ls="--", lw=0.8, label=f"rtol = {rtol:g}")
        ax.axvline(rank + 0.5, color="grey", ls=":", lw=0.8)
        ax.set_ylim(floor / 10, 10)
        ax.set_title(f"{row['label']}\nrank {rank}, {row['count']} laws", fontsize=8)
        ax.set_xlabel("index $i$")
        ax.set_ylabel("$s_i / s_1$")
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Singular values of the Lie-algebra spanning set at u (exact zeros at 1e-20)")
    return fig


def _fmt_gap(g):
    return "∞ (exact 0)" if g == float("inf") else f"{g:.1e}"


def caption(s) -> list[str]:
    """Markdown lines for `results/index.md` from this experiment's summary."""
    lines = [
        "Conservation laws by autodiff: D − dim Lie(W)(u) at a random u, against the count "
        f"known by hand, with the commuting test ({s['num_points']} random points each, "
        f"rtol {s['rtol']:g}). Counts match: {s['all_counts_match']}; commuting verdicts "
        f"match: {s['all_commuting_match']}; smallest singular-value gap {_fmt_gap(s['min_gap'])}.",
        "",
        "| model | D | laws (numeric) | laws (known) | commuting? | bracket depth | gap "
        "| time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['model']} | {r['D']} | {r['count']} | {r['known']} | "
            f"{'yes' if r['commuting'] else 'no'} | {r['bracket_depth']} | "
            f"{_fmt_gap(r['gap'])} | {r['seconds']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    cli(main, __doc__, "results/conservation_laws")
