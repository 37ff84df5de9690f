"""The mixture over the tokens fitted by expectation-maximisation (`train.mixture_fit: em`).

With a global mixture (`model.mdn_condition: global`) the head's outputs do not depend on the
image: they are K weights, means and variances shared by every token, and stochastic gradient
descent on noisy tokens fits them poorly (measured on real photographs: benchmarks/RESULTS.md).
Here the same parameters are fitted to convergence by EM (scikit-learn's GaussianMixture,
diagonal covariances) on the clean tokens of the training images, once per checkpoint, and
written into the head's parameters, so the NLL is computed as before. A fit is cached in
the run folder next to the checkpoint it belongs to.
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

log = logging.getLogger(__name__)

# Tokens for the fit: at most this many, drawn evenly from the training images; enough for
# K in the hundreds at any token width, and a fit of a minute or less on a CPU.
MAX_TOKENS = 50_000
# Added to every variance (token units; tokens have a spread near 1 per dimension): keeps a
# component that owns a handful of tokens from collapsing onto them.
REG_COVAR = 1e-4
CACHE = "mixture_{checkpoint}.npz"


@torch.no_grad()
def training_tokens(
    model: VTADL, source: Source, device: torch.device, seed: int, batch_size: int = 8
) -> np.ndarray:
    """The clean (noise-free) tokens of every training image (every tile), (n, D) float32."""
    model.eval()
    out: list[np.ndarray] = []

    def encode(batch: np.ndarray) -> None:
        x = to_float(torch.from_numpy(batch).to(device)).permute(0, 3, 1, 2)
        tokens = model.encode(x)
        out.append(tokens.float().reshape(-1, tokens.shape[-1]).cpu().numpy())

    pending: list[np.ndarray] = []
    for i in range(len(source.items("train"))):
        pending.extend(source.model_input("train", i)[0])  # one image, or its tiles
        while len(pending) >= batch_size:
            encode(np.stack(pending[:batch_size]))
            del pending[:batch_size]
    if pending:
        encode(np.stack(pending))
    tokens = np.concatenate(out)
    if len(tokens) > MAX_TOKENS:
        keep = np.random.default_rng(seed).choice(len(tokens), MAX_TOKENS, replace=False)
        tokens = tokens[np.sort(keep)]
    return tokens


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


@torch.no_grad()
def apply_mixture(model: VTADL, params: dict[str, np.ndarray]) -> None:
    """Give the (global) head exactly `params`. Fewer fitted components than the head has
    (more Gaussians than tokens) leave the rest without weight."""
    head = model.mdn
    k = len(params["log_pi"])
    head.logits.fill_(-1e4)
    head.logits[:k] = torch.from_numpy(params["log_pi"]).to(head.logits)
    head.means.zero_()
    head.means[:k] = torch.from_numpy(params["mu"]).to(head.means)
    head.log_vars.zero_()
    head.log_vars[:k] = torch.from_numpy(params["log_var"]).to(head.log_vars)


def fitted_mixture(
    model: VTADL,
    run_dir: Path,
    checkpoint: str,
    epoch: int,
    source: Source,
    device: torch.device,
    seed: int,
) -> dict[str, np.ndarray]:
    """The EM mixture of a run's checkpoint: from the cache when it was fitted for this
    checkpoint's epoch and size, else fitted now (and cached)."""
    path = run_dir / CACHE.format(checkpoint=Path(checkpoint).stem)
    k = model.mdn.n_gaussians
    try:
        with np.load(path) as cached:
            if int(cached["epoch"]) == epoch and int(cached["k"]) == k:
                return {name: cached[name] for name in ("log_pi", "mu", "log_var")}
    except (OSError, KeyError, ValueError):
        pass
    tic = time.perf_counter()
    tokens = training_tokens(model, source, device, seed)
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
