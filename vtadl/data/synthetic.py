"""A tuning split without labelled anomalies: held-out normal images with synthetic defects.

`make_tuning_split(inputs)` takes model-size uint8 images of normal parts that training never
saw (the validation split) and returns them clean plus, for each, `per_kind` copies of every
defect kind pasted in:

- ``cutpaste``: a rectangle cut from another image (or elsewhere in the same one), flipped
  and with its brightness and contrast changed, pasted at a random place (CutPaste, Li et al.
  2021);
- ``noise``: an irregular blob filled with coloured noise around the local mean;
- ``scratch``: a thin polyline, a few pixels wide, much brighter or darker than its
  surroundings.

Masks are exact: a pixel is in the mask if and only if the defect changed it, so pixels
outside the mask equal the clean image bit for bit. The split is a pure function of the
images and the seed, so every trial of a search is scored on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from vtadl.exceptions import DataError

KINDS: tuple[str, ...] = ("cutpaste", "noise", "scratch")
# A defect covers this fraction of the image (scratches: at least the lower bound).
MIN_AREA, MAX_AREA = 0.01, 0.06


@dataclass(frozen=True)
class TuningSplit:
    """uint8 images (N, S, S, 3), bool masks (N, S, S), labels (N,) and each image's kind
    ("good" or one of KINDS)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path, images=self.images, masks=self.masks, labels=self.labels, kinds=self.kinds
        )

    @classmethod
    def load(cls, path: str | Path) -> TuningSplit:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["images"], f["masks"], f["labels"], f["kinds"])

    def describe(self) -> dict:
        kinds, counts = np.unique(self.kinds, return_counts=True)
        return {
            "images": len(self.images),
            "size": int(self.images.shape[1]),
            "per_kind": dict(zip(kinds.tolist(), counts.tolist())),
            "defect_area_mean": float(self.masks[self.labels == 1].mean()),
        }


def _rectangle(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    area = rng.uniform(MIN_AREA, MAX_AREA) * size * size
    aspect = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
    h = int(np.clip(round(np.sqrt(area * aspect)), 2, size - 2))
    w = int(np.clip(round(area / h), 2, size - 2))
    return h, w, int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))


def _cutpaste(img: np.ndarray, others: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    h, w, y, x = _rectangle(rng, size)
    donor = others[int(rng.integers(len(others)))]
    sy, sx = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    patch = donor[sy : sy + h, sx : sx + w].astype(np.float64)
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    mean = patch.mean()
    patch = (
        (patch - mean) * rng.uniform(0.6, 1.4) + mean + rng.choice([-1, 1]) * rng.uniform(25, 60)
    )
    out = img.astype(np.float64)
    out[y : y + h, x : x + w] = patch
    return out


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smoothed noise thresholded inside an ellipse: an irregular, connected-looking blob."""
    area = rng.uniform(MIN_AREA, MAX_AREA) * size * size
    ry = np.sqrt(area / np.pi) * rng.uniform(0.8, 1.25)
    rx = area / (np.pi * ry)
    cy, cx = rng.uniform(ry + 1, size - ry - 1), rng.uniform(rx + 1, size - rx - 1)
    yy, xx = np.mgrid[:size, :size]
    envelope = 1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), max(1.0, ry / 3))
    field /= field.std() + 1e-12
    return envelope + 0.25 * field > 0


def _noise(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    local = img[mask].mean(axis=0)
    shift = rng.choice([-1, 1], size=3) * rng.uniform(20, 50, size=3)
    noise = rng.normal(0, rng.uniform(20, 45), size=img.shape)
    out = img.astype(np.float64)
    out[mask] = (local + shift + noise)[mask]
    return out


def _scratch_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A polyline of 2-4 segments, dilated to a width of 1-3 pixels."""
    from skimage.draw import line

    mask = np.zeros((size, size), dtype=bool)
    point = rng.uniform(0.2 * size, 0.8 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 5))):
        angle += rng.uniform(-0.6, 0.6)
        step = rng.uniform(0.12, 0.3) * size
        nxt = np.clip(point + step * np.array([np.sin(angle), np.cos(angle)]), 0, size - 1)
        rr, cc = line(*np.rint(point).astype(int), *np.rint(nxt).astype(int))
        mask[rr, cc] = True
        point = nxt
    width = int(rng.integers(0, 2))
    return ndimage.binary_dilation(mask, iterations=width) if width else mask


def _scratch(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    level = 245.0 if img[mask].mean() < 128 else 10.0
    out = img.astype(np.float64)
    out[mask] = 0.2 * out[mask] + 0.8 * level
    return out


def add_defect(
    img: np.ndarray, kind: str, others: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One defect of `kind` on uint8 (S, S, 3) `img`: (image, exact bool mask)."""
    size = img.shape[0]
    for _ in range(50):
        if kind == "cutpaste":
            painted = _cutpaste(img, others, rng)
        else:
            mask = _blob_mask(rng, size) if kind == "noise" else _scratch_mask(rng, size)
            painted = (_noise if kind == "noise" else _scratch)(img, mask, rng)
        out = np.clip(np.rint(painted), 0, 255).astype(np.uint8)
        changed = (out != img).any(axis=-1)
        if changed.mean() >= (MIN_AREA / 4 if kind == "scratch" else MIN_AREA):
            return out, changed
    raise DataError(f"could not paste a visible {kind} defect into a {size}x{size} image")


def make_tuning_split(inputs: np.ndarray, *, per_kind: int = 2, seed: int = 0) -> TuningSplit:
    """Clean `inputs` (N, S, S, 3) uint8 plus `per_kind` defective copies of each per kind."""
    if len(inputs) == 0:
        raise DataError("the tuning split needs at least one held-out normal image")
    if per_kind < 1:
        raise DataError(f"defects per kind must be at least 1, got {per_kind}")
    rng = np.random.default_rng(seed)
    images = list(inputs)
    masks = [np.zeros(inputs.shape[1:3], bool) for _ in inputs]
    kinds = ["good"] * len(inputs)
    for i, img in enumerate(inputs):
        others = np.delete(inputs, i, axis=0) if len(inputs) > 1 else inputs
        for kind in KINDS:
            for _ in range(per_kind):
                image, mask = add_defect(img, kind, others, rng)
                images.append(image)
                masks.append(mask)
                kinds.append(kind)
    kinds_arr = np.array(kinds)
    return TuningSplit(
        np.stack(images), np.stack(masks), (kinds_arr != "good").astype(np.int64), kinds_arr
    )
