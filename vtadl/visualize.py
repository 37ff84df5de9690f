"""Heat-map pictures: the image, the map over it, and the ground truth's outline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy.ndimage import binary_erosion

MAX_SIDE = 512


def colourise(amap: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map scores to RGB uint8 with a fixed range (from the validation images, not the test)."""
    scaled = np.clip((amap - low) / max(high - low, 1e-12), 0, 1)
    return (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    mask = mask.astype(bool)
    return mask & ~binary_erosion(mask)


def save_heatmap(
    path: str | Path,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None,
    low: float,
    high: float,
) -> None:
    """Write [image | overlay (with the defect's outline in green) | heat map] as one PNG.

    The map sets the geometry (the image's original size); the image may come at another size
    (from a pack, at the model's input size) and is resized to it. Panels are at most 512 px.
    """
    h, w = amap.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    heat = np.asarray(Image.fromarray(colourise(amap, low, high)).resize(size, Image.BILINEAR))
    over = (picture.astype(np.float32) * 0.5 + heat.astype(np.float32) * 0.5).astype(np.uint8)
    if mask is not None and mask.any():
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST))
        over[outline(small > 127)] = (0, 255, 0)
    Image.fromarray(np.concatenate([picture, over, heat], axis=1)).save(path)
