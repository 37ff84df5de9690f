"""Heat-map pictures: the image, the map over it with the true defect outlined, and the map.

A picture is drawn on a matplotlib `Figure` of its own (no pyplot, no global state) with the
axes placed in pixels, so that every panel gets a known size whatever the image's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

MIN_SIDE, MAX_SIDE = 256, 512  # panel sides in pixels (see _panel_size)
DPI = 100
# Layout in pixels: outer margin, gap between panels, title band, caption band, colour bar.
_PAD, _GAP, _TOP, _CAPTION, _BAR, _BAR_LABELS = 12, 16, 56, 22, 14, 78
_CMAP = "inferno"
_OUTLINE = "#39ff14"


def _panel_size(h: int, w: int) -> tuple[int, int]:
    """Shown at original size, but the shorter side at least MIN_SIDE and, unless that rule
    needs more, the longer side at most MAX_SIDE."""
    scale = max(MIN_SIDE / min(h, w), min(1.0, MAX_SIDE / max(h, w)))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _title(name: str, score: float, threshold: float, width: int) -> str:
    """Two lines: the file (its start cut off if wider than `width` pixels), then the verdict."""
    fits = max(20, width // 7)  # characters of about 7 px at the title's font size
    if len(name) > fits:
        name = "..." + name[-(fits - 3) :]
    verdict = "ANOMALOUS (score above the threshold)" if score > threshold else "normal"
    return f"{name}\nimage score {score:.3f}, threshold {threshold:.3f}: {verdict}"


def save_heatmap(
    path: str | Path,
    image: np.ndarray,
    amap: np.ndarray,
    *,
    name: str,
    score: float,
    threshold: float,
    low: float,
    high: float,
    mask: np.ndarray | None = None,
) -> None:
    """Write [image | overlay | heat map + colour bar] under a title as one PNG.

    The map sets the geometry (the image's original size); an image of another size is
    stretched over it. The colour range [low, high] is fixed by the validation images, so
    pictures of one run compare; the threshold is marked on the colour bar. Where the map is
    low the overlay lets the image through, so the overlay hides nothing normal.
    """
    h, w = amap.shape
    ph, pw = _panel_size(h, w)
    width = 2 * _PAD + 3 * pw + 2 * _GAP + _GAP + _BAR + _BAR_LABELS
    height = _TOP + _CAPTION + ph + _PAD
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # every picture in the map's pixel coordinates
    norm = Normalize(low, high, clip=True)

    def panel(k: int, caption: str):
        left = _PAD + k * (pw + _GAP)
        ax = fig.add_axes((left / width, _PAD / height, pw / width, ph / height))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(caption, fontsize=9, pad=4)
        return ax

    panel(0, "image").imshow(image, extent=extent, interpolation="antialiased")

    over = panel(1, "overlay" + (", true defect outlined" if mask is not None else ""))
    over.imshow(image, extent=extent, interpolation="antialiased")
    rgba = colormaps[_CMAP](norm(amap))
    rgba[..., 3] = 0.85 * norm(amap)  # transparent at the normal level, opaque at the top
    over.imshow(rgba, extent=extent)
    if mask is not None and mask.any():
        over.contour(mask.astype(np.float32), levels=[0.5], colors=_OUTLINE, linewidths=1.5)
    over.set_xlim(extent[:2])
    over.set_ylim(extent[2:])

    shown = panel(2, "anomaly map").imshow(amap, cmap=_CMAP, norm=norm, extent=extent)
    left = _PAD + 3 * pw + 2 * _GAP + _GAP
    bar_ax = fig.add_axes((left / width, _PAD / height, _BAR / width, ph / height))
    bar = fig.colorbar(shown, cax=bar_ax, extend="both")
    bar.ax.tick_params(labelsize=8)
    bar.set_label("anomaly score (SDs above normal)", fontsize=8)
    if low < threshold < high:  # the threshold as a tick of its own, its neighbours cleared
        near = 0.08 * (high - low)
        ticks = [t for t in bar.get_ticks() if low <= t <= high and abs(t - threshold) > near]
        bar.set_ticks([*ticks, threshold], labels=[f"{t:g}" for t in ticks] + ["threshold"])
        bar.ax.axhline(threshold, color="white", linewidth=2)

    colour = "#c00000" if score > threshold else "black"
    fig.suptitle(
        _title(name, score, threshold, width),
        y=1 - 6 / height,
        va="top",
        fontsize=10,
        color=colour,
    )
    fig.savefig(path, dpi=DPI)
