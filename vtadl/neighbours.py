"""The distance from a whole image's tokens to the nearest training image's.

A kernel by position (`eval.kernel_scope: position`, vtadl.mixture_fit) scores each token
against the training tokens at its own place, so an image is normal when each of its places
resembles some training image there, possibly a different one at each place. A digit of
another class can pass that way (a 1 is an 8 with strokes missing, a 9 a 3 with its upper
left closed: at most single places some thin 8 or curled 3 looks the same). Here the image's
tokens at every position of every shifted grid are compared with each training image's at
the same positions, all at once: the Euclidean distance between the two concatenated token
sets, to the nearest training image. The training tokens are the kernel's own means, held by
position, so nothing is encoded or stored twice.
"""

from __future__ import annotations

import torch

from vtadl.model import VTADL

# Training images whose distance is taken exactly, the nearest by the quick expansion: its
# rounding (a relative 1e-7 of |x|^2) cannot reorder images farther apart than that.
CANDIDATES = 4


class ImageNeighbours:
    """The training images' tokens by position (a kernel by position's means), ready to give
    the distance of whole images' tokens to the nearest of them."""

    def __init__(self, means: torch.Tensor, tokens_per_grid: int) -> None:
        # means: (S * L, images, D), offset k's grid cell l at k * L + l
        if means.ndim != 3 or means.shape[0] % tokens_per_grid:
            raise ValueError(
                f"means by position of shape {tuple(means.shape)} do not hold grids of "
                f"{tokens_per_grid} tokens"
            )
        self.tokens = means.detach().float()  # as given, for the exact distances
        # Centred at each position for the quick expansion (the squared distance is a small
        # difference of large terms otherwise: tokens sit far from zero)
        self.centre = self.tokens.mean(1)  # (S * L, D)
        self.means = self.tokens - self.centre[:, None]
        self.tokens_per_grid = tokens_per_grid
        self.grids = means.shape[0] // tokens_per_grid
        # |m_i|^2 of each training image on each grid: (S, images)
        self.norms = torch.stack(
            [self._grid(k).square().sum((0, 2)) for k in range(self.grids)]
        ).double()

    @classmethod
    def of(cls, model: VTADL) -> ImageNeighbours | None:
        """The model's kernel by position as neighbours, or None when its head holds another
        kind of mixture."""
        means = model.mdn.means
        if model.mdn.condition != "global" or means.ndim != 3:
            return None
        return cls(means, model.grid_size**2)

    def _cells(self, k: int) -> slice:
        return slice(k * self.tokens_per_grid, (k + 1) * self.tokens_per_grid)

    def _grid(self, k: int) -> torch.Tensor:
        return self.means[self._cells(k)]

    @torch.no_grad()
    def distance(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """grids[k]: the tokens of a batch of images on grid k, (B, L, D) -> the distance of
        each image's tokens on all grids to the nearest training image's: (B,) float64.
        The squared distances to every training image are summed over the grids as
        |x|^2 + |m|^2 - 2 x.m (centred tokens, products in float32), which finds the
        nearest few; their distances are then taken exactly, as sums of squared
        differences in float64."""
        if len(grids) != self.grids:
            raise ValueError(f"{len(grids)} grids of tokens, the neighbours hold {self.grids}")
        x = torch.cat(grids, 1).float().to(self.means.device)  # (B, S * L, D)
        total = None
        for k in range(self.grids):
            xk = x[:, self._cells(k)] - self.centre[self._cells(k)]
            dot = torch.einsum("bld,lnd->bn", xk, self._grid(k)).double()
            sq = xk.square().sum((1, 2)).double()[:, None] + self.norms[k][None] - 2 * dot
            total = sq if total is None else total + sq
        nearest = total.topk(min(CANDIDATES, total.shape[1]), dim=1, largest=False).indices
        exact = [
            (x[b, :, None].double() - self.tokens[:, near].double()).square().sum((0, 2)).min()
            for b, near in enumerate(nearest)
        ]
        return torch.stack(exact).sqrt()
