"""Anomaly maps, exact metrics on the test split, and heat maps.

A map starts at model resolution from two raw scores: the per-patch mixture NLL on the token
grid and the per-pixel squared reconstruction error. Both are heavy tailed: a defect's
patches score tens of times the normal spread. With `scale: log` (default) each becomes
log(1 + excess / spread), the excess over a normal level measured on the validation images
(held-out normal training images), so a single extreme patch cannot swamp its neighbours
once the map is smoothed; the NLL is scaled on its grid and then bilinearly upsampled. Each
part is then standardised with the mean and standard deviation it has on the validation
images, so parts can be summed and a map reads as "standard deviations above normal". The
map is upsampled to the image's original resolution and Gaussian-smoothed; metrics are
computed there, against the masks at their own resolution. The image score is by default
the map's peak before upsampling and smoothing (`Scorer.scored`); for the MNIST layout the peak
plus 0.3 times the log of the image's mean squared reconstruction error plus 0.5 times the log
of its tokens' distance to the nearest training image's (vtadl.neighbours), each standardised
on the validation images (`peak+recon+neighbour`); the smoothed map's maximum, as in the
official MVTec evaluation, is an option.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vtadl import metrics
from vtadl.config import (
    FITTED_AFTER_TRAINING,
    Config,
    EvalConfig,
    kernel_scope,
    resolved_image_score,
)
from vtadl.data.prepare import to_float
from vtadl.data.source import Source, category_source
from vtadl.data.tiles import stitch_tiles
from vtadl.exceptions import ConfigError, DataError, RunError
from vtadl.grids import grid_offsets, nll_map, shift_images
from vtadl.losses import MDN_LOSS_FUNCTIONS, Kernel
from vtadl.mixture_fit import apply_mixture, fitted_mixture
from vtadl.model import VTADL, Mixture
from vtadl.neighbours import ImageNeighbours
from vtadl.training import BEST, autocast, model_from_checkpoint, pick_device
from vtadl.visualize import save_heatmap

log = logging.getLogger(__name__)

# Test and validation images are scored this many at a time (their tiles together): the
# batches of the forward pass fill, and the maps of only this many are held unscored.
IMAGES_PER_PASS = 8


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


_UNSCALED = Part(0.0, 1.0, 0.0, 1.0)


def _image_part(values: list[float]) -> Part:
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
    image_near: Part = _UNSCALED
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
            image_peak=_UNSCALED,
            image_rec=_UNSCALED,
            image_near=_UNSCALED,
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
            raw[name] = Part(**raw[name]) if name in raw else _UNSCALED
        return cls(**raw)


class Raw(NamedTuple):
    """The raw scores of a batch of model inputs (images, or tiles): the mixture NLL of
    every patch on every shifted grid (N, S, g, g), the squared reconstruction error per
    pixel (N, H, W), and, when asked for, the distance of each input's tokens to the
    nearest training image's (N,), else None."""

    nll: np.ndarray
    rec: np.ndarray
    near: np.ndarray | None = None

    def split(self, cuts: Sequence[int]) -> list[Raw]:
        """The scores of consecutive groups of inputs, cut before each index in `cuts`."""
        parts = [np.split(a, cuts) if a is not None else [None] * (len(cuts) + 1) for a in self]
        return [Raw(*group) for group in zip(*parts)]


