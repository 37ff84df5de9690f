"""The mixture over the tokens fitted after training, as an object the scorer holds.

A run whose mixture is fitted after training (`train.mixture_fit: em` or `kernel`) keeps
its network as trained; the mixture is a `FittedMixture` of K Gaussians (`model.n_gaussians`,
resolved by `vtadl.config.gaussians`) beside it, which scores tokens (`nll`) and is saved
beside the checkpoint it was fitted for (`save`, `load_mixture`). Three kinds:

- `GaussianMixture` (em): K diagonal Gaussians fitted by expectation-maximisation.
- `KernelDensity` (kernel): K Gaussians of equal weight and one shared diagonal variance,
  centred on K training tokens that a greedy k-center coreset chose (`vtadl.scoring.coreset`),
  or on every token kept ("all"). Its NLL grows with the distance to the nearest centres, so
  a rare but normal patch seen in training scores low, as with a nearest neighbour.
- `PositionKernel` (kernel by position, `eval.kernel_scope: position`): one such kernel at each
  position of each shifted grid, of the training images' tokens there; K counts per position.
  It also keeps every training image's tokens, for the neighbour term of the image score
  (`vtadl.scoring.neighbours`).

Every kind's NLL is `vtadl.losses.mixture_nll` of its Gaussians (the kernel's computed with
less work per token-component pair), so a mixture fitted here scores exactly what a head
holding the same parameters would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from vtadl.losses import CHUNK_PAIRS, LOG_VAR_MAX, LOG_VAR_MIN, floored_logsumexp, mixture_nll
from vtadl.model import Mixture
from vtadl.scoring.neighbours import ImageNeighbours

_LOG_2PI = math.log(2 * math.pi)


class FittedMixture:
    """K Gaussians over the tokens, fitted after training. `fit` names the way ("em" or
    "kernel"), `n_gaussians` is K as used (per position for a kernel by position)."""

    fit: ClassVar[str]
    kind: ClassVar[str]

    @property
    def n_gaussians(self) -> int:
        raise NotImplementedError

    def nll(self, tokens: torch.Tensor, grid: int = 0) -> torch.Tensor:
        """-log density of every token of a batch on shifted grid `grid`: (B, L, D) -> (B, L)."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> FittedMixture:
        """This mixture on `device` (itself, if it is there already)."""
        if self.log_var.device == torch.device(device):
            return self
        return type(self)(**{k: torch.as_tensor(v).to(device) for k, v in self.arrays().items()})

    def neighbours(self) -> ImageNeighbours | None:
        """The training images' tokens by position, for the neighbour term, if kept."""
        return None

    def save(self, path: Path, **meta: int | str) -> None:
        """Write the mixture (and `meta`: what it was fitted for) to an .npz, atomically."""
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, kind=self.kind, **meta, **self.arrays())
        partial.replace(path)


def load_mixture(path: Path, device: torch.device | str = "cpu") -> tuple[FittedMixture, dict]:
    """A saved mixture and the meta it was saved with; OSError, KeyError or ValueError when
    the file is missing or not one."""
    with np.load(path) as data:
        kind = str(data["kind"])
        cls = next(c for c in (GaussianMixture, KernelDensity, PositionKernel) if c.kind == kind)
        fields = {k: data[k] for k in cls.FIELDS}
        meta = {k: data[k].item() for k in data.files if k not in cls.FIELDS and k != "kind"}
    return cls(**{k: torch.from_numpy(v).to(device) for k, v in fields.items()}), meta


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class GaussianMixture(FittedMixture):
    """K diagonal Gaussians: log weights (K,), means and log variances (K, D)."""

    fit, kind = "em", "em"
    FIELDS = ("log_pi", "mu", "log_var")

    def __init__(self, log_pi: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> None:
        self.log_pi, self.mu, self.log_var = log_pi.float(), mu.float(), log_var.float()

    @property
    def n_gaussians(self) -> int:
        return len(self.log_pi)

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, grid: int = 0) -> torch.Tensor:
        mix = Mixture(self.log_pi[None, None], self.mu[None, None], self.log_var[None, None])
        return mixture_nll(tokens.float(), mix)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "log_pi": _numpy(self.log_pi),
            "mu": _numpy(self.mu),
            "log_var": _numpy(self.log_var),
        }


