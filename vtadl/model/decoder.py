"""Convolutional decoder: patch tokens -> image, for any image size divisible by the patch."""

from __future__ import annotations

import torch
from torch import nn


def _upsample_stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.GELU(),
    )


class ConvDecoder(nn.Module):
    """Doubles the token grid once per factor of two in the patch size, halving channels.

    An odd remainder of the patch size (e.g. 3 for patch 24) is closed by one nearest-neighbour
    upsampling before the output convolution. The output is in [0, 1], like the input images.
    """

    def __init__(self, *, dim: int, patch_size: int, out_chans: int, channels: int) -> None:
        super().__init__()
        stages, c, p = [], channels, patch_size
        while p % 2 == 0:
            stages.append(_upsample_stage(c, max(c // 2, 8)))
            c, p = max(c // 2, 8), p // 2
        self.proj = nn.Conv2d(dim, channels, kernel_size=1)
        self.stages = nn.Sequential(*stages)
        self.rest = nn.Upsample(scale_factor=p, mode="nearest") if p > 1 else nn.Identity()
        self.head = nn.Sequential(nn.Conv2d(c, out_chans, kernel_size=3, padding=1), nn.Sigmoid())

    def forward(self, tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, grid_size, n // grid_size)
        return self.head(self.rest(self.stages(self.proj(x))))
