"""The figure helpers: cell labels of heatmaps readable on every cell (WCAG contrast)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ddln_jax.plotting import heatmap, relative_luminance, text_color  # noqa: E402


def _contrast(a, b):
    # WCAG 2 contrast ratio, from the sRGB definition written out here (not the library's)
    def lum(c):
        rgb = np.asarray(matplotlib.colors.to_rgb(c))
        lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_luminance_endpoints():
    assert relative_luminance("k") == 0.0 and relative_luminance("w") == pytest.approx(1.0)
    assert text_color("yellow") == "k" and text_color("navy") == "w"


@pytest.mark.parametrize("cmap", ["viridis", "magma", "Greys"])
def test_heatmap_labels_readable_on_every_cell(cmap):
    values = np.linspace(1.0, 1e4, 12).reshape(3, 4)
    values[1, 2] = np.nan  # an empty cell: drawn blank (the axes' white)
    fig, ax = plt.subplots()
    im = heatmap(ax, values, list("abcd"), list("xyz"), cmap=cmap)
    fig.canvas.draw()
    colors = set()
    for t in ax.texts:
        j, i = (int(round(c)) for c in t.get_position())
        shown = np.log10(values[i, j])
        cell = "w" if np.isnan(shown) else im.cmap(im.norm(shown))
        # the better of black and white always reaches 4.58; white on yellow was ~1.1
        assert _contrast(t.get_color(), cell) >= 4.5, (cmap, i, j, t.get_color())
        colors.add(matplotlib.colors.to_hex(t.get_color()))
    assert len(colors) == 2  # dark and light cells both present
    plt.close(fig)
