"""A run's calibration (`vtadl.inference.calibration`: what the validation images say is
normal) stored in its calibration.json, and the evaluation settings it was made for."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from vtadl.config import Config, gaussians, kernel_scope, resolved_image_score
from vtadl.inference.calibration import (
    COMPOSITE,
    NEAR_FLOOR,
    UNSCALED,
    Calibration,
    Part,
    image_part,
)

__all__ = ["COMPOSITE", "NEAR_FLOOR", "UNSCALED", "Calibration", "Part", "image_part"]

log = logging.getLogger(__name__)


def calibration_key(config: Config) -> dict:
    """The evaluation settings a calibration's threshold and standardisation depend on:
    the eval section (the image score resolved), without the number of heat maps, and the
    mixture's fit and K (resolved)."""
    key = asdict(config.eval)
    key.pop("n_maps", None)
    key["image_score"] = resolved_image_score(config)
    key["kernel_scope"] = kernel_scope(config)
    key["mixture_fit"] = config.train.mixture_fit
    key["n_gaussians"] = gaussians(config)
    return key


def read_calibration(path: Path, config: Config) -> Calibration | None:
    """A run's stored calibration, or None if it is missing or unreadable, or was made for
    other evaluation settings (`calibration_key`). One written before the settings were
    recorded is kept when it is for the same scale and the image score needs no
    image-level parts (the same threshold as a new one would have)."""
    try:
        cal = Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if cal.made_for is not None:
        return cal if cal.made_for == calibration_key(config) else None
    if resolved_image_score(config) in COMPOSITE:
        return None
    return cal if cal.scale == config.eval.scale else None


def store_calibration(path: Path, calibration: Calibration) -> None:
    """Write calibration.json; a run folder that cannot be written is scored all the same."""
    try:
        path.write_text(json.dumps(calibration.to_dict(), indent=2))
    except OSError as exc:
        log.warning("could not store the calibration in %s: %s", path, exc)
