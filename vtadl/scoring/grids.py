"""Shifted patch grids: a grid of stride p sees a defect only in whole p x p cells, so an
image is also encoded shifted by multiples of p / shifts pixels (`shift_images`), and the
shifted grids are put back together into one grid of stride p / shifts
(`vtadl.inference.maps.nll_map`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtadl.inference.maps import grid_offsets, nll_map

__all__ = ["grid_offsets", "nll_map", "shift_images"]


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, C, H, W) images moved down by dy and right by dx pixels (reflected at the top and
    left border), so the patch in cell i of the moved image covers rows p*i - dy onwards."""
    if not (dy or dx):
        return x
    h, w = x.shape[-2:]
    return F.pad(x, (dx, 0, dy, 0), mode="reflect")[..., :h, :w]
