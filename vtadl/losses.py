"""Loss terms: reconstruction (MSE, SSIM) and the mixture negative log-likelihood.

Each mixture term returns one value per token, (B, N), in nats summed over the token's D
dimensions: the same number is the training loss (averaged) and the test-time patch score.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vtadl.model.mdn import Mixture

# Bounds on the log variance of the true mixture: wide enough for any sensible fit, narrow
# enough that exp(-log_var) cannot overflow or make the loss run away to -inf.
LOG_VAR_MIN, LOG_VAR_MAX = -9.0, 9.0
_LOG_2PI = math.log(2 * math.pi)


# A component's share of a token's gradient (its responsibility, or its weight in the
# reference form) below this is dropped in the backward pass. Components that own no token
# get shares near exp(-90); multiplied through to the head's outputs they become subnormal
# floats, and x86 matrix products on subnormals run about ten times slower (several early
# epochs of every CPU run went from 12 to 1-2 images/s). Nothing this small survives next
# to the other terms of a float32 gradient, or Adam's epsilon.
NEGLIGIBLE_SHARE = 1e-20


def _drop_negligible(grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(grad.abs() < NEGLIGIBLE_SHARE, 0.0)


def _component_log_density(x: torch.Tensor, mix: Mixture, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x | mu_k, diag(exp(log_var_k))) for every token and component: (B, N, K).

    A global mixture (one for every token) takes the matrix-product form of the squared
    distance, sum x^2/v - 2 x.mu/v + sum mu^2/v (the middle term's product adding the
    terms that do not depend on x in the same pass), instead of a (B, N, K, D) intermediate:
    hundreds of Gaussians over 256 tokens would otherwise need gigabytes. Both sides are
    first moved by the means' centre, so that the three terms stay small and their float32
    rounding does not swamp the distance of a token to a near component (a kernel mixture).
    A mixture per position that the batch shares (a kernel by position) takes the same form
    per position, as one batched product. Components that share one variance (a kernel)
    need one product instead of two: the first term is then the same for all of them.
    """
    d_log_2pi = x.shape[-1] * _LOG_2PI
    if mix.mu.shape[:2] == (1, 1):
        inv = torch.exp(-log_var[0, 0])  # (K, D)
        centre = mix.mu[0, 0].mean(0).detach()
        mu, x = mix.mu[0, 0] - centre, x - centre
        # -0.5 * (the distance's last two terms + log det + D log 2 pi), in one product
        bias = -0.5 * ((mu.square() * inv).sum(-1) + log_var[0, 0].sum(-1) + d_log_2pi)
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), (mu * inv).T)
        out = out.view(*x.shape[:-1], -1)
        if _shared(inv):
            out = out - 0.5 * (x.square() @ inv[0])[..., None]
        else:
            out = out - 0.5 * (x.square() @ inv.T)
    elif mix.mu.shape[0] == 1:  # a mixture per position, shared by the batch: per position
        inv = torch.exp(-log_var[0])  # (N, K, D)
        centre = mix.mu[0].mean(1, keepdim=True).detach()
        mu, x = mix.mu[0] - centre, (x - centre.transpose(0, 1)).transpose(0, 1)  # (N, B, D)
        bias = -0.5 * ((mu.square() * inv).sum(-1) + log_var[0].sum(-1) + d_log_2pi)
        out = torch.baddbmm(bias[:, None], x, (mu * inv).transpose(-2, -1))  # (N, B, K)
        if _shared(inv):
            out = out - 0.5 * (x.square() * inv[:, :1]).sum(-1, keepdim=True)
        else:
            out = out - 0.5 * (x.square() @ inv.transpose(-2, -1))
        out = out.transpose(0, 1)  # (B, N, K)
    else:
        sq = (x.unsqueeze(2) - mix.mu).square() * torch.exp(-log_var)
        out = -0.5 * (sq + log_var + _LOG_2PI).sum(-1)
    if out.requires_grad:
        out.register_hook(_drop_negligible)
    return out


def _shared(inv: torch.Tensor) -> bool:
    """Whether the components (dimension -2) all have the same variances, outside autograd
    (a trained mixture's variances differ, and its gradient needs the general form)."""
    return not inv.requires_grad and bool((inv == inv[..., :1, :]).all())


# Without a gradient, a mixture of many components (a kernel: tens of thousands) is
# evaluated this many token-component pairs at a time, its log-sum kept running: the
# intermediates stay tens of MB instead of GB, which the allocator would otherwise page in
# and out on every batch.
CHUNK_PAIRS = 1 << 22


