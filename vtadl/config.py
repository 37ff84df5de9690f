"""Run configuration: frozen dataclasses that round-trip through plain dicts (JSON, YAML).

A `Config` holds everything a run needs. Named model variants are data (`VARIANTS`); every
checkpoint carries its config, so a run folder can always rebuild its own model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from vtadl.exceptions import ConfigError
from vtadl.presets import PRESETS, preset_layer

MDN_LOSSES = ("mixture", "reference")
MIXTURE_FITS = ("em", "kernel", "sgd")
FITTED_AFTER_TRAINING = ("em", "kernel")  # fits of a global mixture, after training
MDN_CONDITIONS = ("token", "position", "global")
SCORES = ("nll", "nll+recon", "recon")
SCORE_SCALES = ("log", "linear")
IMAGE_SCORES = ("auto", "peak", "peak+recon", "peak+recon+neighbour", "max", "mean", "top1pct")
KERNEL_SCOPES = ("auto", "image", "position")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("single", "ddp", "deepspeed")
PLACEMENTS = ("pack", "spread")
# Upper bounds of counts where a larger value can only be a mistake (an epoch count of
# 1e300 is accepted as an integer and would never end).
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_WORKERS = 4_096  # Ray Train workers, data loader workers
MAX_GAUSSIANS = 1_000_000  # a kernel may keep hundreds of thousands of tokens
GAUSSIAN_WORDS = ("auto", "all")  # model.n_gaussians besides a count
MAX_SIZE = 65_536  # pixels of an image or tile, channels of a layer
MAX_LAYERS = 1_024
MAX_SEED = 2**32
MAX_MAPS = 100_000  # heat maps written, patches averaged into a peak


@dataclass(frozen=True)
class ModelConfig:
    img_size: int = 512
    patch_size: int = 64
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 2.0
    qkv_bias: bool = False
    noise_std: float = 0.2
    # K, the number of Gaussians of the mixture over the tokens, in every fit
    # (`train.mixture_fit`): "auto" takes the variant's default for the fit
    # (DEFAULT_GAUSSIANS); "all", for a kernel only, puts one on every training token kept.
    n_gaussians: int | str = "auto"
    # What the mixture parameters are predicted from: "token" is the published design (the
    # token itself, clamped at zero); "position" learns one context per patch position;
    # "global" one context for all positions (one mixture is the density of every token).
    mdn_condition: str = "global"
    # Stop the mixture's gradient at the tokens: the encoder then learns from the
    # reconstruction alone and the mixture head fits the tokens it produces.
    mdn_detach: bool = True
    decoder_channels: int = 256


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mvtec"
    root: str = "data/mvtec"
    category: str = ""
    val_fraction: float = 0.1
    # "auto": pack once into pack_cache (default <out>/packs) and read the pack; a path: use
    # that pack; "none": decode the image files every run.
    pack: str = "auto"
    pack_cache: str = ""
    # Native-resolution tiles of this size (0: off) instead of resizing whole images.
    tile: int = 0
    tile_overlap: int = 0
    augment: bool = False
    num_workers: int = 0
    # A node-local folder: each node reads its own copy of the pack (vtadl.data.stage)
    # instead of the shared one; "" reads the pack where it is.
    local_copy: str = ""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    w_mse: float = 5.0
    w_ssim: float = 0.5
    w_nll: float = 1.0
    mdn_loss: str = "mixture"
    # How the mixture of K = model.n_gaussians Gaussians over the tokens is fitted. "kernel":
    # after training, K Gaussians of one shared bandwidth centred on K clean training tokens
    # chosen by a greedy k-center coreset (a kernel density; a global mixture only). "em":
    # after training too, K Gaussians fitted by expectation-maximisation to the same tokens.
    # With either and mdn_detach the head is not trained with the network at all, and K does
    # not change training. "sgd": by the training loss, with the network (the published way).
    # Chosen on real photographs: docs/decisions.md.
    mixture_fit: str = "kernel"
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    out: str = "runs"
    # single: this process. ddp / deepspeed: `num_workers` Ray Train workers; batch_size is
    # the global batch, split evenly over them.
    strategy: str = "single"
    num_workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    ray_address: str = ""  # "" starts a local Ray instance; "auto" or host:port joins one
    zero_stage: int = 2
    deepspeed_config: str = ""  # a DeepSpeed JSON file for experts; replaces the generated one
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    # Ray Train workers: "pack" fills nodes one by one, "spread" one per node where possible.
    placement: str = "pack"
    # The resumable checkpoint (last.pt, optimiser state included) is due every N epochs or
    # every M minutes (0 turns a rule off), and always after the last epoch; a kill loses at
    # most one interval. best.pt (weights only) is written on every new best validation loss.
    checkpoint_every_epochs: int = 1
    checkpoint_every_minutes: float = 10.0
    # Write checkpoints on a background thread from a host copy of the state; a due last.pt
    # waits for the next epoch while the previous one is still being written.
    checkpoint_background: bool = True
    # CUDA only: TF32 matmuls (torch.set_float32_matmul_precision("high")).
    tf32: bool = False
    compile: bool = False  # torch.compile the model (single and ddp)
    fused_adam: bool = False  # Adam's fused implementation (single and ddp)


@dataclass(frozen=True)
class EvalConfig:
    score: str = "nll"
    # "log": each raw score becomes log(1 + excess over normal / normal spread) before it is
    # standardised, so one extreme patch does not swamp its neighbours when the map is
    # smoothed; "linear": the raw score, only standardised.
    scale: str = "log"
    # The image's score: its map's "peak" before upsampling and smoothing (for the NLL map,
    # the mean of the `peak_patches` highest standardised patch scores on the token grids: a
    # small defect is not averaged away with its neighbours, nor one noisy patch trusted
    # alone), or from the final map: "max" (as in the MVTec AD evaluation), "mean",
    # "top1pct" (the mean of its top 1%). Chosen on real photographs: docs/decisions.md.
    # "peak+recon": the peak plus `recon_weight` times the log of the image's mean squared
    # reconstruction error, each standardised on the validation images: evidence about the
    # whole image (a digit of another class lacks strokes that no single place misses).
    # "peak+recon+neighbour" adds `neighbour_weight` times the log of the distance from the
    # image's tokens, all positions of all grids at once, to the nearest training image's,
    # standardised the same way: the image as a whole must resemble one normal image, not
    # each place some normal image (needs a kernel by position, `kernel_scope`).
    # "auto": peak+recon+neighbour for the MNIST layout with a kernel by position (and a
    # neighbour_weight above 0), peak+recon for it otherwise, peak for every other layout
    # (`resolved_image_score`).
    image_score: str = "auto"
    peak_patches: int = 10
    recon_weight: float = 0.3
    neighbour_weight: float = 0.5
    smoothing_sigma: float = 4.0
    # Score the patch grid at shifts x shifts offsets, interleaved into one grid of stride
    # patch / shifts (a finer map for shifts^2 passes; vtadl.scoring.grids).
    grid_shifts: int = 4
    # Which training tokens a kernel mixture (train.mixture_fit: kernel) scores a token
    # against: "image", all of them, wherever they sat (parts and textures anywhere in the
    # picture); "position", only those at the same grid position and shift (aligned images,
    # such as centred digits: a stroke normal elsewhere is then anomalous here); "auto",
    # position for the MNIST layout, image otherwise (`kernel_scope`).
    kernel_scope: str = "auto"
    n_maps: int = 12


@dataclass(frozen=True)
class Config:
    variant: str = "vtadl_paper"
    # The preset the run's config started from (vtadl.presets; "" for none).
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        return _build(cls, raw, "config")

    def override(self, **sections: dict[str, Any]) -> Config:
        """Return a copy with `section={key: value}` overrides applied and validated."""
        raw = self.to_dict()
        for name, values in sections.items():
            if name not in raw:
                raise ConfigError(f"unknown config section {name!r}")
            if isinstance(raw[name], dict):
                raw[name].update({k: v for k, v in values.items() if v is not None})
            elif values is not None:
                raw[name] = values
        return validate(Config.from_dict(raw))


VARIANTS: dict[str, ModelConfig] = {
    # The paper's architecture: 512 px, 64 px patches (8x8 tokens), 150 Gaussians.
    "vtadl_paper": ModelConfig(),
    # For CPUs and small images: 128 px, 8 px patches (16x16 tokens).
    "vtadl_small": ModelConfig(
        img_size=128,
        patch_size=8,
        embed_dim=192,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        decoder_channels=128,
    ),
    # For tests: a few thousand parameters per block.
    "vtadl_tiny": ModelConfig(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        decoder_channels=32,
    ),
}


# K for model.n_gaussians "auto", by variant and fit. sgd and em: the paper's 150 at its
# size, 400 for the 16 x 16 tokens of vtadl_small. kernel: the coreset's size, chosen by
# measurement on the photo benchmark and the digits (docs/decisions.md).
KERNEL_GAUSSIANS = 32768
DEFAULT_GAUSSIANS: dict[str, dict[str, int | str]] = {
    "vtadl_paper": {"sgd": 150, "em": 150, "kernel": KERNEL_GAUSSIANS},
    "vtadl_small": {"sgd": 400, "em": 400, "kernel": KERNEL_GAUSSIANS},
    "vtadl_tiny": {"sgd": 4, "em": 4, "kernel": KERNEL_GAUSSIANS},
}


def kernel_scope(config: Config) -> str | None:
    """What `eval.kernel_scope` comes to for this config: "image" or "position" for a
    kernel mixture (auto: position for the MNIST layout, whose digits are centred), None
    for the other fits."""
    if config.train.mixture_fit != "kernel":
        return None
    scope = config.eval.kernel_scope
    if scope == "auto":
        return "position" if config.data.dataset == "mnist" else "image"
    return scope


def gaussians(config: Config) -> int | str:
    """K, what `model.n_gaussians` comes to for this config: a count, or "all" (a kernel on
    every training token kept); "auto" is the variant's default for the fit
    (DEFAULT_GAUSSIANS)."""
    k = config.model.n_gaussians
    if k == "auto":
        return DEFAULT_GAUSSIANS[config.variant][config.train.mixture_fit]
    return k


def resolved_image_score(config: Config) -> str:
    """What `eval.image_score` comes to for this config (auto: for the MNIST layout, whose
    anomalies are whole digits of another class, peak+recon+neighbour with a kernel by
    position and a neighbour weight, else peak+recon; peak for the rest, where defects are
    local and the rest of the image says nothing about them)."""
    how = config.eval.image_score
    if how != "auto":
        return how
    if config.data.dataset != "mnist":
        return "peak"
    near = kernel_scope(config) == "position" and config.eval.neighbour_weight > 0
    return "peak+recon+neighbour" if near else "peak+recon"


def variant_config(name: str, **overrides: Any) -> ModelConfig:
    """The named model variant with field overrides; an unknown name lists the known ones."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return validate_model(_replace(VARIANTS[name], overrides, "model"))


