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


def overlay(image: np.ndarray, amap: np.ndarray, low: float, high: float, alpha: float = 0.5):
    heat = colourise(amap, low, high).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    mask = mask.astype(bool)
    return mask & ~binary_erosion(mask, iterations=max(1, max(mask.shape) // 256))


def save_heatmap(
    path: str | Path,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None,
    low: float,
    high: float,
) -> None:
    """Write [image | overlay (with the defect's outline in green) | heat map] as one PNG."""
    over = overlay(image, amap, low, high)
    if mask is not None and mask.any():
        over[outline(mask)] = (0, 255, 0)
    panels = [image, over, colourise(amap, low, high)]
    h, w = image.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    strip = np.concatenate(
        [np.asarray(Image.fromarray(p).resize(size, Image.BILINEAR)) for p in panels], axis=1
    )
    Image.fromarray(strip).save(path)