def _chunks(x: torch.Tensor, mix: Mixture, log_var: torch.Tensor):
    """(log_pi, log N) for slices of the components, (B, N, k) each: the whole mixture in
    one when a gradient is needed or it is small."""
    k = mix.mu.shape[-2]
    step = max(1, CHUNK_PAIRS // max(1, x.shape[0] * x.shape[1]))
    if torch.is_grad_enabled() or k <= step:
        yield mix.log_pi, _component_log_density(x, mix, log_var)
        return
    for a in range(0, k, step):
        part = Mixture(mix.log_pi[..., a : a + step], mix.mu[..., a : a + step, :], None)
        yield part.log_pi, _component_log_density(x, part, log_var[..., a : a + step, :])


# Terms this far (in nats) below a log-sum's largest add less than 1e-34 of it each: they
# are counted as exactly that much. exp() of anything below about -87 is a subnormal float,
# which x86 computes about ten times slower (a kernel's far components are nearly all such).
_LOGSUM_FLOOR = -80.0


def floored_logsumexp(a: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """log sum exp over the last dimension, as torch.logsumexp, with terms below the floor
    raised to it (a relative change under 1e-30 for 10^4 such terms). `overwrite`: a may be
    used as the work space when it needs no gradient (a temporary of the caller's)."""
    top = a.detach().amax(-1, keepdim=True)
    finite = torch.isfinite(top)
    shift = torch.where(finite, top, torch.zeros_like(top))
    if a.requires_grad:
        z = (a - shift).clamp(min=_LOGSUM_FLOOR).exp()
    else:
        z = (a.sub_(shift) if overwrite else a - shift).clamp_(min=_LOGSUM_FLOOR).exp_()
    # a row of -inf (no weight anywhere) or with +inf keeps that as its value
    return torch.where(finite[..., 0], z.sum(-1).log() + top[..., 0], top[..., 0])


def mixture_nll(x: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """True mixture NLL, -log sum_k pi_k N_k(x), via logsumexp."""
    log_var = mix.log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    total = None
    for log_pi, density in _chunks(x, mix, log_var):
        part = floored_logsumexp(log_pi + density, overwrite=True)
        total = part if total is None else torch.logaddexp(total, part)
    return -total


def reference_nll(x: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """The published code's form: sum_k pi_k * (-log N_k(x)), with log_var = softplus(raw).

    The softplus makes every variance at least 1 (the published variance floor). By Jensen's
    inequality this is an upper bound on the true mixture NLL.
    """
    log_var = F.softplus(mix.log_var)
    return -sum((log_pi.exp() * density).sum(-1) for log_pi, density in _chunks(x, mix, log_var))


MDN_LOSS_FUNCTIONS = {"mixture": mixture_nll, "reference": reference_nll}


def _gaussian_1d(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two image batches in [0, 1], per image: (B,).

    Gaussian window (11, sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, zero padding, as in the common
    SSIM implementations that the published code used. The window is applied as two 1-D
    passes (exactly the 2-D Gaussian, with the same zero padding) to all five local
    statistics at once.
    """
    n, c, h, w = a.shape
    g = _gaussian_1d(window, sigma, a)
    stats = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    k = stats.shape[1]
    pad = window // 2
    stats = F.conv2d(stats, g.view(1, 1, 1, -1).expand(k, 1, 1, window), padding=(0, pad), groups=k)
    stats = F.conv2d(stats, g.view(1, 1, -1, 1).expand(k, 1, window, 1), padding=(pad, 0), groups=k)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.split(c, dim=1)
    var_a = e_aa - mu_a.square()
    var_b = e_bb - mu_b.square()
    cov = e_ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    )
    return s.flatten(1).mean(1)


class LossTerms(NamedTuple):
    total: torch.Tensor
    mse: torch.Tensor
    ssim: torch.Tensor
    nll: torch.Tensor  # mean per-token mixture NLL divided by the token dimension


def vtadl_loss(
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    tokens: torch.Tensor,
    mixture: Mixture,
    *,
    w_mse: float,
    w_ssim: float,
    w_nll: float,
    mdn_loss: str,
) -> LossTerms:
    """w_mse * MSE + w_ssim * (1 - SSIM) + w_nll * NLL, computed in float32.

    The NLL term is per token dimension so that its weight means the same at any embed_dim.
    """
    rec = reconstruction.float()
    mse = F.mse_loss(rec, images)
    # SSIM's many full-resolution intermediates are recomputed in the backward pass instead
    # of being kept, two images at a time: several hundred MB less at 512 px for a small
    # extra cost.
    if rec.requires_grad:
        sim = torch.cat(
            [
                checkpoint(ssim, a, b, use_reentrant=False)
                for a, b in zip(images.split(2), rec.split(2))
            ]
        ).mean()
    else:
        sim = ssim(images, rec).mean()
    if w_nll > 0:
        mix = Mixture(*(t.float() for t in mixture))
        nll = MDN_LOSS_FUNCTIONS[mdn_loss](tokens.float(), mix).mean() / tokens.shape[-1]
    else:  # the mixture is not trained here (train.mixture_fit: em fits it after training)
        nll = torch.zeros((), device=rec.device)
    total = w_mse * mse + w_ssim * (1 - sim) + w_nll * nll
    return LossTerms(total, mse.detach(), sim.detach(), nll.detach())
