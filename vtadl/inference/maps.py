"""From raw scores to an anomaly map at the image's resolution and an image score (numpy only:
the one implementation, for a run's scorer and an exported detector alike).

A map starts at model resolution from two raw scores: the per-patch mixture NLL on the token
grid and the per-pixel squared reconstruction error. Both are heavy tailed: a defect's
patches score tens of times the normal spread. With `scale: log` (default) each becomes
log(1 + excess / spread), the excess over a normal level measured on the validation images
(held-out normal training images), so a single extreme patch cannot swamp its neighbours
once the map is smoothed; the NLL is scaled on its grid and then bilinearly upsampled. Each
part is then standardised with the mean and standard deviation it has on the validation
images, so parts can be summed and a map reads as "standard deviations above normal". The
map is upsampled to the image's original resolution and Gaussian-smoothed; metrics are
computed there, against the masks at their own resolution. The image score is by default
the map's peak before upsampling and smoothing (`peak`); for the MNIST layout the peak plus
0.3 times the log of the image's mean squared reconstruction error plus 0.5 times the log of
its tokens' distance to the nearest training image's (vtadl.scoring.neighbours), each
standardised on the validation images (`peak+recon+neighbour`); the smoothed map's maximum,
as in the official MVTec evaluation, is an option.

Bilinear resizing is torch's `interpolate(mode="bilinear", align_corners=False)` and the
smoothing scipy's `gaussian_filter` (reflected border, truncated at 4 sigma), written here
in numpy so that an exported detector needs neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from vtadl.inference.calibration import COMPOSITE, Calibration
from vtadl.inference.tiles import stitch_tiles

# scipy.ndimage.gaussian_filter's default: the kernel reaches this many sigmas
TRUNCATE = 4.0


class Raw(NamedTuple):
    """The raw scores of a batch of model inputs (images, or tiles): the mixture NLL of
    every patch on every shifted grid (N, S, g, g), the squared reconstruction error per
    pixel (N, H, W), and, when asked for, the distance of each input's tokens to the
    nearest training image's (N,), else None."""

    nll: np.ndarray
    rec: np.ndarray
    near: np.ndarray | None = None

    def split(self, cuts: Sequence[int]) -> list[Raw]:
        """The scores of consecutive groups of inputs, cut before each index in `cuts`."""
        parts = [np.split(a, cuts) if a is not None else [None] * (len(cuts) + 1) for a in self]
        return [Raw(*group) for group in zip(*parts)]


class MapSettings(Protocol):
    """What the maps read of the eval settings (a run's `EvalConfig`, or an exported
    detector's copy of it)."""

    score: str
    smoothing_sigma: float
    peak_patches: int
    recon_weight: float
    neighbour_weight: float


def grid_offsets(patch: int, shifts: int) -> list[tuple[int, int]]:
    """The (dy, dx) pixel offsets of the `shifts` x `shifts` patch grids, (0, 0) first."""
    steps = [round(i * patch / shifts) for i in range(shifts)]
    return [(dy, dx) for dy in steps for dx in steps]


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of the second for each output pixel of a bilinear resize
    (half-pixel centres, clamped at the border)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, src - low


