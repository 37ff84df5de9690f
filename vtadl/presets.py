"""Named presets: partial config sections for a whole method, as data.

A preset sits between the variant and the config file (variant < preset < config file <
options); `preset_layer` gives the layer that `vtadl.config.layered_config` applies first.
Each value says where it comes from: "paper" for what Mishra et al. (ISIE 2021) describe,
"published code" where the paper is silent and the authors' released code decides (its
forms, not its bugs). What vtadl still does differently: docs/model.md.
"""

from __future__ import annotations

import copy
from typing import Any

from vtadl.exceptions import ConfigError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "model": {
            # paper: 512 x 512 input cut into 64 x 64 patches, 8 x 8 = 64 tokens of 512
            # dimensions, 6 blocks of 8 heads, an MLP of 1024 (2 x 512), 3 channels
            "img_size": 512,
            "patch_size": 64,
            "in_chans": 3,
            "embed_dim": 512,
            "depth": 6,
            "num_heads": 8,
            "mlp_ratio": 2.0,
            # published code: the attention's query/key/value map has no bias
            "qkv_bias": False,
            # vtadl's decoder at vtadl_paper's width: the published decoder (6 transposed
            # convolutions, hard-wired to 512 px) is not reproduced
            "decoder_channels": 256,
            # paper: Gaussian noise of sigma 0.2 on the encoded tokens, in training only
            "noise_std": 0.2,
            # paper: 150 Gaussians (its ablation's best; the author confirmed it in the
            # published code's issue #4, whose default is 10)
            "n_gaussians": 150,
            # published code: the mixture is predicted from each token (clamped at zero)
            "mdn_condition": "token",
            # paper: the mixture's likelihood is a loss term that trains the encoder too
            "mdn_detach": False,
        },
        "data": {
            # published code: no augmentation
            "augment": False,
        },
        "train": {
            # paper: the mixture is trained with the network, by its likelihood in the loss
            "mixture_fit": "sgd",
            # published code: sum_k pi_k * (-log N_k) with every variance at least 1
            "mdn_loss": "reference",
            # published code: 5 * MSE + 0.5 * SSIM term + 1 * mixture NLL (vtadl's NLL term
            # is per token dimension, docs/model.md)
            "w_mse": 5.0,
            "w_ssim": 0.5,
            "w_nll": 1.0,
            # published code (issue #4 gives them as the paper's): Adam, lr 1e-4, L2
            # weight decay 1e-4, batch 8, 400 epochs
            "lr": 1e-4,
            "weight_decay": 1e-4,
            "batch_size": 8,
            "epochs": 400,
            # published code: no gradient clipping (vtadl zeroes every gradient each step,
            # which the published code does not do for the mixture head)
            "grad_clip": 0.0,
        },
        "eval": {
            # paper: the map is the per-patch mixture NLL, upsampled, on a linear scale
            "score": "nll",
            "scale": "linear",
            # published code: one grid of non-overlapping patches
            "grid_shifts": 1,
            # published code: the image's score is its highest patch NLL (it adds the
            # reconstruction terms, orders of magnitude smaller)
            "image_score": "peak",
            "peak_patches": 1,
            # published code: Gaussian smoothing of sigma 4 pixels (of its 512 px map;
            # vtadl smooths at the image's original resolution)
            "smoothing_sigma": 4.0,
        },
    },
}


def preset_layer(name: str) -> dict[str, Any]:
    """The config layer of preset `name` (its sections and `preset: name`); "" is no
    preset, an empty layer. An unknown name raises a ConfigError that lists the known ones."""
    if name == "":
        return {}
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return {"preset": name, **copy.deepcopy(PRESETS[name])}
