"""Matplotlib figures of flows: log-suboptimality, node dynamics, heatmaps, and the one
shared style of every figure (`use_style`).

Mathematical labels use matplotlib's mathtext (`$\\sigma\\mu$`), never a TeX installation and
never plain-text Greek names: chosen once here, for the experiments and the notebooks.
"""

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "text.usetex": False,
    "mathtext.fontset": "cm",
    "savefig.dpi": 130,
}


def use_style() -> None:
    """Apply the library's figure style (`STYLE`) to matplotlib's global rcParams."""
    mpl.rcParams.update(STYLE)


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


def relative_luminance(color) -> float:
    """WCAG 2 relative luminance of a matplotlib color (0 black, 1 white)."""
    rgb = np.asarray(mpl.colors.to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


def text_color(background) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG contrast ratio
    (L1 + 0.05) / (L2 + 0.05); the better of the two is always >= 4.58)."""
    lum = relative_luminance(background)
    return "k" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "w"


def heatmap(ax, values, xlabels, ylabels, *, title=None, cmap="viridis", fmt="{:.2g}",
            log=True, label=None, vmin=None, vmax=None):
    """A labelled heatmap with the values written in the cells (in black or white, whichever
    reads better on the cell's colour); the colorbar says what it shows (`label`, prefixed by
    "log10 of" when `log`), on a fixed range if `vmin`/`vmax`."""
    v = np.asarray(values, float)
    shown = np.log10(v) if log else v
    im = ax.imshow(shown, cmap=cmap, aspect="auto", origin="lower", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(xlabels)), [str(x) for x in xlabels])
    ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels])
    cells = im.cmap(im.norm(np.ma.masked_invalid(shown)))  # RGBA of each cell as drawn
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=7,
                    color=text_color(cells[i, j] if np.isfinite(shown[i, j]) else "w"))
    if title:
        ax.set_title(title)
    name = label or "value"
    plt.colorbar(im, ax=ax, label=f"$\\log_{{10}}$ of {name}" if log else name)
    return im
