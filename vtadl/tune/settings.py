"""What a search does, apart from the run's config: the options, checked; the search space;
the names of what a trial reports and of the files an experiment keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vtadl.exceptions import ConfigError

OBJECTIVES = ("au_pro", "pixel_auroc", "image_auroc")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")
# Searchable parameters: config section and type.
PARAMS: dict[str, tuple[str, type]] = {
    "n_gaussians": ("model", int),
    "noise_std": ("model", float),
    "lr": ("train", float),
}
# Searched when no values are given: the paper's two ablations, the number of Gaussians and
# the noise, K under the run's own fit: the paper's values for a trained mixture (sgd) and
# EM, coreset sizes around the default for a kernel (docs/tuning.md).
NOISE_LEVELS = [0.0, 0.1, 0.2]
DEFAULT_GAUSSIAN_COUNTS = {"sgd": [10, 50, 100, 150], "em": [10, 50, 100, 150]}
DEFAULT_GAUSSIAN_COUNTS["kernel"] = [16384, 32768, "all"]
# What a trial reports to Tune: the objective, and the epoch as ASHA's time attribute.
OBJECTIVE, EPOCH = "objective", "epoch"
SPLIT_FILE, SETTINGS_FILE = "tuning_split.npz", "tune_settings.json"
RESULTS_FILE, SUMMARY_FILE = "tune_results.csv", "tuning.json"
BEST_CONFIG = "best_config.yaml"  # the winner's config: vtadl train/submit --config take it


def winner_commands(config_path: str) -> list[str]:
    """The commands that train a search's winner (its BEST_CONFIG file) again: here, and on
    the queue."""
    return [f"vtadl train --config {config_path}", f"vtadl submit --config {config_path}"]


_KINDS = {"int": "a whole number", "str": "a string"}


@dataclass(frozen=True)
class TuneSettings:
    """What a search does, apart from the run's config; JSON-serialisable."""

    space: dict[str, list] = field(default_factory=dict)  # empty: `default_space`
    search: str = "grid"
    num_samples: int = 1
    scheduler: str = "asha"
    metric: str = "au_pro"
    max_concurrent: int = 1
    grace_period: int = 0  # epochs before ASHA's first decision; 0: an eighth of the epochs
    reduction_factor: int = 2
    defects_per_kind: int = 2
    name: str = ""


def parse_values(text: str | list, name: str) -> list:
    """'10,50' (or a list) -> checked values of parameter `name`."""
    kind = PARAMS[name][1]
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i.strip() if isinstance(i, str) else i for i in items]
    if not items or any(i == "" for i in items):
        raise ConfigError(f"empty value in the {name} search values {text!r}")
    values = []
    for item in items:
        if name == "n_gaussians" and isinstance(item, str) and item.lower() == "all":
            values.append("all")  # a kernel on every training token
            continue
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} search value {item!r} is not a number") from None
        if kind is int and not number.is_integer():
            raise ConfigError(f"{name} search value {item!r} is not a whole number")
        values.append(kind(number))
    low = {"n_gaussians": 1, "noise_std": 0.0}.get(name)
    numbers = [v for v in values if v != "all"]
    if low is not None and numbers and min(numbers) < low:
        raise ConfigError(f"{name} search values must be at least {low}, got {min(numbers)}")
    if name == "lr" and min(values) <= 0:
        raise ConfigError(f"learning rates must be positive, got {min(values)}")
    return list(dict.fromkeys(values))


def settings_from_options(options: dict[str, Any]) -> TuneSettings:
    """Checked settings from options (`gaussians`, `noise`, `lr` as '1,2' or lists; `search`,
    `num_samples`, `scheduler`, `metric`, `max_concurrent`, ...)."""
    o = {k: v for k, v in options.items() if v is not None}
    given = {"n_gaussians": o.pop("gaussians", None), "noise_std": o.pop("noise", None)}
    given["lr"] = o.pop("lr", None)
    space = {k: parse_values(v, k) for k, v in given.items() if v is not None}
    o.pop("resume", None)
    known = {f for f in TuneSettings.__dataclass_fields__} - {"space"}
    unknown = sorted(set(o) - known)
    if unknown:
        raise ConfigError(f"unknown tune option(s): {', '.join(unknown)}")
    for name, value in o.items():
        kind = TuneSettings.__dataclass_fields__[name].type
        if (kind == "int") != (isinstance(value, int) and not isinstance(value, bool)) or (
            kind == "str" and not isinstance(value, str)
        ):
            raise ConfigError(f"tune option {name} must be {_KINDS[kind]}, got {value!r}")
    s = TuneSettings(space=space, **o)
    for value, allowed, what in (
        (s.search, SEARCHES, "search"),
        (s.scheduler, SCHEDULERS, "scheduler"),
        (s.metric, OBJECTIVES, "metric"),
    ):
        if value not in allowed:
            raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if s.grace_period < 0:
        raise ConfigError(f"grace_period must not be negative, got {s.grace_period}")
    for name in ("num_samples", "max_concurrent", "defects_per_kind"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(s, name)}")
    if s.reduction_factor < 2:
        raise ConfigError(f"reduction_factor must be at least 2, got {s.reduction_factor}")
    if s.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "search optuna needs the optuna package (pip install optuna)"
            ) from None
    return s


def default_space(fit: str) -> dict[str, list]:
    """What a search covers when no values are given: K under the fit `fit`, and the noise."""
    return {"n_gaussians": list(DEFAULT_GAUSSIAN_COUNTS[fit]), "noise_std": list(NOISE_LEVELS)}


def grace_period(settings: TuneSettings, epochs: int) -> int:
    return min(settings.grace_period or max(1, epochs // 8), epochs)


def search_space(settings: TuneSettings, fitted: tuple[str, ...] = ()) -> dict[str, Any]:
    """The Tune parameter space: a grid, or a choice per parameter for random and Optuna
    (Optuna rejects grid_search). Parameters in `fitted` are left out: each trial fits every
    value of them after training (`fitted_after_training`)."""
    from ray import tune

    pick = tune.grid_search if settings.search == "grid" else tune.choice
    return {name: pick(v) for name, v in settings.space.items() if name not in fitted}


def n_trials(settings: TuneSettings, fitted: tuple[str, ...] = ()) -> int:
    """How many trials (trainings) the search runs."""
    trained = [len(v) for name, v in settings.space.items() if name not in fitted]
    grid = math.prod(trained) if settings.search == "grid" else 1
    return grid * settings.num_samples
