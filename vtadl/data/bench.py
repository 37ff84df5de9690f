"""A benchmark from real photographs that installed packages ship, harder than the demo data.

Photo categories (MVTec layout): each is one photograph (scikit-image, scikit-learn,
Matplotlib); every image, training or test, is a random window of a fixed region of it
(position and scale jitter, a left-right flip, small brightness and colour changes), resized
to a square. Test images carry one small, low-contrast defect each, drawn so that it keeps
to colours the region already has (a colour threshold does not find it). A defect's mask is
exactly the pixels it changed: outside the mask a test image is bit-identical to the clean
window.

Digits (MNIST IDX files): scikit-learn's 1,797 handwritten 8x8 digits, split per digit into
training and test records, for the one-class protocol of `vtadl.data.mnist`.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from vtadl.data.demo import (
    _MARKER,
    _blob,
    _check_output,
    _curve,
    _prepare_folder,
    _ramp,
    _save,
)
from vtadl.data.mnist import MNIST_FILES, write_idx
from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)

# name -> (photograph as "package:name", region of it as (top, left, bottom, right) fractions,
#          window (height, width) as fractions of that region at scale 1)
_SOURCES: dict[str, tuple[str, tuple[float, float, float, float], tuple[float, float]]] = {
    "coins": ("skimage:coins", (0.0, 0.0, 1.0, 1.0), (0.9, 0.72)),
    "coffee": ("skimage:coffee", (0.0, 0.1, 1.0, 0.8), (0.9, 0.9)),
    "flower": ("sklearn:flower.jpg", (0.0, 0.22, 0.96, 0.78), (0.9, 0.9)),
    "page": ("skimage:page", (0.0, 0.0, 1.0, 1.0), (0.6, 0.3)),
    "table": ("skimage:coffee", (0.02, 0.8, 1.0, 1.0), (0.27, 0.9)),
    "engine": ("skimage:stereo_motorcycle", (0.46, 0.42, 0.8, 0.66), (0.9, 0.9)),
    "wheel": ("skimage:stereo_motorcycle", (0.52, 0.67, 0.92, 0.93), (0.9, 0.9)),
    "badge": ("skimage:astronaut", (0.6, 0.08, 0.9, 0.46), (0.9, 0.9)),
    "fur": ("skimage:chelsea", (0.0, 0.27, 0.27, 0.73), (0.9, 0.4)),
    "flag": ("matplotlib:grace_hopper.jpg", (0.0, 0.0, 0.55, 0.26), (0.45, 0.9)),
}
# The categories in the sets they were added in: the first holds those of the figures recorded
# before 2026-12-07, the second widens the set that defaults are chosen on. A category's
# foreign pieces come from its own set and the sets before it, so that adding a set leaves
# the files of the earlier ones as they were.
BENCH_SETS: tuple[tuple[str, ...], ...] = (
    ("coins", "coffee", "flower", "page", "table"),
    ("engine", "wheel", "badge", "fur", "flag"),
)
BENCH_CATEGORIES: tuple[str, ...] = tuple(_SOURCES)
BENCH_DEFECTS: tuple[str, ...] = ("stain", "scratch", "patch", "hole", "foreign")
# A defect covers this fraction of the image, bounds included.
MIN_DEFECT_AREA = 0.002
MAX_DEFECT_AREA = 0.06
# Mean absolute change over the mask (grey levels, 3 channels) each defect must reach.
MIN_DEFECT_CONTRAST: dict[str, float] = {
    "stain": 12.0,
    "scratch": 20.0,
    "patch": 25.0,
    "hole": 25.0,
    "foreign": 20.0,
}
# At most this fraction of a defect's pixels may have a colour (16 levels per channel) that
# fewer than 1 in 10,000 pixels of the photograph have.
MAX_NOVEL_COLOUR = 0.1
_RARE = 1e-4
_SCALE_RANGE = (0.94, 1.06)
_MAX_TRIES = 200


@functools.cache
def _photograph(source: str) -> np.ndarray:
    """A photograph that a package ships ("skimage:coins", "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg") as read-only uint8 (H, W, 3); of a stereo pair, the left
    view."""
    package, _, name = source.partition(":")
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(name)
    elif package == "matplotlib":
        from matplotlib import cbook

        with cbook.get_sample_data(name) as file:
            photo = Image.open(file).convert("RGB")
    else:
        from skimage import data as skdata

        photo = getattr(skdata, name)()
        if isinstance(photo, tuple):
            photo = photo[0]
    photo = np.asarray(photo, dtype=np.uint8)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    photo.setflags(write=False)
    return photo


def _photo(name: str) -> np.ndarray:
    """The category's photograph as read-only uint8 (H, W, 3)."""
    return _photograph(_SOURCES[name][0])


@functools.cache
def _is_grey(name: str) -> bool:
    photo = _photo(name)
    return bool((photo == photo[..., :1]).all())


def colour_bins(image: np.ndarray) -> np.ndarray:
    """Each pixel's colour bin, 0..4095: 16 levels per channel."""
    q = np.asarray(image, dtype=np.int64) // 16
    return q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2]