def default_config(variant: str = "vtadl_paper") -> Config:
    return Config(variant=variant, model=variant_config(variant))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections a YAML or JSON config file holds, as written (partial, not validated)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (YAML/JSON)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {path} is not valid YAML/JSON: {_yaml_problem(exc)}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where (a Python tag is refused here)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.problem}{where}"
    return " ".join(str(exc).split())


def layered_config(variant: str, *layers: dict[str, Any]) -> Config:
    """The variant's defaults with each layer's (partial) sections applied in turn, so later
    layers win: variant < preset (`presets.preset_layer`) < config file < options. A layer's
    own `variant` key is ignored; a `preset` key only records the name (the preset's
    sections are its own layer)."""
    if not isinstance(variant, str):
        raise ConfigError(f"variant must be a string, got {variant!r}")
    base = default_config(variant).to_dict()
    for layer in layers:
        for name, values in layer.items():
            if name == "variant":
                continue
            if isinstance(values, dict) and isinstance(base.get(name), dict):
                base[name].update(values)
            else:
                base[name] = values
    return validate(Config.from_dict(base))


def load_config(path: str | Path) -> Config:
    """Read a YAML or JSON config file; sections may be partial, the variant (and the preset
    the file names, if any) fill the rest."""
    raw = read_config_file(path)
    return layered_config(
        raw.get("variant", "vtadl_paper"), preset_layer(raw.get("preset", "")), raw
    )


