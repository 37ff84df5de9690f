"""Anomaly maps, exact metrics on the test split, heat maps, and prediction on new images.

A map starts at model resolution: the per-patch mixture NLL (bilinearly upsampled from the
token grid) and/or the per-pixel reconstruction error. Each is standardised with the mean and
standard deviation it has on the validation images (held-out normal training images), so the
two can be summed and a map reads as "standard deviations above normal". The map is then
upsampled to the image's original resolution and Gaussian-smoothed; metrics are computed
there, against the masks at their own resolution. The image score is the map's maximum by
default, as in the official MVTec evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vtadl import metrics
from vtadl.config import Config, EvalConfig
from vtadl.data.images import image_size, load_image, load_mask
from vtadl.data.prepare import index_splits, load_arrays
from vtadl.data.samples import Sample
from vtadl.exceptions import DataError, RunError
from vtadl.losses import MDN_LOSS_FUNCTIONS
from vtadl.model import VTADL, Mixture
from vtadl.training import BEST, autocast, model_from_checkpoint, pick_device
from vtadl.visualize import save_heatmap

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Calibration:
    """Statistics of the validation (normal) images: standardisation and thresholds."""

    nll_mean: float
    nll_std: float
    rec_mean: float
    rec_std: float
    image_threshold: float  # the highest image score among the validation images
    display_low: float
    display_high: float


@torch.no_grad()
def raw_scores(
    model: VTADL, images: np.ndarray, config: Config, device: torch.device, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) images at model size -> per-patch NLL (N, g, g), squared
    reconstruction error averaged over channels (N, H, W)."""
    model.eval()
    nll_fn = MDN_LOSS_FUNCTIONS[config.train.mdn_loss]
    nll, rec = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        with autocast(device, config.train.precision):
            out = model(x)
        g = model.grid_size
        mixture = Mixture(*(t.float() for t in out.mixture))
        nll.append(nll_fn(out.tokens.float(), mixture).view(-1, g, g).cpu().numpy())
        rec.append((out.reconstruction.float() - x).square().mean(1).cpu().numpy())
    return np.concatenate(nll), np.concatenate(rec)


def _standardised(nll: np.ndarray, rec: np.ndarray, cal: Calibration | None, score: str):
    """Combine the two raw scores into one map per image at model resolution: (N, H, W)."""
    size = rec.shape[-1]
    parts = []
    if score in ("nll", "nll+recon"):
        up = F.interpolate(torch.from_numpy(nll)[:, None], size=(size, size), mode="bilinear")
        up = up[:, 0].numpy()
        parts.append(up if cal is None else (up - cal.nll_mean) / cal.nll_std)
    if score in ("recon", "nll+recon"):
        parts.append(rec if cal is None else (rec - cal.rec_mean) / cal.rec_std)
    return sum(parts)


def to_original(amap: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Upsample a map to `shape` (bilinear) and smooth it with a Gaussian of `sigma` pixels."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear")[0, 0].numpy()
    return gaussian_filter(out, sigma) if sigma > 0 else out


