"""Evaluation of a run on its test split: exact metrics (vtadl.metrics) of the anomaly maps
and image scores of `vtadl.scoring`, written to metrics.json, and heat maps in maps/."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vtadl import metrics
from vtadl.checkpoints import BEST
from vtadl.config import EvalConfig
from vtadl.data.source import Source
from vtadl.exceptions import DataError
from vtadl.scoring.scorer import Scorer, raw_in_passes
from vtadl.visualize import save_heatmap

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path,
    *,
    eval_overrides: dict | None = None,
    mixture_fit: str | None = None,
    n_gaussians: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score the test split of a run with its best checkpoint; write metrics.json and maps/.

    `eval_overrides` (score, image_score, smoothing_sigma) evaluate the same model another way,
    and so do `mixture_fit` and `n_gaussians` (em or kernel with any K, for a run fitted
    either way: the mixture is refitted, the network is not retrained); metrics.json records
    which way, and K as used. Pixel metrics are None, with the reason in
    `pixel_metrics_absent`, when no test mask marks a pixel (MNIST, or empty masks).
    """
    scorer = Scorer(
        run_dir, eval_overrides=eval_overrides, mixture_fit=mixture_fit, n_gaussians=n_gaussians
    )
    c, src = scorer.config, scorer.source
    items = src.items("test")
    if not items:
        raise DataError(f"{c.data.dataset}/{c.data.category} has no test images")
    maps, masks, scores = [], [], []
    inputs = ((i, src.model_input("test", i)) for i in range(len(items)))
    for (i, (_, corners)), raw in raw_in_passes(scorer, inputs, lambda item: item[1][0]):
        amap, score = scorer.scored(raw, corners, items[i].shape)
        maps.append(amap)
        scores.append(score)
        masks.append(src.mask("test", i))
        if progress:
            progress(i + 1, len(items))
    labels = np.array([it.label for it in items])
    scores = np.array(scores)
    absent = _why_no_pixel_metrics(c.data.dataset, labels, masks)
    if not absent:
        _warn_blank_masks(items, masks)
    result = {
        **metrics.headline(scores, labels, *((None, None) if absent else (maps, masks))),
        "au_pro_fpr_limit": 0.3,
        "pixel_metrics_absent": absent,
        "n_test": len(labels),
        "n_anomalous": int(labels.sum()),
        "threshold": scorer.calibration.image_threshold,
        **_how_scored(scorer),
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


def _how_scored(scorer: Scorer) -> dict:
    """The settings behind a run's numbers, as metrics.json records them."""
    e, t = scorer.eval, scorer.config.train
    return {
        "score": e.score,
        "score_scale": e.scale,
        "image_score": scorer.image_score,
        "peak_patches": e.peak_patches,
        "recon_weight": e.recon_weight,
        "neighbour_weight": e.neighbour_weight,
        "smoothing_sigma": e.smoothing_sigma,
        "grid_shifts": e.grid_shifts,
        "mdn_loss": t.mdn_loss,
        "mixture_fit": t.mixture_fit,
        "n_gaussians": scorer.n_gaussians,
        "kernel_scope": scorer.kernel_scope,
        "checkpoint": BEST,
        "best_epoch": scorer.state["epoch"] + 1,
    }


def _warn_blank_masks(items, masks: list[np.ndarray]) -> None:
    blank = [it.name for it, m in zip(items, masks) if it.label == 1 and not m.any()]
    if blank:
        log.warning(
            "%d defective test images have masks that mark no pixel (%s%s); their pixels count "
            "as normal in the pixel metrics",
            len(blank),
            blank[0],
            ", ..." if len(blank) > 1 else "",
        )


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
