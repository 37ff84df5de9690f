"""VT-ADL: ViT encoder, noise on the tokens, convolutional decoder, mixture density head."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from vtadl.config import DEFAULT_GAUSSIANS, ModelConfig, variant_config
from vtadl.model.decoder import ConvDecoder
from vtadl.model.encoder import ViTEncoder
from vtadl.model.mdn import Mixture, MixtureDensityHead


class VTADLOutput(NamedTuple):
    tokens: torch.Tensor  # (B, N, D) as the mixture sees them; noisy in training
    reconstruction: torch.Tensor  # (B, C, H, W) in [0, 1]
    mixture: Mixture


class VTADL(nn.Module):
    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int = 3,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        noise_std: float = 0.2,
        n_gaussians: int,
        mdn_condition: str = "token",
        mdn_detach: bool = False,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        self.noise_std = noise_std
        self.mdn_detach = mdn_detach
        self.encoder = ViTEncoder(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
        )
        self.grid_size = self.encoder.patch_embed.grid_size
        self.decoder = ConvDecoder(
            dim=embed_dim, patch_size=patch_size, out_chans=in_chans, channels=decoder_channels
        )
        self.mdn = MixtureDensityHead(
            dim=embed_dim,
            n_gaussians=n_gaussians,
            num_patches=self.encoder.patch_embed.num_patches,
            condition=mdn_condition,
        )
        # Images arrive in [0, 1]; the encoder sees them centred.
        self.register_buffer("pixel_mean", torch.tensor(0.5), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(0.25), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The clean tokens (B, N, D) of images in [0, 1] (B, C, H, W)."""
        return self.encoder.forward_features((images - self.pixel_mean) / self.pixel_std)

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None, grid: int = 0
    ) -> VTADLOutput:
        """`noise`: standard normal draws shaped like the tokens, scaled by `noise_std` in
        training (drawn here when not given), so a caller can make them reproducible.
        `grid`: which shifted grid the images are (for a mixture per position)."""
        tokens = self.encode(images)
        if self.training and self.noise_std > 0:
            noise = torch.randn_like(tokens) if noise is None else noise.to(tokens)
            tokens = tokens + noise * self.noise_std
        reconstruction = self.decoder(tokens, self.grid_size)
        if self.mdn_detach:
            tokens = tokens.detach()
        return VTADLOutput(tokens, reconstruction, self.mdn(tokens, grid))


def build_model(config: ModelConfig, n_gaussians: int | None = None) -> VTADL:
    """The model of `config`, its mixture head of `n_gaussians` components (default: the
    config's count; "auto" and "all" are resolved by the caller, who knows the fit)."""
    k = config.n_gaussians if n_gaussians is None else n_gaussians
    if not isinstance(k, int):
        raise ValueError(f"the head needs a number of Gaussians, got {k!r}")
    return VTADL(**{**config.__dict__, "n_gaussians": k})


def create_model(name: str, **overrides: Any) -> VTADL:
    """The named variant (`vtadl_paper`, `vtadl_small`, `vtadl_tiny`) with field overrides;
    its head has the variant's K for the trained mixture (sgd) unless n_gaussians is given."""
    config = variant_config(name, **overrides)
    k = config.n_gaussians
    return build_model(config, DEFAULT_GAUSSIANS[name]["sgd"] if not isinstance(k, int) else k)
