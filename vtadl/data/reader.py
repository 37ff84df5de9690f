"""Reading any sample's pixels, whether it is an image file or a record of an IDX file.

Training, evaluation and packing call these instead of `load_image` so that every dataset
(MNIST included) is read the same way. A record is converted exactly as `load_image` converts
a grey image file: replicated to RGB, then resized with PIL's bilinear filter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from vtadl.data.images import _target_hw, image_size, load_image, load_mask
from vtadl.data.mnist import read_idx
from vtadl.data.samples import Sample
from vtadl.exceptions import DataError


def _record(sample: Sample) -> np.ndarray:
    array = read_idx(sample.image)
    if not 0 <= sample.index < len(array):
        raise DataError(f"record {sample.index} is out of range in {sample.image} ({len(array)})")
    return array[sample.index]


def read_sample_image(sample: Sample, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB, resized to `size` (int or (height, width)) when given."""
    if sample.index is None:
        return load_image(sample.image, size)
    rgb = Image.fromarray(np.ascontiguousarray(_record(sample))).convert("RGB")
    if size is not None:
        h, w = _target_hw(size)
        if (rgb.height, rgb.width) != (h, w):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


def sample_image_size(sample: Sample) -> tuple[int, int]:
    """(height, width) at the original resolution, without decoding an image file's pixels."""
    if sample.index is None:
        return image_size(sample.image)
    h, w = _record(sample).shape[:2]
    return int(h), int(w)


def read_sample_mask(sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray:
    """bool (H, W) at the original resolution; all False for a sample without a mask."""
    if sample.mask is not None:
        return load_mask(sample.mask, shape)
    return np.zeros(shape if shape is not None else sample_image_size(sample), dtype=bool)


def relative_name(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root`, with POSIX separators."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def sample_name(sample: Sample, root: str | Path) -> str:
    """The sample's file relative to `root`, with `#<index>` appended for a record."""
    name = relative_name(sample.image, root)
    return name if sample.index is None else f"{name}#{sample.index}"
