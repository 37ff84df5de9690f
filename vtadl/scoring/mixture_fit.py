"""The mixture over the tokens fitted after training (`train.mixture_fit: em` or `kernel`).

With a global mixture (`model.mdn_condition: global`) the head's outputs do not depend on the
image: they are K weights, means and variances shared by every token, and stochastic gradient
descent on noisy tokens fits them poorly (measured on real photographs: benchmarks/RESULTS.md).
Here the same parameters are fitted to convergence by EM (scikit-learn's GaussianMixture,
diagonal covariances) on the clean tokens of the training images, once per checkpoint, and
written into the head's parameters, so the NLL is computed as before. A fit is cached in
the run folder next to the checkpoint it belongs to.

`kernel` keeps every training token instead of summarising them in K components: a Gaussian
on each (equal weights), all with one diagonal variance, `KERNEL_BANDWIDTH` times the
tokens' spread per dimension: a kernel density estimate. Its NLL grows with the distance to
the nearest training tokens, so a rare but normal patch that was seen in training scores
low, as with a nearest neighbour, where K Gaussians would have to trade it for the common
ones (measured on real photographs: benchmarks/RESULTS.md).

Tokens are taken at the grid shifts the run is scored at (`eval.grid_shifts`): a shifted
grid's tokens are then tokens the mixture has seen the like of.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from vtadl.data.prepare import to_float
from vtadl.data.source import Source
from vtadl.model import VTADL
from vtadl.scoring.grids import grid_offsets, shift_images

log = logging.getLogger(__name__)

# Tokens for an EM fit: at most this many, drawn evenly from the training images; enough for
# K in the hundreds at any token width, and a fit of a minute or less on a CPU.
MAX_TOKENS = 50_000
# Tokens a kernel mixture keeps: its density is only as good as its cover of the normal
# tokens, so it keeps every one up to this many (a category of 300 images on 4 x 4 grids of
# 8 x 8 tokens fits whole). Scoring time grows with it: a test token meets each of them.
# Measured on real photographs: 50,000 of the 147,000 tokens lost .14 in the sum of the
# three mean metrics (benchmarks/RESULTS.md).
MAX_KERNEL_TOKENS = 320_000
# A kernel by position holds one Gaussian per training image at each position: at most
# this many images (each test token meets only its own position's, so more are affordable).
MAX_POSITION_IMAGES = 2000
# Added to every variance (token units; tokens have a spread near 1 per dimension): keeps a
# component that owns a handful of tokens from collapsing onto them.
REG_COVAR = 1e-4
# The kernel's standard deviation per dimension, in units of the tokens' own spread there.
KERNEL_BANDWIDTH = 0.3
CACHE = "mixture_{checkpoint}{shifts}.npz"


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


def fit_mixture(tokens: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    """K diagonal Gaussians fitted to `tokens` by EM: log weights (K,), means and log
    variances (K, D)."""
    k = min(k, len(tokens))
    gm = GaussianMixture(
        n_components=k,
        covariance_type="diag",
        reg_covar=REG_COVAR,
        max_iter=200,
        random_state=seed,
    ).fit(tokens)
    if not gm.converged_:
        log.warning("the mixture's EM fit did not converge in %d iterations", gm.max_iter)
    return {
        "log_pi": np.log(np.maximum(gm.weights_, 1e-30)).astype(np.float32),
        "mu": gm.means_.astype(np.float32),
        "log_var": np.log(gm.covariances_).astype(np.float32),
    }


def kernel_mixture(tokens: np.ndarray, bandwidth: float = KERNEL_BANDWIDTH) -> dict:
    """A Gaussian on every token, equal weights, one diagonal variance: (bandwidth x the
    tokens' standard deviation)^2 per dimension, plus REG_COVAR.

    Tokens (n, D) make one mixture of n Gaussians; tokens by position (images, P, D) make P
    mixtures, one per position, each of the images' tokens there: log weights (P, images),
    means and log variances (P, images, D), the variance still the spread over all tokens.
    """
    flat = tokens.reshape(-1, tokens.shape[-1])
    var = (bandwidth * flat.std(0)) ** 2 + REG_COVAR
    mu = tokens if tokens.ndim == 2 else tokens.transpose(1, 0, 2)
    n = mu.shape[-2]
    return {
        "log_pi": np.full(mu.shape[:-1], -np.log(n), np.float32),
        "mu": np.ascontiguousarray(mu, np.float32),
        # one row viewed for every component: `apply_mixture` keeps it one row
        "log_var": np.broadcast_to(np.log(var).astype(np.float32), mu.shape),
    }


def _tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """`a` on like's device and dtype. An array broadcast along its leading dimensions (a
    kernel's one variance for all its components) stays one row, viewed for every
    component, instead of K copies (650 MB at 320k tokens of 512 dimensions)."""
    if a.ndim > 1 and not any(a.strides[:-1]):
        row = torch.from_numpy(np.array(a[(0,) * (a.ndim - 1)]))
        return row.to(like).expand(a.shape)
    return torch.from_numpy(a).to(like)


@torch.no_grad()
def apply_mixture(model: VTADL, params: dict[str, np.ndarray]) -> None:
    """Give the (global) head exactly `params`. Fewer fitted components than the head has
    (more Gaussians than tokens) leave the rest without weight; more (a kernel mixture), or
    one mixture per position, replace the head's parameters with those, for scoring."""
    head = model.mdn
    k = params["log_pi"].shape[-1]
    # A head that holds a kernel's one-row variance (viewed, not writable in place) is
    # replaced as well.
    if k > head.n_gaussians or params["log_pi"].ndim == 2 or head.log_vars.stride(0) == 0:
        for name, value in (("logits", "log_pi"), ("means", "mu"), ("log_vars", "log_var")):
            old = getattr(head, name)
            setattr(head, name, torch.nn.Parameter(_tensor(params[value], old)))
        head.n_gaussians = k
        return
    head.logits.fill_(-1e4)
    head.logits[:k] = torch.from_numpy(params["log_pi"]).to(head.logits)
    head.means.zero_()
    head.means[:k] = torch.from_numpy(params["mu"]).to(head.means)
    head.log_vars.zero_()
    head.log_vars[:k] = _tensor(params["log_var"], head.log_vars)


def fitted_mixture(
    model: VTADL,
    run_dir: Path,
    checkpoint: str,
    epoch: int,
    source: Source,
    device: torch.device,
    seed: int,
    how: str = "em",
    shifts: int = 1,
    by_position: bool = False,
) -> dict[str, np.ndarray]:
    """The mixture of a run's checkpoint, fitted `how` ("em" or "kernel") to the training
    tokens at `shifts` grid shifts (a kernel `by_position`: one mixture per position). An
    EM fit comes from the cache when it was fitted for this checkpoint's epoch and size,
    else it is fitted now (and cached); a kernel mixture is only the tokens, taken afresh
    (seconds) rather than stored."""
    if how == "kernel":
        tokens = training_tokens(
            model, source, device, seed, shifts, by_position=by_position, most=MAX_KERNEL_TOKENS
        )
        return kernel_mixture(tokens)
    suffix = f"_shifts{shifts}" if shifts > 1 else ""
    path = run_dir / CACHE.format(checkpoint=Path(checkpoint).stem, shifts=suffix)
    k = model.mdn.n_gaussians
    try:
        with np.load(path) as cached:
            if int(cached["epoch"]) == epoch and int(cached["k"]) == k:
                return {name: cached[name] for name in ("log_pi", "mu", "log_var")}
    except (OSError, KeyError, ValueError):
        pass
    tic = time.perf_counter()
    tokens = training_tokens(model, source, device, seed, shifts)
    params = fit_mixture(tokens, k, seed)
    log.info(
        "fitted %d Gaussians to %d training tokens by EM in %.1f s",
        len(params["log_pi"]),
        len(tokens),
        time.perf_counter() - tic,
    )
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, epoch=epoch, k=k, **params)
    partial.replace(path)
    return params