def upgrade_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A config as an earlier version stored it (a run's config.yaml, a checkpoint), with the
    fields added since set to what that version did, so old runs load and resume unchanged."""
    for section, key, then in (
        ("train", "mixture_fit", "sgd"),
        ("eval", "grid_shifts", 1),
        ("eval", "kernel_scope", "image"),
        ("eval", "peak_patches", 1),
        # before the neighbour term: auto was peak+recon for digits, as weight 0 scores it
        ("eval", "neighbour_weight", 0.0),
    ):
        values = raw.get(section)
        if isinstance(values, dict) and key not in values:
            raw = {**raw, section: {**values, key: then}}
    model, train = raw.get("model"), raw.get("train")
    # Before presets (and K in every fit), a kernel kept every training token whatever
    # n_gaussians said.
    if "preset" not in raw and isinstance(model, dict) and isinstance(train, dict):
        if train.get("mixture_fit") == "kernel":
            raw = {**raw, "model": {**model, "n_gaussians": "all"}}
    return raw


def load_stored_config(path: str | Path) -> Config:
    """A run's own config.yaml (`upgrade_stored` applied)."""
    raw = upgrade_stored(read_config_file(path))
    return layered_config(raw.get("variant", "vtadl_paper"), raw)


def absolute_paths(config: Config) -> Config:
    """The config with every file and folder path made absolute (against the working
    directory), so that a run folder works from anywhere."""
    d, t = config.data, config.train

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path)) if path else path

    pack = d.pack if d.pack in ("auto", "none") else absolute(d.pack)
    folders = {k: absolute(getattr(d, k)) for k in ("root", "pack_cache", "local_copy")}
    return replace(
        config,
        data=replace(d, pack=pack, **folders),
        train=replace(t, out=absolute(t.out), deepspeed_config=absolute(t.deepspeed_config)),
    )


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_json(config: Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def validate_model(m: ModelConfig) -> ModelConfig:
    if m.patch_size <= 0 or m.img_size <= 0:
        raise ConfigError("image size and patch size must be positive")
    for name in ("img_size", "in_chans", "embed_dim", "num_heads", "depth", "decoder_channels"):
        value, most = getattr(m, name), MAX_LAYERS if name == "depth" else MAX_SIZE
        if not 0 < value <= most:
            raise ConfigError(f"{name} must be between 1 and {most}, got {_shown(value)}")
    if m.img_size % m.patch_size:
        raise ConfigError(
            f"image size {m.img_size} is not divisible by the patch size {m.patch_size}"
        )
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"embed_dim {m.embed_dim} is not divisible by num_heads {m.num_heads}")
    k = m.n_gaussians
    if k not in GAUSSIAN_WORDS and not (isinstance(k, int) and 0 < k <= MAX_GAUSSIANS):
        raise ConfigError(
            f"n_gaussians (the number of Gaussians) must be between 1 and {MAX_GAUSSIANS}, "
            f"auto or all, got {_shown(k) if isinstance(k, int) else repr(k)}"
        )
    if m.mlp_ratio <= 0:
        raise ConfigError(f"mlp_ratio must be positive, got {m.mlp_ratio}")
    if m.noise_std < 0:
        raise ConfigError(f"the noise level must not be negative, got {m.noise_std}")
    if m.mdn_condition not in MDN_CONDITIONS:
        raise ConfigError(f"mdn_condition must be one of {MDN_CONDITIONS}, got {m.mdn_condition!r}")
    return m


