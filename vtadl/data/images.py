"""Decoding ground-truth masks into numpy arrays, and image headers; images themselves are
decoded by `vtadl.inference.images` (re-exported here).

Every decoding failure (missing, unreadable, truncated or corrupt file) becomes a one-line
`DataError` naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from vtadl.exceptions import DataError
from vtadl.inference.images import (
    _DECODE_ERRORS,
    _HIGH_BIT_MODES,
    _check_file,
    _high_bit_to_uint8,
    _reason,
    _target_hw,
    load_image,
    resize_rgb,
)

__all__ = ["_DECODE_ERRORS", "_reason", "_target_hw", "load_image", "resize_rgb"]

logger = logging.getLogger(__name__)

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


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