@functools.cache
def _region(name: str) -> np.ndarray:
    """The pixels of the category's region of its photograph, (N, 3) uint8."""
    photo = _photo(name)
    top, left, bottom, right = _SOURCES[name][1]
    h, w = photo.shape[:2]
    return photo[round(top * h) : round(bottom * h), round(left * w) : round(right * w)].reshape(
        -1, 3
    )


@functools.cache
def _rare_colours(name: str) -> np.ndarray:
    """(4096,) bool: colour bins that are rare in the category's region."""
    counts = np.bincount(colour_bins(_region(name)), minlength=4096)
    return counts < _RARE * counts.sum()


@functools.cache
def _extremes(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean colours of the region's darkest and brightest 3% of pixels."""
    photo = _region(name).astype(np.float64)
    grey = photo.mean(axis=1)
    lo, hi = np.percentile(grey, [3, 97])
    return photo[grey <= lo].mean(axis=0), photo[grey >= hi].mean(axis=0)


def _window(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One clean image: a jittered window of the category's region, flipped and re-lit."""
    photo = _photo(name)
    _, (top, left, bottom, right), (fh, fw) = _SOURCES[name]
    height, width = photo.shape[:2]
    bh, bw = (bottom - top) * height, (right - left) * width
    scale = rng.uniform(*_SCALE_RANGE)
    h, w = min(bh, scale * fh * bh), min(bw, scale * fw * bw)
    y = top * height + rng.uniform(0, bh - h)
    x = left * width + rng.uniform(0, bw - w)
    img = Image.fromarray(photo).resize(
        (size, size), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h)
    )
    array = np.asarray(img, dtype=np.float64)
    if rng.random() < 0.5:
        array = array[:, ::-1]
    gain = rng.uniform(0.94, 1.06) * rng.uniform(0.98, 1.02, 3)
    if _is_grey(name):
        gain = np.full(3, gain.mean())
    return np.clip(np.rint(array * gain + rng.uniform(-5, 5)), 0, 255).astype(np.uint8)


def _small(draw: Callable[[np.random.Generator, int], np.ndarray], rng, size: int) -> np.ndarray:
    """A shape drawn on a half-size canvas placed at a random offset: a quarter of the area."""
    half = size // 2
    canvas = np.zeros((size, size), dtype=bool)
    y, x = (int(v) for v in rng.integers(0, size - half + 1, 2))
    canvas[y : y + half, x : x + half] = draw(rng, half)
    return canvas


def _towards_other_end(img: np.ndarray, shape: np.ndarray, name: str, split: float):
    """The photo's extreme colour on the other side of the region's brightness from `split`."""
    dark, light = _extremes(name)
    return dark if img[shape].mean() > split else light


def _stain(img: np.ndarray, rng: np.random.Generator, name: str):
    shape = _blob(rng, img.shape[0])
    target = _towards_other_end(img, shape, name, 110.0)
    weight = _ramp(shape, depth=max(1.5, 0.06 * img.shape[0]))[..., None]
    return img + weight * rng.uniform(0.15, 0.25) * (target - img), shape


def _scratch(img: np.ndarray, rng: np.random.Generator, name: str):
    shape = _small(_curve, rng, img.shape[0])
    target = _towards_other_end(img, shape, name, 170.0)
    return img + rng.uniform(0.35, 0.5) * (target - img), shape


def _patch(img: np.ndarray, rng: np.random.Generator, name: str):
    """A piece of another window of the same photograph, turned by a multiple of 90 degrees,
    whose mean colour differs from the covered piece's (texture alone can hide it)."""
    shape = _small(_blob, rng, img.shape[0])
    for _ in range(20):
        other = np.rot90(_window(name, rng, img.shape[0]), int(rng.integers(1, 4)))
        if np.abs(other[shape].mean(axis=0) - img[shape].mean(axis=0)).mean() >= 15:
            break
    return other.astype(np.float64), shape


def _hole(img: np.ndarray, rng: np.random.Generator, name: str):
    """A plain colour found in the category's region, far enough from the defect's place."""
    shape = _small(_blob, rng, img.shape[0])
    pixels = _region(name)
    region = img[shape].mean(axis=0)
    for _ in range(50):
        colour = pixels[int(rng.integers(len(pixels)))].astype(np.float64)
        if np.abs(colour - region).mean() >= 30:
            break
    fill = colour + rng.normal(0.0, 1.5, img.shape)
    weight = _ramp(shape, depth=1.5)[..., None]
    return (1 - weight) * img + weight * fill, shape


def _foreign_sources(name: str) -> list[str]:
    """The categories a foreign piece on `name` is cut from: its own set and the earlier ones."""
    end = next(i for i, group in enumerate(BENCH_SETS) if name in group) + 1
    return [n for group in BENCH_SETS[:end] for n in group if n != name]


def _foreign(img: np.ndarray, rng: np.random.Generator, name: str):
    """A piece of another photograph, its colours shifted to the region's, a little darker
    or brighter."""
    shape = _small(_blob, rng, img.shape[0])
    others = _foreign_sources(name)
    piece = _window(others[int(rng.integers(len(others)))], rng, img.shape[0])
    piece = piece.astype(np.float64)
    region = img[shape]
    spread = max(float(region.std()), 12.0) / max(float(piece[shape].std()), 1.0)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(12, 25)
    return (piece - piece[shape].mean(axis=0)) * spread + region.mean(axis=0) + shift, shape


_PAINTERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "stain": _stain,
    "scratch": _scratch,
    "patch": _patch,
    "hole": _hole,
    "foreign": _foreign,
}