def validate(c: Config) -> Config:
    """The config if every value is valid, else a ConfigError naming the first that is not."""
    validate_model(c.model)
    checks = [*_count_checks(c), *_train_checks(c), *_data_checks(c.data), *_eval_checks(c)]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return c


def _count_checks(c: Config) -> list[tuple[bool, str]]:
    """Upper bounds and plain names first: later checks compute with these values."""
    d, t, e = c.data, c.train, c.eval
    bounded = [
        ("epochs", t.epochs, MAX_EPOCHS),
        ("batch_size", t.batch_size, MAX_BATCH),
        ("train.num_workers", t.num_workers, MAX_WORKERS),
        ("data.num_workers", d.num_workers, MAX_WORKERS),
        ("max_failures", t.max_failures, MAX_EPOCHS),
        ("checkpoint_every_epochs", t.checkpoint_every_epochs, MAX_EPOCHS),
        ("tile", d.tile, MAX_SIZE),
        ("peak_patches", e.peak_patches, MAX_MAPS),
        ("n_maps", e.n_maps, MAX_MAPS),
    ]
    return [
        *(
            (value <= most, f"{name} must be at most {most}, got {_shown(value)}")
            for name, value, most in bounded
        ),
        (0 <= t.seed < MAX_SEED, f"seed must be in [0, 2**32), got {_shown(t.seed)}"),
        (
            c.preset == "" or c.preset in PRESETS,
            f"unknown preset {c.preset!r}; known presets: {', '.join(PRESETS)}",
        ),
        _plain_name("category", d.category),
        _plain_name("dataset", d.dataset),
    ]


