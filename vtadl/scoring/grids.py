"""Shifted patch grids: a grid of stride p sees a defect only in whole p x p cells, so an
image is also encoded shifted by multiples of p / shifts pixels, and the shifted grids are
put back together into one grid of stride p / shifts (`nll_map`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def grid_offsets(patch: int, shifts: int) -> list[tuple[int, int]]:
    """The (dy, dx) pixel offsets of the `shifts` x `shifts` patch grids, (0, 0) first."""
    steps = [round(i * patch / shifts) for i in range(shifts)]
    return [(dy, dx) for dy in steps for dx in steps]


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, C, H, W) images moved down by dy and right by dx pixels (reflected at the top and
    left border), so the patch in cell i of the moved image covers rows p*i - dy onwards."""
    if not (dy or dx):
        return x
    h, w = x.shape[-2:]
    return F.pad(x, (dx, 0, dy, 0), mode="reflect")[..., :h, :w]


def nll_map(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, S, g, g) patch scores on S = shifts^2 shifted grids -> (N, H, W).

    The grids interleave into one grid of stride p / shifts (p = H / g): the token in cell i
    of the grid shifted by o = j * p / shifts pixels covers pixels [p*i - o, p*i - o + p),
    centred at p*i - o + p/2, which is fine cell shifts*i + shifts-1-j. That grid is
    upsampled bilinearly, which puts fine cell m at (m + 1/2) * stride, and moved by the
    (p - stride) / 2 pixels between that and the cell's true centre (edge values repeated).
    Averaging the upsampled grids instead would blur a defect that one grid sees whole and
    the others only in part.
    """
    n, s, g, _ = grids.shape
    h, w = size
    shifts = round(s**0.5)
    fine = np.empty((n, g * shifts, g * shifts), np.float32)
    step = (h // g) // shifts
    for k, (dy, dx) in enumerate(grid_offsets(h // g, shifts)):
        fine[:, shifts - 1 - dy // step :: shifts, shifts - 1 - dx // step :: shifts] = grids[:, k]
    up = F.interpolate(torch.from_numpy(fine)[:, None], size=size, mode="bilinear")
    c = (h // g - step) // 2
    if c:
        up = F.pad(up[..., c:, c:], (0, c, 0, c), mode="replicate")
    return up[:, 0].numpy()