def add_defect(
    clean: np.ndarray, defect: str, rng: np.random.Generator, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one `defect` on uint8 (S, S, 3) `clean` of category `name`: (image, bool mask).

    The mask is the largest 8-connected region of changed pixels; any other change is undone,
    so the mask is exactly where the image differs from `clean`. Draws are retried until the
    area, the contrast and the colours are within the module's bounds.
    """
    base = clean.astype(np.float64)
    for _ in range(_MAX_TRIES):
        painted, shape = _PAINTERS[defect](base, rng, name)
        out = np.where(shape[..., None], np.clip(np.rint(painted), 0, 255), base).astype(np.uint8)
        labels, n = ndimage.label((out != clean).any(axis=2), structure=np.ones((3, 3)))
        if n == 0:
            continue
        mask = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        out = np.where(mask[..., None], out, clean)
        if not MIN_DEFECT_AREA <= mask.mean() <= MAX_DEFECT_AREA:
            continue
        if np.abs(out.astype(np.float64) - base)[mask].mean() < MIN_DEFECT_CONTRAST[defect]:
            continue
        if _rare_colours(name)[colour_bins(out[mask])].mean() > MAX_NOVEL_COLOUR:
            continue
        return out, mask
    raise RuntimeError(f"could not draw a {defect} defect on {name} in {_MAX_TRIES} tries")


def _write_category(
    folder: Path, name: str, rng: np.random.Generator, size: int, counts: tuple[int, int, int]
) -> None:
    n_train, n_good, n_defect = counts
    _prepare_folder(folder)
    (folder / _MARKER).write_text("written by vtadl.data.bench; safe to delete\n")
    for i in range(n_train):
        _save(_window(name, rng, size), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _save(_window(name, rng, size), folder / "test" / "good" / f"{i:03d}.png")
    for defect in BENCH_DEFECTS:
        for i in range(n_defect):
            image, mask = add_defect(_window(name, rng, size), defect, rng, name)
            _save(image, folder / "test" / defect / f"{i:03d}.png")
            mask_path = folder / "ground_truth" / defect / f"{i:03d}_mask.png"
            _save(mask.astype(np.uint8) * 255, mask_path)


def make_photo_benchmark(
    out: str | Path,
    categories: Iterable[str] | None = None,
    *,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect: int = 4,
) -> list[str]:
    """Write photo categories (default BENCH_CATEGORIES) as MVTec folders under `out`.

    `n_test_defect` images are written for each of BENCH_DEFECTS. A category's files depend
    only on `seed`, its name and the sizes, so writing a subset gives the same files.
    Returns the category names written.
    """
    names = list(dict.fromkeys(BENCH_CATEGORIES if categories is None else categories))
    unknown = [n for n in names if n not in _SOURCES]
    if unknown or not names:
        raise DataError(
            f"unknown benchmark categories {', '.join(unknown) or '(none given)'} "
            f"(known: {', '.join(BENCH_CATEGORIES)})"
        )
    if image_size < 64:
        raise DataError(f"benchmark image_size must be at least 64, got {image_size}")
    out = _check_output("benchmark", out, n_train, n_test_good, n_test_defect)
    for name in names:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        counts = (n_train, n_test_good, n_test_defect)
        _write_category(out / name, name, rng, image_size, counts)
    logger.info("wrote photo benchmark to %s: %s", out, ", ".join(names))
    return names


def make_digits_benchmark(
    out: str | Path, *, seed: int = 0, test_fraction: float = 0.4
) -> dict[str, int]:
    """Write scikit-learn's handwritten digits as the four MNIST IDX files under `out`.

    Each digit's images are split at random (by `seed`): `test_fraction` of them become test
    records, the rest training records; records keep the dataset's order. Pixel values 0-16
    are scaled to 0-255; images stay 8x8. Returns the number of records per split.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"benchmark output {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng([seed, zlib.crc32(b"digits")])
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[: round(len(members) * test_fraction)]] = True
    for split, keep in (("train", ~test), ("test", test)):
        write_idx(out / MNIST_FILES[f"{split}_images"], images[keep])
        write_idx(out / MNIST_FILES[f"{split}_labels"], labels[keep])
    logger.info("wrote digits benchmark to %s: %d train, %d test", out, (~test).sum(), test.sum())
    return {"train": int((~test).sum()), "test": int(test.sum())}
