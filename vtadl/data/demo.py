"""A small MVTec-layout demo dataset built from texture photographs shipped with scikit-image.

Each category is one 512x512 grey photo (`skimage.data.brick()`, `.grass()`, `.gravel()`,
bundled with the package, no download), tinted so categories differ in colour. Training
crops come from the left 70% of the photo and test crops from the right 30%, so no test
pixel was ever seen in training. Defects are painted onto clean test crops from a binary
shape; that shape is the mask, and pixels outside it are left exactly as they were.
"""

from __future__ import annotations

import functools
import logging
import shutil
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)

DEMO_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "foreign", "hole")
# Every defect covers this fraction of the image, bounds included.
MIN_DEFECT_AREA = 0.01
MAX_DEFECT_AREA = 0.08
# Mean absolute change (grey levels, over the mask and the 3 channels) a defect must reach.
MIN_DEFECT_CONTRAST = 25.0

_TRAIN_FRACTION = 0.7  # of the photo's width, from the left
_BASE_CROP = 128  # crop side in photo pixels at scale 1, whatever the output size
_SCALE_RANGE = (0.8, 1.2)
_MARKER = ".vtadl-demo"
# Grey level 0 and 255 of each photo map to these two colours.
_TINTS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "brick": ((45, 18, 12), (250, 200, 170)),
    "grass": ((12, 40, 8), (205, 250, 150)),
    "gravel": ((28, 28, 34), (235, 235, 245)),
}
_PALETTE = np.array(
    [
        (25, 25, 25),
        (240, 240, 230),
        (200, 40, 30),
        (40, 160, 60),
        (50, 80, 210),
        (230, 200, 40),
        (110, 60, 20),
        (150, 50, 170),
    ],
    dtype=np.float64,
)
_MAX_TRIES = 100


@functools.cache
def _photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    photo = np.asarray(getattr(skdata, name)(), dtype=np.uint8)
    photo.setflags(write=False)
    return photo


def _tint(grey: np.ndarray, name: str) -> np.ndarray:
    dark, light = (np.array(c, dtype=np.float64) for c in _TINTS[name])
    lut = np.rint(dark + (light - dark) * (np.arange(256)[:, None] / 255.0)).astype(np.uint8)
    return lut[grey]


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int, region: str | None) -> np.ndarray:
    """A random square crop (random scale, flip, 90-degree turn) resized to size x size grey."""
    h, w = photo.shape
    split = round(w * _TRAIN_FRACTION)
    x0, x1 = {"train": (0, split), "test": (split, w), None: (0, w)}[region]
    side = min(round(_BASE_CROP * rng.uniform(*_SCALE_RANGE)), x1 - x0, h)
    x = int(rng.integers(x0, x1 - side + 1))
    y = int(rng.integers(0, h - side + 1))
    patch = np.rot90(photo[y : y + side, x : x + side], int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(patch))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular smooth-edged blob at a random place."""
    from skimage.draw import polygon

    radius = np.sqrt(rng.uniform(0.015, 0.065) * size * size / np.pi)
    n = int(rng.integers(8, 14))
    angles = np.linspace(0.0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    angles += rng.uniform(-0.3, 0.3, n) * (2 * np.pi / n)
    radii = radius * rng.uniform(0.65, 1.3, n)
    cy, cx = rng.uniform(1.35 * radius, size - 1.35 * radius, 2)
    rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=(size, size))
    shape = np.zeros((size, size), dtype=np.float64)
    shape[rr, cc] = 1.0
    return ndimage.gaussian_filter(shape, sigma=max(1.0, 0.15 * radius)) >= 0.5


def _curve(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin bent line (quadratic Bezier) a few pixels wide."""
    width = max(2.0, size * rng.uniform(0.02, 0.035))
    length = size * rng.uniform(0.5, 0.8)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    centre = rng.uniform(0.35 * size, 0.65 * size, 2)
    p0 = centre - direction * length / 2
    p2 = centre + direction * length / 2
    p1 = centre + normal * length * rng.uniform(-0.35, 0.35)
    t = np.linspace(0.0, 1.0, int(4 * length))[:, None]
    points = np.rint((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(int)
    inside = np.all((points >= 0) & (points < size), axis=1)
    line = np.zeros((size, size), dtype=bool)
    line[points[inside, 0], points[inside, 1]] = True
    return ndimage.distance_transform_edt(~line) <= width / 2


def _ramp(mask: np.ndarray, depth: float) -> np.ndarray:
    """Blend weight: 0 outside the mask, 0.5 on its edge, rising to 1 at `depth` pixels in."""
    inside = ndimage.distance_transform_edt(mask)
    return np.where(mask, 0.5 + 0.5 * np.clip((inside - 1.0) / depth, 0.0, 1.0), 0.0)


def _far_colour(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(_PALETTE - reference, axis=1)
    candidates = np.flatnonzero(distance >= 120.0)
    if candidates.size == 0:
        return _PALETTE[int(np.argmax(distance))]
    return _PALETTE[int(rng.choice(candidates))]


def _scratch(
    img: np.ndarray, rng: np.random.Generator, category: str
) -> tuple[np.ndarray, np.ndarray]:
    mask = _curve(rng, img.shape[0])
    brightness = img[mask].mean()
    bright = brightness < 110 or (brightness <= 160 and rng.random() < 0.5)
    level = rng.uniform(225, 250) if bright else rng.uniform(5, 30)
    return 0.15 * img + 0.85 * level, mask


def _stain(
    img: np.ndarray, rng: np.random.Generator, category: str
) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, img.shape[0])
    colour = _far_colour(rng, img[mask].mean(axis=0))
    stained = 0.3 * img + 0.7 * colour
    weight = _ramp(mask, depth=max(1.5, 0.04 * img.shape[0]))[..., None]
    return (1 - weight) * img + weight * stained, mask


def _foreign(
    img: np.ndarray, rng: np.random.Generator, category: str
) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = _blob(rng, size)
    colour = _far_colour(rng, img[mask].mean(axis=0))
    if rng.random() < 0.5:
        others = [name for name in _TINTS if name != category]
        other = others[int(rng.integers(len(others)))]
        texture = _crop(_photo(other), rng, size, None)[..., None] / 255.0
        patch = colour * (0.45 + 0.75 * texture)
    else:
        patch = colour + rng.normal(0.0, 6.0, img.shape)
    return patch, mask


def _hole(
    img: np.ndarray, rng: np.random.Generator, category: str
) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, img.shape[0])
    dark = img * rng.uniform(0.05, 0.15) + rng.uniform(0, 8)
    weight = _ramp(mask, depth=1.5)[..., None]
    return (1 - weight) * img + weight * dark, mask


_PAINTERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "stain": _stain,
    "foreign": _foreign,
    "hole": _hole,
}


