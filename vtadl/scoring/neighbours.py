"""The distance from a whole image's tokens to the nearest training image's.

A kernel by position (`eval.kernel_scope: position`, vtadl.scoring.mixtures) scores each token
against the training tokens at its own place, so an image is normal when each of its places
resembles some training image there, possibly a different one at each place. A digit of
another class can pass that way (a 1 is an 8 with strokes missing, a 9 a 3 with its upper
left closed: at most single places some thin 8 or curled 3 looks the same). Here the image's
tokens at every position of every shifted grid are compared with each training image's at
the same positions, all at once: the Euclidean distance between the two concatenated token
sets, to the nearest training image. The training tokens are those the kernel by position
keeps beside its centres (every training image's, whatever its K), encoded once. With tiles
(`data.tile`), the kernel's training images are tiles, and so are the rows compared: each
tile's nearest training tile.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Training images whose distance is taken exactly (float64, on the CPU), the nearest by the
# quick float32 products: those can misorder only images whose distances differ by less
# than their rounding, a small fraction of the spread between training images.
CANDIDATES = 8
# Positions multiplied at once in the quick products (bounds a (positions, batch, images)
# temporary).
POSITIONS_PER_PRODUCT = 256


@contextmanager
def _full_float32():
    """float32 products at full precision (a CUDA run may have allowed TF32 for training)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class ImageNeighbours:
    """The training images' tokens by position (a kernel by position's means), ready to give
    the distance of whole images' tokens to the nearest of them."""

    def __init__(self, means: torch.Tensor, tokens_per_grid: int) -> None:
        # means: (S * L, images, D), offset k's grid cell l at k * L + l; used as they are,
        # not copied
        if means.ndim != 3 or means.shape[0] % tokens_per_grid:
            raise ValueError(
                f"means by position of shape {tuple(means.shape)} do not hold grids of "
                f"{tokens_per_grid} tokens"
            )
        self.tokens = means.detach()
        self.grids = means.shape[0] // tokens_per_grid
        # Products are taken of tokens centred at each position: the squared distance is a
        # small difference of large terms otherwise (tokens sit far from zero).
        self.centre = self.tokens.float().mean(1)  # (S * L, D)
        norms = torch.zeros(means.shape[1], dtype=torch.float64)
        for p, centre in zip(self.tokens, self.centre):
            norms += (p.double() - centre.double()).square().sum(1).cpu()
        self.norms = norms.float().to(means.device)  # |m_i - c|^2 over all positions

    @torch.no_grad()
    def distance(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """grids[k]: the tokens of a batch of images on grid k, (B, L, D) -> the distance of
        each image's tokens on all grids to the nearest training image's: (B,) float64, on
        the CPU. The nearest few are found by |x - c|^2 + |m - c|^2 - 2 (x - c).(m - c) in
        float32, c the training tokens' mean at each position; their distances are then
        taken exactly, as sums of squared differences in float64."""
        if len(grids) != self.grids:
            raise ValueError(f"{len(grids)} grids of tokens, the neighbours hold {self.grids}")
        x = torch.cat(grids, 1).float().to(self.tokens.device)  # (B, S * L, D)
        xc = (x - self.centre).transpose(0, 1)  # (S * L, B, D)
        dot = None
        with _full_float32():
            for start in range(0, xc.shape[0], POSITIONS_PER_PRODUCT):
                at = slice(start, start + POSITIONS_PER_PRODUCT)
                m = self.tokens[at].float()  # (P, images, D)
                # (x - c).(m - c) = (x - c).m - (x - c).c
                part = torch.bmm(xc[at], m.transpose(1, 2)).sum(0)
                part = part - (xc[at] * self.centre[at, None]).sum((0, 2))[:, None]
                dot = part if dot is None else dot + part
        sq = xc.square().sum((0, 2))[:, None] + self.norms[None] - 2 * dot
        nearest = sq.topk(min(CANDIDATES, sq.shape[1]), dim=1, largest=False).indices.cpu()
        # the candidates' exact squared distances (B, candidates), a slice of positions at a
        # time: sums of squared differences in float64
        x64 = x.cpu().double().transpose(0, 1)  # (S * L, B, D)
        exact = None
        for start in range(0, x64.shape[0], POSITIONS_PER_PRODUCT):
            at = slice(start, start + POSITIONS_PER_PRODUCT)
            near = self.tokens[at].cpu().double()[:, nearest]  # (P, B, candidates, D)
            part = (x64[at, :, None] - near).square().sum((0, 3))
            exact = part if exact is None else exact + part
        return exact.amin(1).sqrt()
