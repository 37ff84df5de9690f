"""From raw scores to an anomaly map at the image's resolution and an image score.

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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vtadl.config import EvalConfig
from vtadl.data.tiles import stitch_tiles
from vtadl.scoring.calibration import COMPOSITE, Calibration
from vtadl.scoring.grids import nll_map
from vtadl.scoring.raw import Raw


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
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear")[0, 0].numpy()
    return gaussian_filter(out, sigma) if sigma > 0 else out


def full_map(
    small: np.ndarray, corners: np.ndarray | None, shape: tuple[int, int], sigma: float
) -> np.ndarray:
    """An image's map at its original resolution from its input's standardised map(s): one
    image upsampled, or its tiles stitched back together; smoothed either way."""
    if corners is None:
        return to_original(small[0], shape, sigma)
    stitched = stitch_tiles(small, corners, shape)
    return gaussian_filter(stitched, sigma) if sigma > 0 else stitched


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


def peak(raw: Raw, small: np.ndarray, cal: Calibration, e: EvalConfig) -> float:
    """The mean of the `e.peak_patches` highest standardised patch scores, before upsampling
    and smoothing: on the image's token grids (every shift and tile) for the NLL, with the
    reconstruction error on the map at model resolution."""
    values = cal.nll.apply(raw.nll, cal.scale) if e.score == "nll" else small
    return mean_of_highest(values, e.peak_patches)


def image_level(
    raw: Raw, small: np.ndarray, amap: np.ndarray, cal: Calibration, e: EvalConfig, how: str
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
