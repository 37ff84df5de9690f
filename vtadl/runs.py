"""One entry point for a run, and what a `train` request means.

`train_config` resolves options into a config (or the run to resume); `fit` trains a config
with its strategy; `train_and_evaluate` is a whole run. The CLI, the queue's job function and
Tune trials all call these, so none of them knows how a strategy is launched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtadl.config import (
    Config,
    DataConfig,
    TrainConfig,
    absolute_paths,
    layered_config,
    load_stored_config,
    read_config_file,
    save_config,
    upgrade_stored,
)
from vtadl.exceptions import ConfigError
from vtadl.presets import preset_layer

if TYPE_CHECKING:
    from vtadl.training import Callbacks


def fit(
    config: Config, *, run_dir: str | Path | None = None, callbacks: Callbacks | None = None
) -> Path:
    """Train `config` with its strategy, in this process or on Ray Train workers.

    With `run_dir`, train in that folder, continuing from its last checkpoint if it has one.
    Returns the run folder.
    """
    if config.train.strategy == "single":
        from vtadl.training import fit as fit_here

        return fit_here(config, run_dir=run_dir, callbacks=callbacks)
    from vtadl.distributed import fit_distributed

    return fit_distributed(config, run_dir=run_dir, callbacks=callbacks)


def train_and_evaluate(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    callbacks: Callbacks | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A whole run: `fit`, then evaluate the best checkpoint on the test split.
    Returns the run folder and the metrics (as in its metrics.json), with the run's
    `timing` (as in its timing.json) added."""
    from vtadl.evaluation import evaluate_run

    began, tic = time.time(), time.perf_counter()
    run_dir = fit(config, run_dir=run_dir, callbacks=callbacks)
    trained = time.perf_counter()
    result = evaluate_run(run_dir, progress=progress)
    timing = run_timing(run_dir, began, trained - tic, time.perf_counter() - trained)
    (run_dir / "timing.json").write_text(json.dumps(timing, indent=2))
    return run_dir, {**result, "timing": timing}


def run_timing(
    run_dir: Path, began: float, fit_seconds: float, evaluate_seconds: float
) -> dict[str, Any]:
    """Where the wall clock of a `train_and_evaluate` call went. Only the epochs trained in
    this call count (a resumed run's earlier epochs do not); `fit_seconds` includes setup
    (packing, model, Ray), validation and checkpoints."""
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, filter(str.strip, lines)) if r["finished_at"] >= began]
    images = sum(r["images"] for r in records)
    steps = sum(r["train_seconds"] for r in records)
    return {
        "wall_seconds": round(fit_seconds + evaluate_seconds, 3),
        "fit_seconds": round(fit_seconds, 3),
        "evaluate_seconds": round(evaluate_seconds, 3),
        "epochs": len(records),
        "images": images,
        "train_seconds": round(steps, 3),
        "images_per_second": round(images / steps, 3) if steps else None,
        "wall_images_per_second": round(images / fit_seconds, 3),
    }


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# What a resumed run takes from the command line: where to find it, how long to train, and
# where its dataset now is. Every other given value must equal the stored one.
_RESUME_HONOURS = {"data.dataset", "data.category", "data.root", "train.epochs", "train.out"}
_SECTIONS = ("data", "model", "train", "eval")


def train_config(
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    config_file: str | Path | None = None,
    variant: str | None = None,
    preset: str | None = None,
    resume: bool = False,
) -> tuple[Config, Path | None]:
    """The config to train and, with `resume`, the run folder to continue.

    `overrides` holds the explicit options by section (`{"data": {"category": "bottle"}}`;
    a value of `None` means not given). Precedence: variant defaults < preset < config file <
    overrides; paths become absolute. `preset` (None: not given) wins over the file's own
    `preset:`; "" is none. A resumed run keeps the config stored with it: it honours the
    number of epochs and a new dataset root (a moved dataset), and refuses any other value
    that differs from the stored one.
    """
    unknown = set(overrides or {}) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(sorted(unknown))}")
    options = {section: _given((overrides or {}).get(section) or {}) for section in _SECTIONS}
    if resume:
        return _resume_config(config_file, variant, preset, options)
    raw = read_config_file(config_file) if config_file else {}
    in_file = raw.pop("preset", "")  # the preset's own layer records its name
    layers = (preset_layer(in_file if preset is None else preset), raw, options)
    cfg = absolute_paths(layered_config(variant or raw.get("variant", "vtadl_paper"), *layers))
    if not cfg.data.category:
        raise ConfigError("no category given (--category NAME)")
    return cfg, None


def _resume_config(
    config_file: str | Path | None,
    variant: str | None,
    preset: str | None,
    options: dict[str, dict[str, Any]],
) -> tuple[Config, Path]:
    from vtadl.run_folders import latest_run

    if config_file:
        raise ConfigError(
            "--resume continues a run with the config stored in its folder; drop --config"
        )
    data, train = options["data"], options["train"]
    if not data.get("category"):
        raise ConfigError("--resume needs --category (and --dataset) to find the run")
    out = os.path.abspath(os.path.expanduser(train.get("out", TrainConfig.out)))
    run_dir = latest_run(out, data.get("dataset", DataConfig.dataset), data["category"])
    stored = load_stored_config(run_dir / "config.yaml")
    wanted = absolute_paths(stored.override(**options))
    changed = (
        [f"variant ({stored.variant} -> {variant})"]
        if variant not in (None, stored.variant)
        else []
    )
    if preset not in (None, stored.preset):
        changed.append(f"preset ({stored.preset or 'none'} -> {preset or 'none'})")
    for section, values in options.items():
        old, new = getattr(absolute_paths(stored), section), getattr(wanted, section)
        for key in values:
            if f"{section}.{key}" not in _RESUME_HONOURS and getattr(old, key) != getattr(new, key):
                changed.append(f"{key} ({getattr(old, key)} -> {getattr(new, key)})")
    if changed:
        raise ConfigError(f"a resumed run keeps its config; cannot change {', '.join(changed)}")
    honoured = {"epochs": train.get("epochs"), "out": out}
    return absolute_paths(stored.override(train=honoured, data={"root": data.get("root")})), run_dir


def set_gaussians(run_dir: Path, k: int | str) -> Config:
    """Make K the run's own number of Gaussians (a mixture fitted after training, whose
    network K does not change): its config.yaml and the configs inside its checkpoints say
    K, and its calibration is made afresh at the next evaluation. A search's best run is so
    made from the trial that trained its network."""
    from vtadl.checkpoints import BEST, LAST, load_checkpoint, save_checkpoint
    from vtadl.scoring.scorer import refit

    config = refit(load_stored_config(run_dir / "config.yaml"), None, k)
    save_config(config, run_dir / "config.yaml")
    for name in (BEST, LAST):
        path = run_dir / "checkpoints" / name
        if path.exists():
            state = load_checkpoint(path)
            stored = Config.from_dict(upgrade_stored(state["config"]))
            save_checkpoint(path, **{**state, "config": refit(stored, None, k).to_dict()})
    (run_dir / "calibration.json").unlink(missing_ok=True)
    return config
