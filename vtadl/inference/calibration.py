"""What the validation images (normal, held out) say is normal, as numbers: how each raw score
becomes a standardised map, the image threshold and the display range of heat maps. A run
stores it in calibration.json (`vtadl.scoring.calibration`), an exported detector in its
metadata; numpy only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The image scores made of parts standardised over the validation images.
COMPOSITE = ("peak+recon", "peak+recon+neighbour")
# An image's distance to the nearest training image is taken as at least this fraction of
# the validation images' median before its log: a near-duplicate of a training image (a
# distance about 0) would otherwise give a log far below every other and, on a validation
# image, swamp the part's spread.
NEAR_FLOOR = 0.1


@dataclass(frozen=True)
class Part:
    """How one raw score (NLL or reconstruction error) becomes a standardised map."""

    floor: float  # excess is measured above this level ...
    spread: float  # ... in units of this, before log1p (scale "log" only)
    mean: float  # mean and standard deviation of the scaled score on validation images
    std: float

    def apply(self, raw: np.ndarray, scale: str) -> np.ndarray:
        if scale == "log":
            raw = np.log1p(np.maximum(raw - self.floor, 0) / self.spread)
        return (raw - self.mean) / self.std

    @classmethod
    def fit(cls, raw: np.ndarray, scale: str, floor: float, spread: float) -> Part:
        spread = max(spread, 1e-12)
        scaled = cls(floor, spread, 0.0, 1.0).apply(raw, scale)
        return cls(floor, spread, float(scaled.mean()), float(scaled.std()) + 1e-8)


UNSCALED = Part(0.0, 1.0, 0.0, 1.0)


def image_part(values: list[float]) -> Part:
    """Standardisation of one image-level score by its values on the validation images
    (by their mean only, with fewer than two: a spread needs two)."""
    if len(values) < 2:
        return Part(0.0, 1.0, float(np.mean(values)), 1.0)
    return Part(0.0, 1.0, float(np.mean(values)), max(float(np.std(values)), 1e-6))


@dataclass(frozen=True)
class Calibration:
    """Statistics of the validation (normal) images: standardisation and thresholds."""

    scale: str
    nll: Part
    rec: Part
    image_threshold: float  # the highest image score among the validation images
    display_low: float
    display_high: float
    # The image scores "peak+recon" and "peak+recon+neighbour" standardise their parts, the
    # peak, the log of the mean squared reconstruction error and the log of the distance to
    # the nearest training image's tokens, by their spread over the validation images.
    image_peak: Part
    image_rec: Part
    image_near: Part = UNSCALED
    # The evaluation settings this calibration (its threshold above all) was made for
    # (`calibration_key`); None in one written before they were recorded.
    made_for: dict | None = None

    @classmethod
    def fit(cls, nll: np.ndarray, rec: np.ndarray, scale: str) -> Calibration:
        """The scaling of both raw scores from their values on the validation images.

        The NLL's excess is taken above its median, in standard deviations (an NLL has no
        natural zero); the squared error's from zero, in units of its median.
        """
        return cls(
            scale=scale,
            nll=Part.fit(nll, scale, float(np.median(nll)), float(nll.std())),
            rec=Part.fit(rec, scale, 0.0, float(np.median(rec))),
            image_threshold=0.0,
            display_low=0.0,
            display_high=1.0,
            image_peak=UNSCALED,
            image_rec=UNSCALED,
            image_near=UNSCALED,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Calibration:
        raw = dict(raw)
        for name in ("nll", "rec"):
            raw[name] = Part(**raw[name])
        # written before the image-level parts existed: only the composite scores need them
        for name in ("image_peak", "image_rec", "image_near"):
            raw[name] = Part(**raw[name]) if name in raw else UNSCALED
        return cls(**raw)
