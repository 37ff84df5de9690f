"""Options that several commands declare alike, and the one table that reads `train`'s
options into a config (`train`, `submit` and `tune` all take them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from vtadl.config import DEFAULT_GAUSSIANS, VARIANTS


def flag(name: str, help: str, *short: str):
    """A boolean option that is a flag (`--json`), shown without a value type."""
    return typer.Option(False, name, *short, help=help, metavar="")


def option(default: object, help: str, *names: str):
    """A `train` option that is None unless given (so a --config file can set it), with the
    default it stands for shown in the help (None: no default)."""
    return typer.Option(None, *names, help=help, show_default=default is not None and str(default))


def variant_default(field: str) -> str:
    """A model option's default as help text: its value in each variant."""
    values = {name.removeprefix("vtadl_"): getattr(m, field) for name, m in VARIANTS.items()}
    shown = ", ".join(f"{name} {value}" for name, value in values.items())
    return f"from the variant: {shown}"


def _gaussians_default() -> str:
    """model.n_gaussians's default as help text: auto, and what it comes to by fit."""
    by_fit = {
        fit: ", ".join(
            f"{name.removeprefix('vtadl_')} {ks[fit]}" for name, ks in DEFAULT_GAUSSIANS.items()
        )
        for fit in ("sgd", "em")
    }
    return (
        f"auto: sgd {by_fit['sgd']}; em {by_fit['em']}; kernel "
        f"{DEFAULT_GAUSSIANS['vtadl_small']['kernel']}"
    )


GAUSSIANS_DEFAULT = _gaussians_default()

REDIS_URL = typer.Option(
    None,
    "--redis-url",
    help="redis:// or rediss:// URL of the queue (default: $VTADL_REDIS_URL, else a private "
    "local server started on demand).",
)
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")

# Every `train` option that sets a config field, and the field it sets ("section.field").
TRAIN_FIELDS = {
    "dataset": "data.dataset",
    "root": "data.root",
    "category": "data.category",
    "pack": "data.pack",
    "tile": "data.tile",
    "tile_overlap": "data.tile_overlap",
    "loader_workers": "data.num_workers",
    "augment": "data.augment",
    "local_copy": "data.local_copy",
    "image_size": "model.img_size",
    "n_gaussians": "model.n_gaussians",
    "noise_std": "model.noise_std",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "mdn_loss": "train.mdn_loss",
    "mixture_fit": "train.mixture_fit",
    "precision": "train.precision",
    "device": "train.device",
    "seed": "train.seed",
    "out_dir": "train.out",
    "strategy": "train.strategy",
    "num_workers": "train.num_workers",
    "gpus_per_worker": "train.gpus_per_worker",
    "cpus_per_worker": "train.cpus_per_worker",
    "ray_address": "train.ray_address",
    "placement": "train.placement",
    "zero_stage": "train.zero_stage",
    "deepspeed_config": "train.deepspeed_config",
    "score": "eval.score",
    "score_scale": "eval.scale",
    "grid_shifts": "eval.grid_shifts",
    "kernel_scope": "eval.kernel_scope",
}
# `train`'s options that are not config fields: where the config starts, and what to print.
NOT_FIELDS = frozenset({"config", "variant", "preset", "resume", "as_json"})


def config_sections(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The config sections that `train`'s options set; None (not given) is left out, so
    that a config file or the variant decides."""
    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}, "eval": {}}
    for name, target in TRAIN_FIELDS.items():
        value = options.get(name)
        if value is not None:
            section, field = target.split(".")
            sections[section][field] = str(value) if isinstance(value, Path) else value
    return sections


def config_from_options(options: Mapping[str, Any]):
    """The config (and run folder to resume) that `train`'s options describe."""
    from vtadl.runs import train_config

    return train_config(
        overrides=config_sections(options),
        config_file=options.get("config"),
        variant=options.get("variant"),
        preset=options.get("preset"),
        resume=options.get("resume", False),
    )