def _add_defect(
    clean: np.ndarray, defect: str, rng: np.random.Generator, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on uint8 (S, S, 3) `clean`; returns (image, bool mask).

    Pixels outside the mask are bit-identical to `clean`. Draws are retried until the mask
    covers MIN_DEFECT_AREA..MAX_DEFECT_AREA of the image and the change is clearly visible.
    """
    base = clean.astype(np.float64)
    for _ in range(_MAX_TRIES):
        painted, mask = _PAINTERS[defect](base, rng, category)
        area = mask.mean()
        if not MIN_DEFECT_AREA <= area <= MAX_DEFECT_AREA:
            continue
        out = np.where(mask[..., None], np.clip(np.rint(painted), 0, 255), base).astype(np.uint8)
        change = np.abs(out.astype(np.float64) - base)[mask].mean()
        if change >= MIN_DEFECT_CONTRAST:
            return out, mask
    raise RuntimeError(f"could not draw a {defect} defect in {_MAX_TRIES} tries")


def _prepare_folder(folder: Path) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"cannot write demo category to {folder}: it is a file")
        if not (folder / _MARKER).is_file() and any(folder.iterdir()):
            raise DataError(
                f"refusing to overwrite {folder}: it is not a demo dataset written by vtadl"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / _MARKER).write_text("written by vtadl.data.demo.make_demo_dataset; safe to delete\n")


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_category(
    folder: Path,
    name: str,
    rng: np.random.Generator,
    size: int,
    n_train: int,
    n_good: int,
    n_defect: int,
) -> None:
    _prepare_folder(folder)
    photo = _photo(name)
    for i in range(n_train):
        _save(
            _tint(_crop(photo, rng, size, "train"), name),
            folder / "train" / "good" / f"{i:03d}.png",
        )
    for i in range(n_good):
        _save(
            _tint(_crop(photo, rng, size, "test"), name), folder / "test" / "good" / f"{i:03d}.png"
        )
    for defect in DEFECT_TYPES:
        for i in range(n_defect):
            clean = _tint(_crop(photo, rng, size, "test"), name)
            image, mask = _add_defect(clean, defect, rng, name)
            _save(image, folder / "test" / defect / f"{i:03d}.png")
            _save(
                mask.astype(np.uint8) * 255, folder / "ground_truth" / defect / f"{i:03d}_mask.png"
            )


def _check_output(
    what: str, out: str | Path, n_train: int, n_test_good: int, n_test_defect: int
) -> Path:
    """`out` as a Path, once the image counts make a dataset and `out` can be a folder."""
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0 or n_test_good + n_test_defect < 1:
        raise DataError(
            f"{what} needs n_train >= 1 and at least one test image, got n_train={n_train}, "
            f"n_test_good={n_test_good}, n_test_defect={n_test_defect}"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{what} output {out} is a file, not a folder")
    return out


def make_demo_dataset(
    out: str | Path,
    categories: Iterable[str] | None = None,
    *,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_defect: int = 5,
) -> list[str]:
    """Write demo categories (default DEMO_CATEGORIES) as MVTec folders under `out`.

    `n_test_defect` images are written for each of the 4 DEFECT_TYPES. Each category's
    content depends only on `seed` and its name, so writing a subset gives the same files.
    Existing demo category folders are replaced; other existing folders are never touched.
    Returns the category names written.
    """
    names = list(dict.fromkeys(DEMO_CATEGORIES if categories is None else categories))
    unknown = [n for n in names if n not in _TINTS]
    if unknown:
        raise DataError(
            f"unknown demo categories {', '.join(unknown)} (known: {', '.join(DEMO_CATEGORIES)})"
        )
    if not names:
        raise DataError("no demo categories requested")
    if image_size < 32:
        raise DataError(f"demo image_size must be at least 32, got {image_size}")
    out = _check_output("demo", out, n_train, n_test_good, n_test_defect)
    for name in names:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        _write_category(out / name, name, rng, image_size, n_train, n_test_good, n_test_defect)
    logger.info(
        "wrote demo dataset to %s: %s (%d train, %d good + %d x %d defect test images each)",
        out,
        ", ".join(names),
        n_train,
        n_test_good,
        len(DEFECT_TYPES),
        n_test_defect,
    )
    return names
