"""The raw scores of model inputs: the mixture NLL of every patch on every shifted grid, the
squared reconstruction error of every pixel and, when asked for, the distance of an input's
tokens to the nearest training image's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vtadl.config import Config
from vtadl.data.prepare import to_float
from vtadl.devices import autocast
from vtadl.inference.maps import Raw
from vtadl.losses import MDN_LOSS_FUNCTIONS
from vtadl.model import VTADL, Mixture
from vtadl.scoring.grids import grid_offsets, shift_images
from vtadl.scoring.mixtures import FittedMixture
from vtadl.scoring.neighbours import ImageNeighbours


@torch.no_grad()
def patch_nll(
    model: VTADL,
    x: torch.Tensor,
    config: Config,
    grid: int = 0,
    mixture: FittedMixture | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch NLL on the token grid (B, g, g), the squared reconstruction error averaged
    over channels (B, H, W), and the tokens (B, L, D). `grid`: the index of x's shifted
    grid; `mixture`: the mixture fitted after training, else the model's trained head
    scores the tokens."""
    (nll,), rec, tokens = patch_nll_each(model, x, config, grid, [mixture])
    return nll, rec, tokens


@torch.no_grad()
def patch_nll_each(
    model: VTADL,
    x: torch.Tensor,
    config: Config,
    grid: int,
    mixtures: Sequence[FittedMixture | None],
    reconstruct: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """`patch_nll` under each of `mixtures` from one forward pass: the NLL grid of each,
    the reconstruction error and the tokens. Without `reconstruct`, where every mixture was
    fitted after training, only the encoder runs (the decoder and the trained head are not
    needed) and the reconstruction error is None."""
    if not reconstruct and all(mixture is not None for mixture in mixtures):
        rec, head = None, None
        with autocast(x.device, config.train.precision):
            tokens = model.encode(x)
    else:
        with autocast(x.device, config.train.precision):
            out = model(x, grid=grid)
        tokens, head = out.tokens, out.mixture
        rec = (out.reconstruction.float() - x).square().mean(1)
    g, clean = model.grid_size, tokens.float()
    nlls = []
    for mixture in mixtures:
        if mixture is not None:
            nll = mixture.nll(clean, grid)
        else:
            trained = Mixture(*(t.float() for t in head))
            nll = MDN_LOSS_FUNCTIONS[config.train.mdn_loss](clean, trained)
        nlls.append(nll.view(-1, g, g))
    return nlls, rec, tokens


@torch.no_grad()
def raw_scores(
    model: VTADL,
    images: np.ndarray,
    config: Config,
    device: torch.device,
    batch_size: int = 8,
    mixture: FittedMixture | None = None,
    neighbours: ImageNeighbours | None = None,
) -> Raw:
    """uint8 (N, H, W, 3) images at model size -> the mixture NLL of every patch (N, S, g, g)
    and the squared reconstruction error per pixel (N, H, W); given `neighbours`, also each
    image's distance to the nearest training image in token space (N,).

    S = `eval.grid_shifts`^2 patch grids: a grid of stride p sees a defect only in whole
    p x p cells, so the image is also scored shifted by multiples of p/shifts pixels (reflect
    padding at the border; offsets from `grid_offsets`), which samples the NLL on a finer
    grid at S forward passes. `nll_map` puts the grids back together.
    """
    return raw_scores_each(model, images, config, device, [(mixture, neighbours)], batch_size)[0]


@torch.no_grad()
def raw_scores_each(
    model: VTADL,
    images: np.ndarray,
    config: Config,
    device: torch.device,
    scorings: Sequence[tuple[FittedMixture | None, ImageNeighbours | None]],
    batch_size: int = 8,
) -> list[Raw]:
    """`raw_scores` of the same images under each (mixture, neighbours) of `scorings`, from
    one forward pass per batch and grid: several mixtures fitted to one checkpoint (a search
    over K) cost the encoding once."""
    model.eval()
    nll, rec, near = [[] for _ in scorings], [], [[] for _ in scorings]
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        nlls, r, nears = batch_scores(model, x, config, scorings)
        rec.append(r.cpu().numpy())
        for j, (n, d) in enumerate(zip(nlls, nears)):
            nll[j].append(n.cpu().numpy())
            if d is not None:
                near[j].append(d.cpu().numpy())
    rec = np.concatenate(rec)
    return [
        Raw(np.concatenate(n), rec, np.concatenate(d) if d else None) for n, d in zip(nll, near)
    ]


def batch_scores(
    model: VTADL,
    images: torch.Tensor,
    config: Config,
    scorings: Sequence[tuple[FittedMixture | None, ImageNeighbours | None]],
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor | None]]:
    """One batch of uint8 images (B, H, W, 3) on the model's device -> for each scoring its
    NLL grids (B, S, g, g), the reconstruction error (B, H, W), and for each scoring with
    neighbours the distance (B,) (else None). A function of tensors only (no loop over the
    batch), so that a run can be exported as a traced graph (`vtadl.export`)."""
    x = to_float(images).permute(0, 3, 1, 2)
    offsets = grid_offsets(config.model.patch_size, config.eval.grid_shifts)
    mixtures = [mixture for mixture, _ in scorings]
    compared = any(neighbours is not None for _, neighbours in scorings)
    grids, tokens, rec = [[] for _ in scorings], [], None
    for k, (dy, dx) in enumerate(offsets):
        shifted = shift_images(x, dy, dx)
        # the reconstruction error is read on the unshifted grid only
        ns, r, t = patch_nll_each(model, shifted, config, k, mixtures, not (dy or dx))
        for each, n in zip(grids, ns):
            each.append(n)
        if compared:  # held for the batch only when they are compared
            tokens.append(t)
        if not (dy or dx):
            rec = r
    nlls = [torch.stack(each, 1) for each in grids]
    nears = [n.distance(tokens) if n is not None else None for _, n in scorings]
    return nlls, rec, nears