def _shown(value: int) -> str:
    """A number for a message: 1e+300, not its 301 digits."""
    return str(value) if abs(value) < 10**12 else f"{value:.3g}"


def _plain_name(what: str, name: str) -> tuple[bool, str]:
    """A category or dataset names one folder below the root and the runs folder: no path
    separators, not `.` or `..` (`../data/brick` or `/tmp/x` would put runs elsewhere)."""
    plain = name not in (".", "..") and not any(sep in name for sep in ("/", "\\", "\0"))
    return plain, f"{what} must be a plain name (no /, \\, . or ..), got {name!r}"


def _train_checks(c: Config) -> list[tuple[bool, str]]:
    t = c.train
    return [
        (t.epochs > 0, f"epochs must be positive, got {t.epochs}"),
        (t.batch_size > 0, f"batch size must be positive, got {t.batch_size}"),
        (t.lr > 0, f"learning rate must be positive, got {t.lr}"),
        (t.weight_decay >= 0, f"weight_decay must not be negative, got {t.weight_decay}"),
        (t.grad_clip >= 0, f"grad_clip must not be negative (0: off), got {t.grad_clip}"),
        (
            min(t.w_mse, t.w_ssim, t.w_nll) >= 0,
            f"loss weights must not be negative, got {t.w_mse}, {t.w_ssim}, {t.w_nll}",
        ),
        (t.gpus_per_worker >= 0, f"gpus_per_worker must not be negative, got {t.gpus_per_worker}"),
        (t.cpus_per_worker > 0, f"cpus_per_worker must be positive, got {t.cpus_per_worker}"),
        (t.mdn_loss in MDN_LOSSES, f"mdn_loss must be one of {MDN_LOSSES}, got {t.mdn_loss!r}"),
        (
            t.mixture_fit in MIXTURE_FITS,
            f"mixture_fit must be one of {MIXTURE_FITS}, got {t.mixture_fit!r}",
        ),
        (
            c.model.n_gaussians != "all" or (t.mixture_fit == "kernel" and c.model.mdn_detach),
            f"n_gaussians all (a Gaussian on every training token) is for mixture_fit kernel "
            f"with mdn_detach, got {t.mixture_fit!r}; give a number",
        ),
        (
            t.mixture_fit == "sgd" or c.model.mdn_condition == "global",
            f"mixture_fit {t.mixture_fit} needs mdn_condition global (one mixture for every "
            f"token), got {c.model.mdn_condition!r}; use mixture_fit sgd for the others",
        ),
        (
            t.mixture_fit == "sgd" or t.mdn_loss == "mixture",
            f"mixture_fit {t.mixture_fit} fits the true mixture likelihood; mdn_loss "
            f"{t.mdn_loss!r} needs mixture_fit sgd",
        ),
        (t.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {t.precision!r}"),
        (t.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {t.strategy!r}"),
        (
            t.placement in PLACEMENTS,
            f"placement must be one of {PLACEMENTS}, got {t.placement!r}",
        ),
        (t.num_workers >= 1, f"num_workers must be at least 1, got {t.num_workers}"),
        (
            t.batch_size % t.num_workers == 0,
            f"batch size {t.batch_size} must divide evenly over {t.num_workers} workers",
        ),
        (t.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}"),
        (t.max_failures >= 0, f"max_failures must not be negative, got {t.max_failures}"),
        (
            t.checkpoint_every_epochs >= 0 and t.checkpoint_every_minutes >= 0,
            "checkpoint_every_epochs and checkpoint_every_minutes must not be negative (0: off)",
        ),
    ]


def _data_checks(d: DataConfig) -> list[tuple[bool, str]]:
    return [
        (0 < d.val_fraction < 1, f"val_fraction must be in (0, 1), got {d.val_fraction}"),
        (
            d.tile >= 0 and 0 <= d.tile_overlap < max(d.tile, 1),
            f"tiles need tile >= 0 and 0 <= overlap < tile, got {d.tile} and {d.tile_overlap}",
        ),
        (d.num_workers >= 0, f"num_workers must not be negative, got {d.num_workers}"),
    ]


def _eval_checks(c: Config) -> list[tuple[bool, str]]:
    e = c.eval
    return [
        (e.score in SCORES, f"score must be one of {SCORES}, got {e.score!r}"),
        (e.scale in SCORE_SCALES, f"score scale must be one of {SCORE_SCALES}, got {e.scale!r}"),
        (
            e.image_score in IMAGE_SCORES,
            f"image_score must be one of {IMAGE_SCORES}, got {e.image_score!r}",
        ),
        (e.peak_patches >= 1, f"peak_patches must be at least 1, got {e.peak_patches}"),
        (e.recon_weight >= 0, f"recon_weight must not be negative, got {e.recon_weight}"),
        (
            e.neighbour_weight >= 0,
            f"neighbour_weight must not be negative, got {e.neighbour_weight}",
        ),
        (
            e.image_score != "peak+recon+neighbour" or kernel_scope(c) == "position",
            "image_score peak+recon+neighbour compares whole images token by token and needs "
            "a kernel by position (train.mixture_fit kernel, eval.kernel_scope position)",
        ),
        (e.smoothing_sigma >= 0, f"smoothing sigma must not be negative, got {e.smoothing_sigma}"),
        (e.grid_shifts >= 1, f"grid_shifts must be at least 1, got {e.grid_shifts}"),
        (
            e.kernel_scope in KERNEL_SCOPES,
            f"kernel_scope must be one of {KERNEL_SCOPES}, got {e.kernel_scope!r}",
        ),
        (
            e.kernel_scope != "position" or c.train.mixture_fit == "kernel",
            f"kernel_scope position needs mixture_fit kernel, got {c.train.mixture_fit!r}",
        ),
        (
            c.model.patch_size % max(e.grid_shifts, 1) == 0,
            f"grid_shifts must divide the patch size {c.model.patch_size} (the shifted grids "
            f"interleave at a whole-pixel stride), got {e.grid_shifts}; set eval.grid_shifts "
            f"to 1 or a divisor",
        ),
    ]


def _replace(obj: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {where} option(s): {', '.join(unknown)}")
    return replace(obj, **{k: _typed(known[k], v, where) for k, v in values.items()})


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _typed(f: dataclasses.Field | SimpleNamespace, value: Any, where: str) -> Any:
    """`value` as the field's type. YAML reads `1e-4` as a string, so numbers written as
    strings are accepted; anything else of the wrong type is a ConfigError."""
    kind = f.type
    if kind == "int | str":  # a count or one of its words (model.n_gaussians)
        if isinstance(value, str) and value.strip().lower() in GAUSSIAN_WORDS:
            return value.strip().lower()
        try:
            return _typed(SimpleNamespace(type="int", name=f.name), value, where)
        except ConfigError:
            raise ConfigError(
                f"{where} option {f.name} must be a whole number, auto or all, got {value!r}"
            ) from None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind in ("int", "float") and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and kind == "float":
            if not math.isfinite(number):  # no option means anything at infinity or NaN
                raise ConfigError(f"{where} option {f.name} must be a finite number, got {value!r}")
            return number
        if number is not None and number.is_integer():
            return int(number)
    if kind not in _KINDS:
        return value
    raise ConfigError(f"{where} option {f.name} must be {_KINDS[kind]}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown {where} option(s): {', '.join(unknown)}")
    values = {}
    for name, value in raw.items():
        sub = _SECTIONS.get(name) if cls is Config else None
        values[name] = _build(sub, value, name) if sub else _typed(known[name], value, where)
    return cls(**values)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
