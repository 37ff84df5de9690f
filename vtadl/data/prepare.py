"""Splitting an index of samples, and images as the model consumes them.

The validation split is held out from the normal training images with a seeded draw; the
test split is left to evaluation, which reads it at the original resolution for exact
metrics. `vtadl.data.source` builds on these for files and packs alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from vtadl.data.images import load_image
from vtadl.data.samples import Sample
from vtadl.exceptions import DataError


@dataclass(frozen=True)
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def split_samples(samples: Sequence[Sample], val_fraction: float, seed: int) -> Splits:
    """Hold out `val_fraction` of the normal training images (at least one) for validation."""
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    if len(train) < 2:
        raise DataError(
            f"need at least 2 training images (one is held out for validation), found {len(train)}"
        )
    n_val = min(max(1, round(len(train) * val_fraction)), len(train) - 1)
    order = np.random.default_rng(seed).permutation(len(train))
    val_idx = set(order[:n_val].tolist())
    return Splits(
        train=[s for i, s in enumerate(train) if i not in val_idx],
        val=[s for i, s in enumerate(train) if i in val_idx],
        test=test,
    )


def load_arrays(samples: Sequence[Sample], size: int) -> np.ndarray:
    """Decode and resize images to (N, size, size, 3) uint8."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, s in enumerate(samples):
        out[i] = load_image(s.image, size)
    return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch (B, C, H, W) as the model takes it: float in [0, 1]."""
    return images.float().div_(255)


class ImageArray(Dataset):
    """uint8 (N, H, W, C) images -> uint8 tensors (C, H, W), converted by `to_float`."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)
