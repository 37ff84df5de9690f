"""Decoding an image file into the uint8 RGB array the model reads, and resizing it: the one
way of reading images for training, evaluation and an exported detector alike (numpy and
Pillow only).

Every decoding failure (missing, unreadable, truncated or corrupt file) becomes a one-line
`DataError` naming the file. EXIF orientation is deliberately ignored: masks carry no EXIF,
so rotating only the image would misalign the two.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vtadl.exceptions import DataError

_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


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