@torch.no_grad()
def _patch_nll(
    model: VTADL, x: torch.Tensor, config: Config, grid: int = 0, kernel: Kernel | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch NLL on the token grid (B, g, g), the squared reconstruction error averaged
    over channels (B, H, W), and the tokens (B, L, D). `grid`: the index of x's shifted
    grid; `kernel`: the head's mixture prepared as a kernel (`prepared_kernel`), which
    scores the same NLL."""
    with autocast(x.device, config.train.precision):
        out = model(x, grid=grid)
    g = model.grid_size
    if kernel is not None:
        nll = kernel.nll(out.tokens.float())
    else:
        mixture = Mixture(*(t.float() for t in out.mixture))
        nll = MDN_LOSS_FUNCTIONS[config.train.mdn_loss](out.tokens.float(), mixture)
    rec = (out.reconstruction.float() - x).square().mean(1)
    return nll.view(-1, g, g), rec, out.tokens


@torch.no_grad()
def prepared_kernel(model: VTADL, config: Config) -> Kernel | None:
    """The model's mixture as a `Kernel`, when it is one (a kernel fit over every token,
    scored by the true mixture NLL), else None."""
    head = model.mdn
    if config.train.mdn_loss != "mixture" or head.condition != "global" or head.means.ndim != 2:
        return None
    mixture = Mixture(*(t.float() for t in head(head.means[None, :1])))
    return Kernel(mixture) if Kernel.fits(mixture) else None


@torch.no_grad()
def raw_scores(
    model: VTADL,
    images: np.ndarray,
    config: Config,
    device: torch.device,
    batch_size: int = 8,
    kernel: Kernel | None = None,
    neighbours: ImageNeighbours | None = None,
) -> Raw:
    """uint8 (N, H, W, 3) images at model size -> the mixture NLL of every patch (N, S, g, g)
    and the squared reconstruction error per pixel (N, H, W); given `neighbours`, also each
    image's distance to the nearest training image in token space (N,).

    S = `eval.grid_shifts`^2 patch grids: a grid of stride p sees a defect only in whole
    p x p cells, so the image is also scored shifted by multiples of p/shifts pixels (reflect
    padding at the border; offsets from `grid_offsets`), which samples the NLL on a finer
    grid at S forward passes. `nll_map` puts the grids back together.
    """
    model.eval()
    offsets = grid_offsets(images.shape[2] // model.grid_size, config.eval.grid_shifts)
    nll, rec, near = [], [], []
    for start in range(0, len(images), batch_size):
        x = to_float(torch.from_numpy(images[start : start + batch_size]).to(device))
        x = x.permute(0, 3, 1, 2)
        grids, tokens = [], []
        for k, (dy, dx) in enumerate(offsets):
            n, r, t = _patch_nll(model, shift_images(x, dy, dx), config, k, kernel)
            grids.append(n)
            if neighbours is not None:  # held for the batch only when they are compared
                tokens.append(t)
            if not (dy or dx):
                rec.append(r.cpu().numpy())
        nll.append(torch.stack(grids, 1).cpu().numpy())
        if neighbours is not None:
            near.append(neighbours.distance(tokens).cpu().numpy())
    return Raw(np.concatenate(nll), np.concatenate(rec), np.concatenate(near) if near else None)


def _standardised(nll: np.ndarray, rec: np.ndarray, cal: Calibration, score: str):
    """Combine the two raw scores into one map per image at model resolution: (N, H, W).

    The NLL is scaled on its patch grid, before upsampling, so that interpolation works on
    the scaled values.
    """
    parts = []
    if score in ("nll", "nll+recon"):
        parts.append(nll_map(cal.nll.apply(nll, cal.scale), rec.shape[-2:]))
    if score in ("recon", "nll+recon"):
        parts.append(cal.rec.apply(rec, cal.scale))
    return sum(parts)


def to_original(amap: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Upsample a map to `shape` (bilinear) and smooth it with a Gaussian of `sigma` pixels."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear")[0, 0].numpy()
    return gaussian_filter(out, sigma) if sigma > 0 else out


def _mean_of_highest(values: np.ndarray, k: int) -> float:
    flat = values.ravel()
    k = min(k, flat.size)
    return float(np.partition(flat, flat.size - k)[-k:].mean())


def _log_mse(rec: np.ndarray) -> float:
    """The log of an image's mean squared reconstruction error (over its tiles, if any)."""
    return float(np.log(rec.mean() + 1e-12))


# An image's distance to the nearest training image is taken as at least this fraction of
# the validation images' median before its log: a near-duplicate of a training image (a
# distance about 0) would otherwise give a log far below every other and, on a validation
# image, swamp the part's spread.
NEAR_FLOOR = 0.1


def _log_near(near: np.ndarray, floor: float) -> float:
    """The log of an image's token distance to the nearest training image (of its tiles'
    mean distance, if it has tiles), at least `floor`."""
    return float(np.log(max(float(near.mean()), floor) + 1e-12))


def calibration_key(config: Config) -> dict:
    """The evaluation settings a calibration's threshold and standardisation depend on:
    the eval section (the image score resolved), without the number of heat maps."""
    key = asdict(config.eval)
    key.pop("n_maps", None)
    key["image_score"] = resolved_image_score(config)
    key["kernel_scope"] = kernel_scope(config)
    return key


_COMPOSITE = ("peak+recon", "peak+recon+neighbour")


