"""Matplotlib figures of flows: log-suboptimality, node dynamics, heatmaps."""

import matplotlib.pyplot as plt
import numpy as np


def plot_suboptimality(ax, ts, subopt, *, label=None, bound=None, color=None, floor=1e-30):
    """log(L - L*) against t, with an optional bound (e.g. Theorem 2) dashed in the same
    color."""
    ts, s = np.asarray(ts), np.maximum(np.asarray(subopt), floor)
    (line,) = ax.semilogy(ts, s, label=label, color=color)
    if bound is not None:
        b = np.maximum(np.asarray(bound), floor)
        ax.semilogy(ts, b, "--", color=line.get_color(), alpha=0.7,
                    label=None if label is None else f"{label}: Thm 2 bound")
    ax.set_xlabel("t")
    ax.set_ylabel(r"$\mathcal{L}(\theta(t)) - \mathcal{L}^*$")
    return line


def plot_nodes(ax, ts, layers, coordinate: int, *, argmin_layer=None, crossings=()):
    """u^j_i(t) for every layer j at coordinate i; the argmin layer thick, zero crossings
    marked."""
    ts, u = np.asarray(ts), np.asarray(layers)
    for j in range(u.shape[1]):
        lw = 2.5 if j == argmin_layer else 1.2
        name = f"layer {j + 1}" + (" (argmin |u(0)|)" if j == argmin_layer else "")
        ax.plot(ts, u[:, j, coordinate], lw=lw, label=name)
    for c in crossings:
        ax.axvline(c, color="k", ls=":", lw=1)
        ax.plot([c], [0.0], "ko")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("t")
    ax.set_ylabel(f"$u^j_{{{coordinate + 1}}}(t)$")
    return ax


def heatmap(ax, values, xlabels, ylabels, *, title=None, cmap="viridis", fmt="{:.2g}",
            log=True):
    """A labelled heatmap with the values written in the cells."""
    v = np.asarray(values, float)
    shown = np.log10(v) if log else v
    im = ax.imshow(shown, cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(xlabels)), [str(x) for x in xlabels])
    ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels])
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=7,
                    color="w")
    if title:
        ax.set_title(title)
    plt.colorbar(im, ax=ax, label="log10" if log else None)
    return im
