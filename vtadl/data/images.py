"""Decoding images and ground-truth masks into numpy arrays.

Every decoding failure (missing, unreadable, truncated or corrupt file) becomes a one-line
`DataError` naming the file. EXIF orientation is deliberately ignored: masks carry no EXIF,
so rotating only the image would misalign the two.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vtadl.exceptions import DataError

logger = logging.getLogger(__name__)

_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _high_bit_to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or 255.0 < top <= 65535.0:
        arr = arr / 257.0
    elif img.mode == "F" and top <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_high_bit_to_uint8(img)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def _target_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    return h, w


def load_image(path: str | Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Decode to uint8 (H, W, 3) RGB; grey is replicated, alpha dropped, 16-bit scaled down.

    `size` (an int for a square, or (height, width)) resizes with PIL's antialiased bilinear.
    """
    path = Path(path)
    _check_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc
    if size is not None:
        h, w = _target_hw(size)
        if (rgb.height, rgb.width) != (h, w):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


def resize_rgb(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A decoded uint8 image resized exactly as `load_image(path, size)` resizes it."""
    h, w = _target_hw(size)
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.array(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the file header, without decoding the pixels."""
    path = Path(path)
    _check_file(path, "image")
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


# The one rule that turns a mask file into anomalous pixels, for training, evaluation, packing
# and `data check` alike. A mask with two values, one of them 0 (MVTec's and BTAD's 0/255, or
# 0/1), counts every nonzero pixel. Any other mask (grey levels from JPEG compression,
# anti-aliased edges, a soft brush) is binarised at MASK_THRESHOLD on the 8-bit scale, half
# the range, and a warning names it. Binarising rather than refusing: compression noise stays
# near 0 and 255, so the midpoint recovers the shape that was drawn, and JPEG masks are common
# enough that refusing them would turn away usable datasets; counting every nonzero pixel
# (the old rule) would grow each defect by its halo of compression noise.
MASK_THRESHOLD = 127
MASK_RULE = f"two values with 0: nonzero; otherwise > {MASK_THRESHOLD} of 255"
_VALUES_SHOWN = 4


def _mask_levels(img: Image.Image) -> np.ndarray:
    """A mask's values as one 2-D array: alpha dropped, colour channels by their maximum."""
    if img.mode == "P":
        img = img.convert("RGBA")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in _HIGH_BIT_MODES:
        return np.asarray(img)
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :-1] if img.mode in _ALPHA_MODES else arr
        arr = arr.max(axis=-1)
    return arr


def binarise_mask(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Anomalous pixels (bool (H, W)) by the rule above, and the mask's distinct values when
    it was not binary and the threshold decided (None otherwise)."""
    levels = _mask_levels(img)
    values = np.unique(levels)
    if len(values) == 1 or (len(values) == 2 and values[0] == 0):
        return levels != 0, None
    if img.mode in _HIGH_BIT_MODES:
        levels = _high_bit_to_uint8(Image.fromarray(levels))
    return levels > MASK_THRESHOLD, values


def not_binary_message(path: Path, values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:_VALUES_SHOWN])
    more = ", ..." if len(values) > _VALUES_SHOWN else ""
    return (
        f"mask {path} is not binary ({len(values)} values: {shown}{more}); "
        f"pixels above {MASK_THRESHOLD} of 255 count as anomalous"
    )


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a ground-truth mask to bool (H, W) by the rule of `binarise_mask`.

    With `shape` (the image's (height, width)), a mask of another size is a DataError.
    """
    path = Path(path)
    _check_file(path, "mask")
    try:
        with Image.open(path) as img:
            if shape is not None and (img.height, img.width) != tuple(shape):
                h, w = shape
                raise DataError(f"mask {path} is {img.height}x{img.width} but its image is {h}x{w}")
            img.load()
            mask, values = binarise_mask(img)
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read mask {path}: {_reason(exc)}") from exc
    if values is not None:
        logger.warning("%s", not_binary_message(path, values))
    return np.ascontiguousarray(mask, dtype=bool)