def image_score(amap: np.ndarray, how: str = "max") -> float:
    if how == "max":
        return float(amap.max())
    if how == "mean":
        return float(amap.mean())
    return _mean_of_highest(amap, max(1, amap.size // 100))


def _smooth(amap: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(amap, sigma) if sigma > 0 else amap


class Scorer:
    """A trained run, ready to turn images into full-resolution anomaly maps."""

    def __init__(
        self,
        run_dir: str | Path,
        checkpoint: str = BEST,
        eval_overrides: dict | None = None,
        mixture_fit: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise RunError(f"run folder not found: {self.run_dir}")
        self.config, model, self.state = model_from_checkpoint(
            self.run_dir / "checkpoints" / checkpoint
        )
        overrides = {k: v for k, v in (eval_overrides or {}).items() if v is not None}
        if overrides:
            self.config = self.config.override(eval=overrides)
        refitted = mixture_fit is not None and mixture_fit != self.config.train.mixture_fit
        if refitted:
            self.config = _refit(self.config, mixture_fit)
        self.device = pick_device(self.config.train.device)
        self.model = model.to(self.device)
        self._source: Source | None = None
        if self.config.train.mixture_fit in FITTED_AFTER_TRAINING:
            params = fitted_mixture(
                self.model,
                self.run_dir,
                checkpoint,
                self.state["epoch"],
                self.source,
                self.device,
                self.config.train.seed,
                how=self.config.train.mixture_fit,
                shifts=self.eval.grid_shifts,
                by_position=kernel_scope(self.config) == "position",
            )
            apply_mixture(self.model, params)
        self.kernel = prepared_kernel(self.model, self.config)
        self.neighbours = None
        if resolved_image_score(self.config) == "peak+recon+neighbour":
            self.neighbours = ImageNeighbours.of(self.model)
            if self.neighbours is None:
                raise ConfigError(
                    "image_score peak+recon+neighbour needs a kernel by position, and this "
                    "run's mixture is not one"
                )
        # The calibration of the run's own score and best checkpoint is kept; other scores,
        # mixtures and checkpoints are calibrated afresh, and so is a calibration made for
        # other settings (another version's defaults) or by an older version that lacks
        # what the score needs.
        own = not (overrides or refitted) and checkpoint == BEST
        cal_path = self.run_dir / "calibration.json"
        self.calibration = _read_calibration(cal_path, self.config) if own else None
        if self.calibration is None:
            self.calibration = self._calibrate()
            if own:
                try:
                    cal_path.write_text(json.dumps(self.calibration.to_dict(), indent=2))
                except OSError as exc:  # a read-only run folder: scored, not stored
                    log.warning("could not store the calibration in %s: %s", cal_path, exc)

    @property
    def eval(self) -> EvalConfig:
        return self.config.eval

    @property
    def source(self) -> Source:
        if self._source is None:
            self._source = category_source(self.config)
        return self._source

    def raw(self, inputs: np.ndarray) -> Raw:
        return raw_scores(
            self.model,
            inputs,
            self.config,
            self.device,
            kernel=self.kernel,
            neighbours=self.neighbours,
        )

    def raw_many(self, inputs: Sequence[np.ndarray]) -> list[Raw]:
        """The raw scores of several images (their inputs: one image, or its tiles each),
        scored in shared batches: a mixture's per-call work (a kernel's tens of thousands
        of Gaussians) is then spread over a whole batch, not repeated for every image."""
        return self.raw(np.concatenate(inputs)).split(np.cumsum([len(x) for x in inputs])[:-1])

    def scored(
        self,
        raw: Raw,
        corners: np.ndarray | None,
        shape: tuple[int, int],
        calibration: Calibration | None = None,
    ) -> tuple[np.ndarray, float]:
        """One image's map at its original resolution, from the raw scores of its input(s),
        and its image score: from the map (max, mean, top1pct), or its `peak` before
        upsampling and smoothing: for the NLL, the mean of the `eval.peak_patches` highest
        standardised patch scores on the image's token grids (every shift and tile); with
        the reconstruction error, of the highest values of the map at model resolution.
        `peak+recon` adds `eval.recon_weight` times the log of the image's mean squared
        reconstruction error, `peak+recon+neighbour` that and `eval.neighbour_weight` times
        the log of its tokens' distance to the nearest training image's, every part
        standardised on the validation images."""
        cal = calibration or self.calibration
        small = _standardised(raw.nll, raw.rec, cal, self.eval.score)
        if corners is None:
            amap = to_original(small[0], shape, self.eval.smoothing_sigma)
        else:
            amap = _smooth(stitch_tiles(small, corners, shape), self.eval.smoothing_sigma)
        how = resolved_image_score(self.config)
        if how != "peak" and how not in _COMPOSITE:
            return amap, image_score(amap, how)
        peak = self._peak(raw, small, cal)
        if how == "peak":
            return amap, peak
        e = self.eval
        total = cal.image_peak.apply(peak, "linear")
        total += e.recon_weight * cal.image_rec.apply(_log_mse(raw.rec), "linear")
        if how == "peak+recon+neighbour":
            near = _log_near(raw.near, cal.image_near.floor)
            total += e.neighbour_weight * cal.image_near.apply(near, "linear")
        return amap, float(total)

    def _peak(self, raw: Raw, small: np.ndarray, cal: Calibration):
        values = cal.nll.apply(raw.nll, cal.scale) if self.eval.score == "nll" else small
        return _mean_of_highest(values, self.eval.peak_patches)

    def _calibrate(self) -> Calibration:
        """Standardisation and threshold from the validation images (normal, held out)."""
        src = self.source
        items = src.items("val")
        inputs = [src.model_input("val", i) for i in range(len(items))]
        raws = [
            raw
            for start in range(0, len(inputs), IMAGES_PER_PASS)
            for raw in self.raw_many([x for x, _ in inputs[start : start + IMAGES_PER_PASS]])
        ]
        nll = np.concatenate([r.nll for r in raws])
        rec = np.concatenate([r.rec for r in raws])
        base = Calibration.fit(nll, rec, self.eval.scale)
        how = resolved_image_score(self.config)
        if how in _COMPOSITE:
            if len(raws) < 2:
                log.warning(
                    "%s weighs its parts by their spread over the validation images, and %d "
                    "is too few: they are added unweighed (raise data.val_fraction)",
                    how,
                    len(raws),
                )
            score = self.eval.score
            peaks = [self._peak(r, _standardised(r.nll, r.rec, base, score), base) for r in raws]
            base = replace(
                base,
                image_peak=_image_part(peaks),
                image_rec=_image_part([_log_mse(r.rec) for r in raws]),
            )
            if how == "peak+recon+neighbour":
                floor = NEAR_FLOOR * float(np.median([r.near.mean() for r in raws]))
                part = _image_part([_log_near(r.near, floor) for r in raws])
                base = replace(base, image_near=replace(part, floor=floor))
        maps, scores = zip(
            *(
                self.scored(raw, corners, item.shape, base)
                for raw, (_, corners), item in zip(raws, inputs, items)
            )
        )
        threshold = max(scores)
        low = float(np.median(np.concatenate([m.ravel() for m in maps])))
        return replace(
            base,
            image_threshold=threshold,
            display_low=low,
            display_high=low + 2 * max(threshold - low, 1e-6),
            made_for=calibration_key(self.config),
        )


def _refit(config: Config, how: str) -> Config:
    """The run's config with its mixture fitted after training another way: possible
    between the fits that leave the trained network alone (em, kernel), not for a mixture
    that was trained with it (sgd)."""
    if config.train.mixture_fit not in FITTED_AFTER_TRAINING or how not in FITTED_AFTER_TRAINING:
        raise ConfigError(
            f"this run's mixture was fitted by {config.train.mixture_fit}; it can be refitted "
            f"after training as {' or '.join(FITTED_AFTER_TRAINING)} only when it was fitted "
            f"that way, got {how!r}"
        )
    return config.override(train={"mixture_fit": how})


def _read_calibration(path: Path, config: Config) -> Calibration | None:
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
    if resolved_image_score(config) in _COMPOSITE:
        return None
    return cal if cal.scale == config.eval.scale else None


def evaluate_run(
    run_dir: str | Path,
    *,
    eval_overrides: dict | None = None,
    mixture_fit: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score the test split of a run with its best checkpoint; write metrics.json and maps/.

    `eval_overrides` (score, image_score, smoothing_sigma) evaluate the same model another way,
    and so does `mixture_fit` (em or kernel, for a run fitted either way); metrics.json
    records which way. Pixel metrics are None, with the reason in
    `pixel_metrics_absent`, when no test mask marks a pixel (MNIST, or empty masks).
    """
    scorer = Scorer(run_dir, eval_overrides=eval_overrides, mixture_fit=mixture_fit)
    c, src = scorer.config, scorer.source
    items = src.items("test")
    if not items:
        raise DataError(f"{c.data.dataset}/{c.data.category} has no test images")
    maps, masks, scores = [], [], []
    for start in range(0, len(items), IMAGES_PER_PASS):
        idx = range(start, min(start + IMAGES_PER_PASS, len(items)))
        inputs = [src.model_input("test", i) for i in idx]
        raws = scorer.raw_many([x for x, _ in inputs])
        for i, raw, (_, corners) in zip(idx, raws, inputs):
            amap, score = scorer.scored(raw, corners, items[i].shape)
            maps.append(amap)
            scores.append(score)
            masks.append(src.mask("test", i))
            if progress:
                progress(i + 1, len(items))
    labels = np.array([it.label for it in items])
    scores = np.array(scores)
    absent = _why_no_pixel_metrics(c.data.dataset, labels, masks)
    blank = [it.name for it, m in zip(items, masks) if it.label == 1 and not m.any()]
    if blank and not absent:
        log.warning(
            "%d defective test images have masks that mark no pixel (%s%s); their pixels count "
            "as normal in the pixel metrics",
            len(blank),
            blank[0],
            ", ..." if len(blank) > 1 else "",
        )
    result = {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": None if absent else metrics.pixel_auroc(maps, masks),
        "au_pro": None if absent else metrics.au_pro(maps, masks, fpr_limit=0.3),
        "au_pro_fpr_limit": 0.3,
        "pixel_metrics_absent": absent,
        "n_test": len(labels),
        "n_anomalous": int(labels.sum()),
        "threshold": scorer.calibration.image_threshold,
        "score": scorer.eval.score,
        "score_scale": scorer.eval.scale,
        "image_score": resolved_image_score(c),
        "peak_patches": scorer.eval.peak_patches,
        "recon_weight": scorer.eval.recon_weight,
        "neighbour_weight": scorer.eval.neighbour_weight,
        "smoothing_sigma": scorer.eval.smoothing_sigma,
        "grid_shifts": scorer.eval.grid_shifts,
        "mdn_loss": c.train.mdn_loss,
        "mixture_fit": c.train.mixture_fit,
        "kernel_scope": kernel_scope(c),
        "checkpoint": BEST,
        "best_epoch": scorer.state["epoch"] + 1,
        "dataset": c.data.dataset,
        "category": c.data.category,
        "variant": c.variant,
        "by_defect": _by_defect(items, scores, maps, masks),
        "images": [
            {"name": it.name, "defect": it.defect, "label": it.label, "score": float(s)}
            for it, s in zip(items, scores)
        ],
    }
    run = Path(run_dir)
    (run / "metrics.json").write_text(json.dumps(result, indent=2))
    _write_sample_maps(run / "maps", src, items, maps, masks, scores, scorer.calibration, c.eval)
    return result


def _why_no_pixel_metrics(dataset: str, labels: np.ndarray, masks: list[np.ndarray]) -> str | None:
    if any(m.any() for m in masks):
        return None
    if dataset == "mnist":
        return "MNIST has image-level labels only, no masks"
    return f"the masks of all {int(labels.sum())} defective test images mark no pixel"


def _by_defect(items, scores: np.ndarray, maps: list, masks: list) -> dict[str, dict]:
    """Per defect type: image and pixel AUROC of that type's images against the good ones
    (the pixel AUROC pools the pixels of both; None when the type's masks mark nothing)."""
    good = [i for i, it in enumerate(items) if it.label == 0]
    out: dict[str, dict] = {}
    for defect in sorted({it.defect for it in items if it.label == 1}):
        bad = [i for i, it in enumerate(items) if it.label == 1 and it.defect == defect]
        both = good + bad
        out[defect] = {
            "n_images": len(bad),
            "image_auroc": metrics.image_auroc(scores[both], [items[i].label for i in both]),
            "pixel_auroc": (
                metrics.pixel_auroc([maps[i] for i in both], [masks[i] for i in both])
                if any(masks[i].any() for i in bad)
                else None
            ),
        }
    return out


def _write_sample_maps(out: Path, src: Source, items, maps, masks, scores, cal, ec: EvalConfig):
    """Heat maps for up to `ec.n_maps` test images, spread over the defect types."""
    out.mkdir(parents=True, exist_ok=True)
    by_defect: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_defect.setdefault(item.defect, []).append(i)
    chosen: list[int] = []
    while len(chosen) < min(ec.n_maps, len(items)):
        for idx in by_defect.values():
            if idx and len(chosen) < ec.n_maps:
                chosen.append(idx.pop(0))
    for i in chosen:
        stem = Path(items[i].name.split("#")[0]).stem + items[i].name.partition("#")[2]
        save_heatmap(
            out / f"{items[i].defect}_{stem}.png",
            src.display_image("test", i),
            maps[i],
            name=f"{items[i].name} (ground truth: {items[i].defect})",
            score=float(scores[i]),
            threshold=cal.image_threshold,
            low=cal.display_low,
            high=cal.display_high,
            mask=masks[i] if masks[i].any() else None,
        )
