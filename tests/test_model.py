from __future__ import annotations

import pytest
import torch

from vtadl.config import VARIANTS
from vtadl.exceptions import ConfigError
from vtadl.losses import mixture_nll
from vtadl.model import VTADL, create_model

N_GAUSSIANS = 3


def _small(variant: str, **overrides) -> VTADL:
    """The variant's architecture on a 2x2 token grid with a few Gaussians."""
    patch = VARIANTS[variant].patch_size
    return create_model(variant, **{"img_size": 2 * patch, "n_gaussians": N_GAUSSIANS, **overrides})


def _images(model: VTADL, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.grid_size * model.encoder.patch_embed.proj.kernel_size[0]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen)


def _grads_finite_and_nonzero(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_shapes_and_backward(variant: str) -> None:
    torch.manual_seed(0)
    model = _small(variant, mdn_condition="token").train()  # a mixture per token
    cfg = VARIANTS[variant]
    x = _images(model)
    b, h = x.shape[0], x.shape[-1]
    n, d, k = 4, cfg.embed_dim, N_GAUSSIANS

    out = model(x)
    assert out.tokens.shape == (b, n, d)
    assert out.reconstruction.shape == (b, 3, h, h)
    assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1
    assert out.mixture.log_pi.shape == (b, n, k)
    assert out.mixture.mu.shape == (b, n, k, d)
    assert out.mixture.log_var.shape == (b, n, k, d)
    # log_pi is a log-softmax over the components.
    torch.testing.assert_close(
        out.mixture.log_pi.exp().sum(-1), torch.ones(b, n), atol=1e-5, rtol=0
    )
    for t in (out.tokens, out.reconstruction, *out.mixture):
        assert torch.isfinite(t).all()

    nll = mixture_nll(out.tokens, out.mixture)
    assert nll.shape == (b, n)
    loss = (out.reconstruction - x).square().mean() + nll.mean() / d
    assert torch.isfinite(loss)
    loss.backward()
    for part in (model.encoder, model.decoder, model.mdn):
        _grads_finite_and_nonzero(part)


def test_noise_only_in_training() -> None:
    torch.manual_seed(0)
    model = _small("vtadl_tiny", noise_std=0.5)
    x = _images(model)

    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.reconstruction, b.reconstruction)

    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c.tokens, d.tokens)
    assert not torch.allclose(c.reconstruction, d.reconstruction)
    # The noise is added around the clean tokens, at about the configured scale.
    noise = c.tokens - a.tokens
    assert 0.3 < float(noise.std()) < 0.7


def test_no_noise_training_is_deterministic() -> None:
    torch.manual_seed(0)
    model = _small("vtadl_tiny", noise_std=0.0).train()
    x = _images(model)
    with torch.no_grad():
        a, b = model(x), model(x)
        clean = model.eval()(x)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.tokens, clean.tokens)


def _encoder_grads_from_nll(model: VTADL) -> list[torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(_images(model))
    mixture_nll(out.tokens, out.mixture).mean().backward()
    return [p.grad for p in model.encoder.parameters()]


@pytest.mark.parametrize("condition", ["token", "position", "global"])
def test_mdn_detach_stops_nll_gradient_at_tokens(condition: str) -> None:
    torch.manual_seed(0)
    detached = _small("vtadl_tiny", mdn_detach=True, mdn_condition=condition)
    grads = _encoder_grads_from_nll(detached)
    assert all(g is None or not g.any() for g in grads)
    # The mixture head itself still learns from the NLL.
    _grads_finite_and_nonzero(detached.mdn)

    torch.manual_seed(0)
    attached = _small("vtadl_tiny", mdn_detach=False, mdn_condition=condition)
    grads = _encoder_grads_from_nll(attached)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_mdn_detach_keeps_reconstruction_gradient() -> None:
    torch.manual_seed(0)
    model = _small("vtadl_tiny", mdn_detach=True).train()
    x = _images(model)
    (model(x).reconstruction - x).square().mean().backward()
    _grads_finite_and_nonzero(model.encoder)


@pytest.mark.parametrize("condition", ["token", "position", "global"])
def test_mdn_conditions(condition: str) -> None:
    torch.manual_seed(0)
    model = _small("vtadl_tiny", mdn_condition=condition).eval()
    x = _images(model, batch=3)
    out = model(x)
    nll = mixture_nll(out.tokens, out.mixture)
    assert nll.shape == (3, 4)
    assert torch.isfinite(nll).all()
    if condition == "position":
        # One mixture per patch position, shared by the batch.
        assert out.mixture.mu.shape[:2] == (1, 4)
        assert model.mdn.context is not None
    elif condition == "global":
        # One mixture for every token of every image: the same NLL wherever a token sits.
        assert out.mixture.mu.shape[:2] == (1, 1)
        moved = out.tokens.flip(1)
        torch.testing.assert_close(mixture_nll(moved, out.mixture), nll.flip(1))
    else:
        assert out.mixture.mu.shape[0] == 3
        assert model.mdn.context is None
        # Token-conditioned mixtures differ between images.
        assert not torch.allclose(out.mixture.mu[0], out.mixture.mu[1])


@pytest.mark.parametrize(
    ("img_size", "patch_size"),
    [(48, 16), (36, 12), (40, 8), (24, 24), (15, 5)],
    ids=["grid3", "patch12", "grid5", "grid1-patch24", "odd-patch5"],
)
def test_decoder_any_size_divisible_by_patch(img_size: int, patch_size: int) -> None:
    torch.manual_seed(0)
    model = create_model("vtadl_tiny", img_size=img_size, patch_size=patch_size).train()
    x = torch.rand(2, 3, img_size, img_size)
    out = model(x)
    grid = img_size // patch_size
    assert out.tokens.shape == (2, grid * grid, 32)
    assert out.reconstruction.shape == (2, 3, img_size, img_size)
    assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1
    (out.reconstruction - x).square().mean().backward()
    _grads_finite_and_nonzero(model.decoder)


def test_unknown_variant_lists_known() -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model("nope")
    message = str(excinfo.value)
    assert "nope" in message
    for name in VARIANTS:
        assert name in message


def test_create_model_rejects_unknown_field() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        create_model("vtadl_tiny", bogus=1)