def image_score(amap: np.ndarray, how: str = "max") -> float:
    if how == "max":
        return float(amap.max())
    if how == "mean":
        return float(amap.mean())
    flat = amap.ravel()
    k = max(1, flat.size // 100)
    return float(np.partition(flat, flat.size - k)[-k:].mean())


def calibrate(
    model: VTADL, val_images: np.ndarray, config: Config, device: torch.device
) -> Calibration:
    nll, rec = raw_scores(model, val_images, config, device)
    up = _standardised(nll, rec, None, "nll")
    base = Calibration(
        nll_mean=float(up.mean()),
        nll_std=float(up.std()) + 1e-8,
        rec_mean=float(rec.mean()),
        rec_std=float(rec.std()) + 1e-8,
        image_threshold=0.0,
        display_low=0.0,
        display_high=1.0,
    )
    e = config.eval
    maps = _standardised(nll, rec, base, e.score)
    size = val_images.shape[1:3]
    final = np.stack([to_original(m, size, e.smoothing_sigma) for m in maps])
    threshold = max(image_score(m, e.image_score) for m in final)
    low = float(np.median(final))
    return Calibration(
        **{
            **asdict(base),
            "image_threshold": threshold,
            "display_low": low,
            "display_high": low + 2 * max(threshold - low, 1e-6),
        }
    )


class Scorer:
    """A trained run, ready to turn images into full-resolution anomaly maps."""

    def __init__(
        self, run_dir: str | Path, checkpoint: str = BEST, eval_overrides: dict | None = None
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
        self.device = pick_device(self.config.train.device)
        self.model = model.to(self.device)
        # The calibration of the run's own score is kept; other scores are calibrated afresh.
        cal_path = self.run_dir / "calibration.json"
        if cal_path.exists() and not overrides:
            self.calibration = Calibration(**json.loads(cal_path.read_text()))
        else:
            c = self.config
            splits = index_splits(
                c.data.dataset, c.data.root, c.data.category, c.data.val_fraction, c.train.seed
            )
            val = load_arrays(splits.val, c.model.img_size)
            self.calibration = calibrate(self.model, val, c, self.device)
            if not overrides:
                cal_path.write_text(json.dumps(asdict(self.calibration), indent=2))

    @property
    def eval(self) -> EvalConfig:
        return self.config.eval

    def maps(self, paths: Sequence[Path], shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        size = self.config.model.img_size
        images = np.stack([load_image(p, size) for p in paths])
        nll, rec = raw_scores(self.model, images, self.config, self.device)
        small = _standardised(nll, rec, self.calibration, self.eval.score)
        return [to_original(m, s, self.eval.smoothing_sigma) for m, s in zip(small, shapes)]


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def evaluate_run(
    run_dir: str | Path,
    *,
    eval_overrides: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score the test split of a run with its best checkpoint; write metrics.json and maps/.

    `eval_overrides` (score, image_score, smoothing_sigma) evaluate the same model another way;
    metrics.json records which way.
    """
    scorer = Scorer(run_dir, eval_overrides=eval_overrides)
    c = scorer.config
    splits = index_splits(
        c.data.dataset, c.data.root, c.data.category, c.data.val_fraction, c.train.seed
    )
    if not splits.test:
        raise DataError(f"{c.data.dataset}/{c.data.category} has no test images")
    shapes = [image_size(s.image) for s in splits.test]
    maps: list[np.ndarray] = []
    for chunk in _chunks(list(range(len(splits.test))), 16):
        maps += scorer.maps([splits.test[i].image for i in chunk], [shapes[i] for i in chunk])
        if progress:
            progress(len(maps), len(splits.test))
    masks = [
        load_mask(s.mask, shape) if s.mask else np.zeros(shape, dtype=bool)
        for s, shape in zip(splits.test, shapes)
    ]
    labels = np.array([s.label for s in splits.test])
    scores = np.array([image_score(m, scorer.eval.image_score) for m in maps])
    result = {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "au_pro": metrics.au_pro(maps, masks, fpr_limit=0.3),
        "au_pro_fpr_limit": 0.3,
        "n_test": len(labels),
        "n_anomalous": int(labels.sum()),
        "score": scorer.eval.score,
        "image_score": scorer.eval.image_score,
        "smoothing_sigma": scorer.eval.smoothing_sigma,
        "mdn_loss": c.train.mdn_loss,
        "checkpoint": BEST,
        "best_epoch": scorer.state["epoch"] + 1,
        "dataset": c.data.dataset,
        "category": c.data.category,
        "variant": c.variant,
    }
    run = Path(run_dir)
    (run / "metrics.json").write_text(json.dumps(result, indent=2))
    _write_sample_maps(run / "maps", splits.test, maps, masks, scorer.calibration, c.eval.n_maps)
    return result


def _write_sample_maps(out: Path, samples: Sequence[Sample], maps, masks, cal: Calibration, n: int):
    """Heat maps for up to `n` test images, spread over the defect types."""
    out.mkdir(parents=True, exist_ok=True)
    by_defect: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_defect.setdefault(s.defect, []).append(i)
    chosen: list[int] = []
    while len(chosen) < min(n, len(samples)):
        for idx in by_defect.values():
            if idx and len(chosen) < n:
                chosen.append(idx.pop(0))
    for i in chosen:
        s = samples[i]
        save_heatmap(
            out / f"{s.defect}_{s.image.stem}.png",
            load_image(s.image),
            maps[i],
            masks[i],
            cal.display_low,
            cal.display_high,
        )


def _expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"no images found in {item}")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"no such image or folder: {item}")
    return paths


def predict(run_dir: str | Path, inputs: Sequence[str | Path], out: str | Path) -> list[dict]:
    """Heat-map overlays and scores for new images; writes out/scores.json."""
    scorer = Scorer(run_dir)
    paths = _expand_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cal, rows = scorer.calibration, []
    for chunk in _chunks(paths, 16):
        shapes = [image_size(p) for p in chunk]
        for path, amap in zip(chunk, scorer.maps(chunk, shapes)):
            score = image_score(amap, scorer.eval.image_score)
            name = f"{len(rows):04d}_{path.stem}.png"
            save_heatmap(
                out / name, load_image(path), amap, None, cal.display_low, cal.display_high
            )
            rows.append(
                {
                    "image": str(path),
                    "score": score,
                    "threshold": cal.image_threshold,
                    "anomalous": score > cal.image_threshold,
                    "heatmap": name,
                }
            )
    (out / "scores.json").write_text(json.dumps(rows, indent=2))
    return rows