class KernelDensity(FittedMixture):
    """K Gaussians of equal weight centred on training tokens (K, D), one shared diagonal
    log variance (D,).

    Its NLL is `mixture_nll`'s, computed with less work per token-component pair: tokens and
    centres are centred and whitened once (so the squared distance is |x|^2 - 2 x.m + |m|^2
    with no variances left in it), |x|^2, the log weight and the log determinant, the same
    for every component, are added after the log-sum instead of to every pair, and each
    chunk's log-sum works in place. The matrix product is then most of the cost, linear in K.
    """

    fit, kind = "kernel", "kernel"
    FIELDS = ("centres", "log_var")

    def __init__(self, centres: torch.Tensor, log_var: torch.Tensor) -> None:
        self.centres, self.log_var = centres.float(), log_var.float()
        log_var = self.log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)
        self.shift = self.centres.mean(0)
        self.scale = torch.exp(-0.5 * log_var)
        self.whitened = (self.centres - self.shift).mul_(self.scale)  # (K, D)
        self.neg_half_sq = -0.5 * self.whitened.square().sum(-1)  # (K,)
        k, d = self.whitened.shape
        self.const = -math.log(k) - 0.5 * (float(log_var.sum()) + d * _LOG_2PI)

    @property
    def n_gaussians(self) -> int:
        return len(self.centres)

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, grid: int = 0) -> torch.Tensor:
        x = tokens.float()
        flat = ((x.reshape(-1, x.shape[-1]) - self.shift) * self.scale).contiguous()
        step = max(1, CHUNK_PAIRS // max(1, len(flat)))
        total = None
        for a in range(0, len(self.whitened), step):
            # x.m - |m|^2 / 2 for this chunk of components, then its log-sum in place
            part = torch.addmm(self.neg_half_sq[a : a + step], flat, self.whitened[a : a + step].T)
            lse = floored_logsumexp(part, overwrite=True)
            total = lse if total is None else torch.logaddexp(total, lse)
        log_density = total - 0.5 * flat.square().sum(-1) + self.const
        return -log_density.view(x.shape[:-1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centres": _numpy(self.centres), "log_var": _numpy(self.log_var)}


class PositionKernel(FittedMixture):
    """A kernel at each position of each shifted grid: centres (P, K, D), P = grids x L
    (grid k's cell l at k * L + l), one shared log variance (D,); `tokens` (P, images, D),
    every training image's tokens there, when kept for the neighbour term (else empty)."""

    fit, kind = "kernel", "position_kernel"
    FIELDS = ("centres", "log_var", "tokens", "grids")

    def __init__(
        self,
        centres: torch.Tensor,
        log_var: torch.Tensor,
        tokens: torch.Tensor | None = None,
        grids: torch.Tensor | int = 1,
    ) -> None:
        self.centres, self.log_var = centres.float(), log_var.float()
        self.tokens = tokens if tokens is not None and tokens.numel() else None
        self.grids = int(grids)
        if self.centres.shape[0] % self.grids:
            raise ValueError(f"{self.centres.shape[0]} positions do not make {self.grids} grids")

    @property
    def n_gaussians(self) -> int:
        return self.centres.shape[1]

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, grid: int = 0) -> torch.Tensor:
        n = tokens.shape[1]
        at = slice(grid * n, (grid + 1) * n)
        mu = self.centres[at][None]  # (1, L, K, D)
        log_pi = torch.full(mu.shape[:-1], -math.log(self.n_gaussians), device=mu.device)
        return mixture_nll(tokens.float(), Mixture(log_pi, mu, self.log_var.expand(mu.shape)))

    def neighbours(self) -> ImageNeighbours | None:
        if self.tokens is None:
            return None
        return ImageNeighbours(self.tokens, self.tokens.shape[0] // self.grids)

    def arrays(self) -> dict[str, np.ndarray]:
        tokens = _numpy(self.tokens) if self.tokens is not None else np.zeros((0,), np.float32)
        return {
            "centres": _numpy(self.centres),
            "log_var": _numpy(self.log_var),
            "tokens": tokens,
            "grids": np.array(self.grids),
        }

    def to(self, device: torch.device | str) -> PositionKernel:
        if self.log_var.device == torch.device(device):
            return self
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PositionKernel(move(self.centres), move(self.log_var), move(self.tokens), self.grids)
