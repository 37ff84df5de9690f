"""Evaluation metrics: image AUROC, pixel AUROC and AU-PRO.

All functions are pure: numpy arrays in, floats (or curves) out.  Maps are
raw anomaly scores (higher means more anomalous) and are never normalised.
Masks mark anomalous pixels with any non-zero value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from vtadl.exceptions import ConfigError, DataError

ArrayList = Sequence[np.ndarray] | np.ndarray

# The three headline metrics, keyed as in metrics.json, with the label every table and plot
# shows (the console, `vtadl results`, the HTML report): one name per number.
LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "au_pro": "AU-PRO (FPR<=0.3)",
}

# 8-connectivity, as in the official MVTec AD evaluation.
_STRUCTURE = np.ones((3, 3), dtype=bool)


def image_auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """ROC AUC of image scores; labels are 0 (normal) or 1 (anomalous)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise DataError(f"image_auroc: {s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise DataError("image_auroc: scores contain NaN")
    if not np.isin(y, (0, 1)).all():
        raise DataError("image_auroc: labels must be 0 (normal) or 1 (anomalous)")
    if np.unique(y).size < 2:
        raise DataError("image_auroc: needs both normal and anomalous images, got one class only")
    return float(roc_auc_score(y.astype(np.int64), s))


def _pairs(maps: ArrayList, masks: ArrayList) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check maps/masks and pair them as (2-D map, 2-D bool mask)."""
    for name, seq in (("maps", maps), ("masks", masks)):
        if isinstance(seq, np.ndarray) and seq.ndim != 3:
            raise DataError(
                f"{name}: expected a sequence of 2-D arrays or a 3-D array, got shape {seq.shape}"
            )
    if len(maps) != len(masks):
        raise DataError(f"got {len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise DataError("no maps given")
    pairs = []
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m = np.asarray(m)
        g = np.asarray(g)
        if m.ndim != 2 or g.ndim != 2:
            raise DataError(f"image {i}: map and mask must be 2-D, got {m.shape} and {g.shape}")
        if m.shape != g.shape:
            raise DataError(f"image {i}: map shape {m.shape} differs from mask shape {g.shape}")
        if np.isnan(m).any():
            raise DataError(f"image {i}: map contains NaN")
        pairs.append((m, g != 0))
    return pairs


def pixel_auroc(maps: ArrayList, masks: ArrayList) -> float:
    """ROC AUC over all pixels of all images pooled (images may differ in size)."""
    pairs = _pairs(maps, masks)
    scores = np.concatenate([m.ravel().astype(np.float64, copy=False) for m, _ in pairs])
    truth = np.concatenate([g.ravel() for _, g in pairs])
    n_bad = int(np.count_nonzero(truth))
    if n_bad == 0:
        raise DataError("pixel_auroc: masks contain no anomalous pixel")
    if n_bad == truth.size:
        raise DataError("pixel_auroc: masks contain no normal pixel")
    return float(roc_auc_score(truth, scores))


def pro_curve(maps: ArrayList, masks: ArrayList) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro), one point per distinct score, starting at (0, 0).

    Regions are 8-connected components of each mask.  FPR is pooled over all
    OK pixels of all images; PRO at threshold t is the mean over all regions
    of the fraction of the region's pixels scoring >= t.  Tied scores form a
    single point.
    """
    pairs = _pairs(maps, masks)
    n_pix = sum(m.size for m, _ in pairs)
    scores = np.empty(n_pix, dtype=np.float64)
    region = np.empty(n_pix, dtype=np.int32)  # 0 = OK pixel, k >= 1 = region k
    start = 0
    n_regions = 0
    for m, g in pairs:
        stop = start + m.size
        scores[start:stop] = m.ravel()
        lab, n = ndimage.label(g, structure=_STRUCTURE)
        lab = lab.ravel()
        lab[lab > 0] += n_regions
        region[start:stop] = lab
        n_regions += n
        start = stop
    sizes = np.bincount(region, minlength=n_regions + 1)
    n_ok = int(sizes[0])
    if n_regions == 0:
        raise DataError("pro_curve: masks contain no anomalous region")
    if n_ok == 0:
        raise DataError("pro_curve: masks contain no OK pixel")

    # Descending order; within ties the order is irrelevant since ties are merged.
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    del scores
    keep = np.empty(n_pix, dtype=bool)
    np.not_equal(sorted_scores[:-1], sorted_scores[1:], out=keep[:-1])
    keep[-1] = True  # last point of each tie group
    del sorted_scores
    region = region[order]
    del order

    fp = np.cumsum(region == 0)[keep]
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / sizes[1:]
    overlap = weight[region]
    del region
    np.cumsum(overlap, out=overlap)
    overlap = overlap[keep]

    fpr = np.minimum(fp / n_ok, 1.0)
    pro = np.minimum(overlap / n_regions, 1.0)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _area_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under a PRO curve from fpr 0 to ``limit`` (interpolating there)."""
    # fpr[0] == 0 < limit <= 1 == fpr[-1], so fpr[i-1] < limit <= fpr[i].
    i = int(np.searchsorted(fpr, limit, side="left"))
    if fpr[i] == limit:
        y_lim = pro[i]
    else:
        frac = (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        y_lim = pro[i - 1] + frac * (pro[i] - pro[i - 1])
    return float(np.trapezoid(np.append(pro[:i], y_lim), np.append(fpr[:i], limit)))


def au_pro(maps: ArrayList, masks: ArrayList, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Follows the official MVTec AD procedure (Bergmann et al., IJCV 2021): the
    exact curve of :func:`pro_curve`, trapezoid rule, and a linearly
    interpolated point at ``fpr_limit``.  A perfect map scores 1.0.
    """
    if not 0.0 < fpr_limit <= 1.0:  # also rejects NaN
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks)
    return _area_to(fpr, pro, float(fpr_limit)) / fpr_limit


def headline(
    scores: np.ndarray | Sequence[float],
    labels: np.ndarray | Sequence[int],
    maps: ArrayList | None = None,
    masks: ArrayList | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """The three headline metrics (keys of `LABELS`): image AUROC of the image scores, and,
    given maps and masks, pixel AUROC and AU-PRO up to `fpr_limit` (else None)."""
    pixels = maps is not None and masks is not None
    return {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks) if pixels else None,
        "au_pro": au_pro(maps, masks, fpr_limit=fpr_limit) if pixels else None,
    }
