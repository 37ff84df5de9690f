"""Fitting the mixture over the tokens after training (`train.mixture_fit: em` or `kernel`).

With a global mixture (`model.mdn_condition: global`) the head's outputs do not depend on the
image: they are K weights, means and variances shared by every token, and stochastic gradient
descent on noisy tokens fits them poorly (measured on real photographs: benchmarks/RESULTS.md).
Here K Gaussians (vtadl.scoring.mixtures) are fitted to the clean tokens of the training
images once per checkpoint, and cached in the run folder beside it:

- `em`: by expectation-maximisation to convergence (scikit-learn's GaussianMixture,
  diagonal covariances).
- `kernel`: K Gaussians of equal weight and one diagonal variance, `KERNEL_BANDWIDTH` times
  the tokens' spread per dimension, centred on K training tokens chosen by a greedy k-center
  coreset (`vtadl.scoring.coreset`): the tokens that cover the others best, rare normal
  patches included, where EM's K would trade those for the common ones. "all" keeps every
  token. The coreset's order is nested, so the fits of several K select once.

Tokens are taken at the grid shifts the run is scored at (`eval.grid_shifts`): a shifted
grid's tokens are then tokens the mixture has seen the like of.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from vtadl.data.prepare import to_float
from vtadl.data.source import Source
from vtadl.model import VTADL
from vtadl.scoring.coreset import greedy_order, greedy_order_by_position
from vtadl.scoring.grids import grid_offsets, shift_images
from vtadl.scoring.mixtures import (
    FittedMixture,
    GaussianMixture,
    KernelDensity,
    PositionKernel,
    load_mixture,
)

log = logging.getLogger(__name__)

# Tokens for an EM fit: at most this many, drawn evenly from the training images; enough for
# K in the hundreds at any token width, and a fit of a minute or less on a CPU.
MAX_TOKENS = 50_000
# Tokens a kernel mixture chooses its centres from (and keeps, for K "all"): its density is
# only as good as its cover of the normal tokens, so every one up to this many (a category
# of 300 images on 4 x 4 grids of 8 x 8 tokens fits whole). Measured on real photographs:
# 50,000 drawn at random of the 147,000 tokens lost .14 in the sum of the three mean
# metrics (benchmarks/RESULTS.md); a coreset chooses instead of drawing.
MAX_KERNEL_TOKENS = 320_000
# A kernel by position holds one Gaussian per training image at each position: at most
# this many images (each test token meets only its own position's, so more are affordable).
MAX_POSITION_IMAGES = 2000
# Added to every variance (token units; tokens have a spread near 1 per dimension): keeps a
# component that owns a handful of tokens from collapsing onto them.
REG_COVAR = 1e-4
# The kernel's standard deviation per dimension, in units of the tokens' own spread there.
KERNEL_BANDWIDTH = 0.3
CACHE = "mixture_{checkpoint}{shifts}_{fit}{k}.npz"


@torch.no_grad()
def training_tokens(
    model: VTADL,
    source: Source,
    device: torch.device,
    seed: int,
    shifts: int = 1,
    batch_size: int = 8,
    by_position: bool = False,
    most: int | None = None,
) -> np.ndarray:
    """The clean (noise-free) tokens of every training image (every tile), at each of the
    `shifts` x `shifts` grid offsets: (n, D) float32, at most `most` (default MAX_TOKENS) of
    them, drawn evenly. `by_position`: (images, S * L, D) instead, every token kept in its
    place (offset k's grid cell l at k * L + l), at most MAX_POSITION_IMAGES images."""
    model.eval()
    out: list[np.ndarray] = []

    def encode(batch: np.ndarray) -> None:
        x = to_float(torch.from_numpy(batch).to(device)).permute(0, 3, 1, 2)
        grids = [
            model.encode(shift_images(x, dy, dx))
            for dy, dx in grid_offsets(x.shape[-1] // model.grid_size, shifts)
        ]
        out.append(torch.cat(grids, 1).float().cpu().numpy())  # (B, S * L, D)

    pending: list[np.ndarray] = []
    for i in range(len(source.items("train"))):
        pending.extend(source.model_input("train", i)[0])  # one image, or its tiles
        while len(pending) >= batch_size:
            encode(np.stack(pending[:batch_size]))
            del pending[:batch_size]
    if pending:
        encode(np.stack(pending))
    tokens = np.concatenate(out)
    if by_position:
        return _draw(tokens, MAX_POSITION_IMAGES, seed)
    flat, most = tokens.reshape(-1, tokens.shape[-1]), most or MAX_TOKENS
    if len(flat) > most:
        log.info(
            "the mixture is built from %d of the %d training tokens, drawn at random",
            most,
            len(flat),
        )
    return _draw(flat, most, seed)


def _draw(rows: np.ndarray, most: int, seed: int) -> np.ndarray:
    """At most `most` of the rows, drawn at random and kept in order."""
    if len(rows) <= most:
        return rows
    keep = np.random.default_rng(seed).choice(len(rows), most, replace=False)
    return rows[np.sort(keep)]


def fit_em(tokens: np.ndarray, k: int, seed: int) -> GaussianMixture:
    """K diagonal Gaussians fitted to `tokens` (n, D) by EM (at most one per token)."""
    gm = SkGaussianMixture(
        n_components=min(k, len(tokens)),
        covariance_type="diag",
        reg_covar=REG_COVAR,
        max_iter=200,
        random_state=seed,
    ).fit(tokens)
    if not gm.converged_:
        log.warning("the mixture's EM fit did not converge in %d iterations", gm.max_iter)
    return GaussianMixture(
        torch.from_numpy(np.log(np.maximum(gm.weights_, 1e-30)).astype(np.float32)),
        torch.from_numpy(gm.means_.astype(np.float32)),
        torch.from_numpy(np.log(gm.covariances_).astype(np.float32)),
    )


def kernel_log_var(tokens: np.ndarray, bandwidth: float = KERNEL_BANDWIDTH) -> torch.Tensor:
    """The kernel's one diagonal log variance: (bandwidth x the tokens' spread)^2 per
    dimension, plus REG_COVAR; the spread is over every token, however many are centres."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    return torch.from_numpy(np.log((bandwidth * flat.std(0)) ** 2 + REG_COVAR).astype(np.float32))


def fit_kernel(tokens: np.ndarray, k: int | str, order: np.ndarray | None = None) -> KernelDensity:
    """A kernel of K centres on `tokens` (n, D): the first K of the coreset `order` (every
    token for "all", or when K >= n)."""
    centres = tokens if k == "all" or k >= len(tokens) else tokens[np.sort(order[:k])]
    return KernelDensity(torch.from_numpy(np.ascontiguousarray(centres)), kernel_log_var(tokens))


def fit_position_kernel(
    tokens: np.ndarray, k: int | str, grids: int, order: np.ndarray | None = None
) -> PositionKernel:
    """A kernel at each position of `tokens` (images, P, D), its K centres the first K of
    that position's coreset `order` (P, >= K); every image's tokens are kept beside them."""
    by_position = torch.from_numpy(np.ascontiguousarray(tokens.transpose(1, 0, 2)))
    if k == "all" or k >= len(tokens):
        centres = by_position
    else:
        keep = torch.from_numpy(np.sort(order[:, :k], axis=1))
        centres = torch.gather(by_position, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    return PositionKernel(centres.contiguous(), kernel_log_var(tokens), by_position, grids)


def fitted_mixtures(
    model: VTADL,
    run_dir: Path,
    checkpoint: str,
    epoch: int,
    source: Source,
    device: torch.device,
    seed: int,
    how: str,
    ks: list[int | str],
    shifts: int = 1,
    by_position: bool = False,
) -> list[FittedMixture]:
    """The mixtures of a run's checkpoint fitted `how` ("em" or "kernel") with each K of
    `ks`, to the training tokens at `shifts` grid shifts (a kernel `by_position`: one per
    position). A fit comes from the cache beside the checkpoint when it was made for this
    epoch, else it is made now and cached (a kernel of every token, or by position, is taken
    afresh instead: it is the tokens themselves, seconds to encode). The training tokens are
    encoded once, and a kernel's coreset is selected once, at the largest K."""
    paths = [_cache_path(run_dir, checkpoint, shifts, how, k, by_position) for k in ks]
    found = [_cached(path, epoch) for path in paths]
    if all(m is not None for m in found):
        return [m.to(device) for m in found]
    tic = time.perf_counter()
    if how == "em":
        tokens = training_tokens(model, source, device, seed, shifts)
        made = [fit_em(tokens, k, seed) for k, m in zip(ks, found) if m is None]
    else:
        tokens = training_tokens(
            model, source, device, seed, shifts, by_position=by_position, most=MAX_KERNEL_TOKENS
        )
        made = _kernels(
            tokens, [k for k, m in zip(ks, found) if m is None], seed, shifts**2, by_position
        )
    log.info(
        "fitted %s with %s Gaussians to the training tokens in %.1f s",
        how,
        "/".join(str(m.n_gaussians) for m in made),
        time.perf_counter() - tic,
    )
    fresh = iter(made)
    out = []
    for path, m in zip(paths, found):
        if m is None:
            m = next(fresh)
            if path is not None:
                m.save(path, epoch=epoch)
        out.append(m.to(device))
    return out


def _kernels(
    tokens: np.ndarray, ks: list[int | str], seed: int, grids: int, by_position: bool
) -> list[FittedMixture]:
    """Kernels of each K in `ks` on the same tokens, from one coreset at the largest K."""
    counts = [k for k in ks if k != "all"]
    n = tokens.shape[0]
    most = max(counts, default=0)
    if by_position:
        order = greedy_order_by_position(tokens, most, seed) if 0 < most < n else None
        return [fit_position_kernel(tokens, k, grids, order) for k in ks]
    order = greedy_order(tokens, most, seed) if 0 < most < n else None
    return [fit_kernel(tokens, k, order) for k in ks]


def _cache_path(
    run_dir: Path, checkpoint: str, shifts: int, how: str, k: int | str, by_position: bool
) -> Path | None:
    """Where a fit is cached beside its checkpoint; None for fits that are the training
    tokens themselves (a kernel of all of them, or by position)."""
    if how == "kernel" and (k == "all" or by_position):
        return None
    suffix = f"_shifts{shifts}" if shifts > 1 else ""
    return run_dir / CACHE.format(checkpoint=Path(checkpoint).stem, shifts=suffix, fit=how, k=k)


def _cached(path: Path | None, epoch: int) -> FittedMixture | None:
    if path is None:
        return None
    try:
        mixture, meta = load_mixture(path)
    except (OSError, KeyError, ValueError, StopIteration):
        return None
    return mixture if meta.get("epoch") == epoch else None