def resize_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., H, W) float32, bilinear with half-pixel centres."""
    a = np.asarray(a, dtype=np.float64)
    (r0, r1, wr), (c0, c1, wc) = _taps(a.shape[-2], size[0]), _taps(a.shape[-1], size[1])
    rows = a[..., r0, :] * (1 - wr)[:, None] + a[..., r1, :] * wr[:, None]
    return (rows[..., c0] * (1 - wc) + rows[..., c1] * wc).astype(np.float32)


def smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    """A 2-D map smoothed by a Gaussian of `sigma` pixels, one axis at a time, the border
    reflected (d c b a | a b c d); float32."""
    if sigma <= 0:
        return np.asarray(a, dtype=np.float32)
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    weights /= weights.sum()
    out = np.asarray(a, dtype=np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out.astype(np.float64), pad, mode="symmetric")
        total = np.zeros(out.shape, np.float64)
        for k, w in enumerate(weights):
            total += w * (padded[k : k + n] if axis == 0 else padded[:, k : k + n])
        out = total.astype(np.float32)
    return out


def nll_map(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, S, g, g) patch scores on S = shifts^2 shifted grids -> (N, H, W).

    The grids interleave into one grid of stride p / shifts (p = H / g): the token in cell i
    of the grid shifted by o = j * p / shifts pixels covers pixels [p*i - o, p*i - o + p),
    centred at p*i - o + p/2, which is fine cell shifts*i + shifts-1-j. That grid is
    upsampled bilinearly, which puts fine cell m at (m + 1/2) * stride, and moved by the
    (p - stride) / 2 pixels between that and the cell's true centre (edge values repeated).
    Averaging the upsampled grids instead would blur a defect that one grid sees whole and
    the others only in part.
    """
    n, s, g, _ = grids.shape
    h, w = size
    shifts = round(s**0.5)
    fine = np.empty((n, g * shifts, g * shifts), np.float32)
    step = (h // g) // shifts
    for k, (dy, dx) in enumerate(grid_offsets(h // g, shifts)):
        fine[:, shifts - 1 - dy // step :: shifts, shifts - 1 - dx // step :: shifts] = grids[:, k]
    up = resize_bilinear(fine, size)
    c = (h // g - step) // 2
    if c:
        up = np.pad(up[..., c:, c:], ((0, 0), (0, c), (0, c)), mode="edge")
    return up


def standardised(nll: np.ndarray, rec: np.ndarray, cal: Calibration, score: str) -> np.ndarray:
    """Combine the two raw scores into one map per image at model resolution: (N, H, W).

    The NLL is scaled on its patch grid, before upsampling, so that interpolation works on
    the scaled values.
    """
    parts = []
    if score in ("nll", "nll+recon"):
        parts.append(nll_map(cal.nll.apply(nll, cal.scale), rec.shape[-2:]))
    if score in ("recon", "nll+recon"):
        parts.append(cal.rec.apply(rec, cal.scale))
    return sum(parts)


def to_original(amap: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Upsample a map to `shape` (bilinear) and smooth it with a Gaussian of `sigma` pixels."""
    return smooth(resize_bilinear(amap, tuple(shape)), sigma)


def full_map(
    small: np.ndarray, corners: np.ndarray | None, shape: tuple[int, int], sigma: float
) -> np.ndarray:
    """An image's map at its original resolution from its input's standardised map(s): one
    image upsampled, or its tiles stitched back together; smoothed either way."""
    if corners is None:
        return to_original(small[0], shape, sigma)
    return smooth(stitch_tiles(small, corners, shape), sigma)


def mean_of_highest(values: np.ndarray, k: int) -> float:
    flat = values.ravel()
    k = min(k, flat.size)
    return float(np.partition(flat, flat.size - k)[-k:].mean())


def log_mse(rec: np.ndarray) -> float:
    """The log of an image's mean squared reconstruction error (over its tiles, if any)."""
    return float(np.log(rec.mean() + 1e-12))


def log_near(near: np.ndarray, floor: float) -> float:
    """The log of an image's token distance to the nearest training image (of its tiles'
    mean distance, if it has tiles), at least `floor`."""
    return float(np.log(max(float(near.mean()), floor) + 1e-12))


def image_score(amap: np.ndarray, how: str = "max") -> float:
    """An image score read from the smoothed map: its max, mean or top1pct."""
    if how == "max":
        return float(amap.max())
    if how == "mean":
        return float(amap.mean())
    return mean_of_highest(amap, max(1, amap.size // 100))


def peak(raw: Raw, small: np.ndarray, cal: Calibration, e: MapSettings) -> float:
    """The mean of the `e.peak_patches` highest standardised patch scores, before upsampling
    and smoothing: on the image's token grids (every shift and tile) for the NLL, with the
    reconstruction error on the map at model resolution."""
    values = cal.nll.apply(raw.nll, cal.scale) if e.score == "nll" else small
    return mean_of_highest(values, e.peak_patches)


def image_level(
    raw: Raw, small: np.ndarray, amap: np.ndarray, cal: Calibration, e: MapSettings, how: str
) -> float:
    """The image score `how` (a resolved `eval.image_score`). `peak+recon` adds
    `e.recon_weight` times the log of the image's mean squared reconstruction error to the
    peak, `peak+recon+neighbour` that and `e.neighbour_weight` times the log of its tokens'
    distance to the nearest training image's, every part standardised on the validation
    images."""
    if how != "peak" and how not in COMPOSITE:
        return image_score(amap, how)
    top = peak(raw, small, cal, e)
    if how == "peak":
        return top
    total = cal.image_peak.apply(top, "linear")
    total += e.recon_weight * cal.image_rec.apply(log_mse(raw.rec), "linear")
    if how == "peak+recon+neighbour":
        near = log_near(raw.near, cal.image_near.floor)
        total += e.neighbour_weight * cal.image_near.apply(near, "linear")
    return float(total)


def scored(
    raw: Raw,
    corners: np.ndarray | None,
    shape: tuple[int, int],
    cal: Calibration,
    e: MapSettings,
    how: str,
) -> tuple[np.ndarray, float]:
    """One image's map at its original resolution, from the raw scores of its input(s),
    and its image score (`image_level`, `how` resolved)."""
    small = standardised(raw.nll, raw.rec, cal, e.score)
    amap = full_map(small, corners, shape, e.smoothing_sigma)
    return amap, image_level(raw, small, amap, cal, e, how)
