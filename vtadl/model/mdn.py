"""Gaussian mixture density head over patch tokens."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Mixture(NamedTuple):
    """Diagonal Gaussian mixture per token: log weights (B, N, K), means and log variances
    (B, N, K, D). With position conditioning (or a kernel by position) the batch dimension
    is 1 and broadcasts; with global conditioning the token dimension is 1 too."""

    log_pi: torch.Tensor
    mu: torch.Tensor
    log_var: torch.Tensor


class MixtureDensityHead(nn.Module):
    """Predicts K diagonal Gaussians in token space for each patch token.

    `condition="token"` is the published design: the parameters are a linear function of the
    token itself, clamped at zero. `condition="position"` predicts them from a learned context
    per patch position, so each position has its own mixture that does not see the token it
    scores. `condition="global"` is one mixture for every token, wherever it sits, which
    suits products that are not aligned (textures, parts anywhere in the picture): its weights,
    means and log variances are parameters themselves (K * (2D + 1) numbers, not two D -> K*D
    maps), fitted by the loss or by EM after training (vtadl.scoring.mixture_fit). The log variances
    are raw; the loss decides how to bound them.
    """

    def __init__(
        self, *, dim: int, n_gaussians: int, num_patches: int, condition: str = "token"
    ) -> None:
        super().__init__()
        self.n_gaussians = n_gaussians
        self.condition = condition
        if condition == "global":
            self.logits = nn.Parameter(torch.zeros(n_gaussians))
            self.means = nn.Parameter(torch.randn(n_gaussians, dim))
            self.log_vars = nn.Parameter(torch.zeros(n_gaussians, dim))
            self.context = None
            return
        self.pi = nn.Linear(dim, n_gaussians)
        self.mu = nn.Linear(dim, n_gaussians * dim)
        self.log_var = nn.Linear(dim, n_gaussians * dim)
        nn.init.zeros_(self.log_var.weight)
        nn.init.zeros_(self.log_var.bias)
        self.context = (
            nn.Parameter(torch.randn(1, num_patches, dim)) if condition == "position" else None
        )

    def forward(self, tokens: torch.Tensor, grid: int = 0) -> Mixture:
        """The mixture of each token. A global head given one mixture per position (a kernel
        by position, vtadl.scoring.mixture_fit) holds the positions of every shifted grid in turn:
        `grid` picks the tokens' grid."""
        if self.condition == "global" and self.means.ndim == 3:
            n = tokens.shape[1]
            at = slice(grid * n, (grid + 1) * n)
            return Mixture(
                log_pi=torch.log_softmax(self.logits[at], dim=-1)[None],
                mu=self.means[at][None],
                log_var=self.log_vars[at][None],
            )
        if self.condition == "global":
            return Mixture(
                log_pi=torch.log_softmax(self.logits, dim=-1)[None, None],
                mu=self.means[None, None],
                log_var=self.log_vars[None, None],
            )
        cond = tokens.clamp(min=0) if self.context is None else self.context
        b, n, d = cond.shape
        shape = (b, n, self.n_gaussians, d)
        return Mixture(
            log_pi=torch.log_softmax(self.pi(cond), dim=-1),
            mu=self.mu(cond).view(shape),
            log_var=self.log_var(cond).view(shape),
        )
