"""Tests for vtadl.metrics: hand-worked cases and a brute-force AU-PRO oracle."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from vtadl.exceptions import ConfigError, DataError
from vtadl.metrics import au_pro, image_auroc, pixel_auroc, pro_curve


def row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float64)


# ---------------------------------------------------------------- AU-PRO by hand


def test_single_region_1x4() -> None:
    # mask 1 1 0 0, map 4 2 3 1: one region of 2 px, 2 OK px.
    # Descending: 4 (region) -> (0, 1/2); 3 (OK) -> (1/2, 1/2);
    #             2 (region) -> (1/2, 1); 1 (OK) -> (1, 1).
    # Area to 1: 1/2 * 1/2 + 1/2 * 1 = 3/4.
    # Area to 0.3: 0.3 * 1/2 = 0.15, / 0.3 = 1/2.
    maps, masks = [row(4, 2, 3, 1)], [row(1, 1, 0, 0)]
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(3 / 4, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)


def test_ties_are_merged() -> None:
    # mask 1 1 0 0, map 2 1 2 0. Region pixel 0 ties with OK pixel 2 at score 2.
    # Merged points: (0,0), t=2 -> (1/2, 1/2), t=1 -> (1/2, 1), t=0 -> (1, 1).
    # Area to 1: 1/2 * 1/2 * 1/2 (slanted) + 1/2 * 1 = 1/8 + 1/2 = 5/8.
    # Unmerged, OK first: (0,0),(1/2,0),(1/2,1/2),(1/2,1),(1,1) -> 1/2;
    # unmerged, region first: (0,0),(0,1/2),(1/2,1/2),... -> 1/4 + 1/2 = 3/4.
    maps, masks = [row(2, 1, 2, 0)], [row(1, 1, 0, 0)]
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_array_equal(fpr, [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(pro, [0.0, 0.5, 1.0, 1.0])
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(5 / 8, abs=1e-12)


def test_interpolation_at_limit() -> None:
    # Same curve as above: (0,0),(1/2,1/2),(1/2,1),(1,1).
    # Limit 0.3 lies inside the slanted segment: pro(0.3) = 0.3,
    # area = 0.3 * 0.3 / 2 = 0.045, / 0.3 = 3/20.
    # Limit 3/4 lies in the flat segment after the vertical jump:
    # area = 1/8 + 1/4 * 1 = 3/8, / (3/4) = 1/2.
    maps, masks = [row(2, 1, 2, 0)], [row(1, 1, 0, 0)]
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(3 / 20, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=0.75) == pytest.approx(1 / 2, abs=1e-12)


def test_region_mean_not_pixel_mean() -> None:
    # mask 1 0 1 1 1 0: region A = {0} (1 px), region B = {2,3,4} (3 px), OK = {1,5}.
    # map  5 1 4 0 0 0.
    # t=5: A fully hit -> pro (1 + 0)/2 = 1/2, fpr 0
    # t=4: B 1/3 hit  -> pro (1 + 1/3)/2 = 2/3, fpr 0
    # t=1: OK px 1    -> fpr 1/2
    # t=0: rest       -> (1, 1)
    # Area to 0.3: 0.3 * 2/3, / 0.3 = 2/3 (pixel-mean would give 2/4 = 1/2).
    # Area to 1: 1/2 * 2/3 + 1/2 * (2/3 + 1)/2 = 1/3 + 5/12 = 3/4.
    maps, masks = [row(5, 1, 4, 0, 0, 0)], [row(1, 0, 1, 1, 1, 0)]
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(2 / 3, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(3 / 4, abs=1e-12)


def test_diagonal_pixels_form_one_region() -> None:
    # mask        map
    # 1 0 0       9 1 2
    # 0 1 1       3 0 0
    # 0 0 0       4 5 6
    # 8-connected: one region of 3 px. t=9 hits 1 of 3 -> pro 1/3 at fpr 0;
    # pro stays 1/3 while the 6 OK px (6..1) raise fpr to 1, then jumps to 1.
    # AU-PRO to 0.3 = 1/3, to 1 = 1/3.
    # (4-connected there would be regions of 1 and 2 px -> pro 1/2 instead.)
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=np.uint8)
    amap = np.array([[9, 1, 2], [3, 0, 0], [4, 5, 6]], dtype=np.float64)
    assert au_pro([amap], [mask], fpr_limit=0.3) == pytest.approx(1 / 3, abs=1e-12)
    assert au_pro([amap], [mask], fpr_limit=1.0) == pytest.approx(1 / 3, abs=1e-12)


def test_good_image_and_mixed_sizes() -> None:
    # Image 1 (1x4): mask 1 1 0 0, map 4 2 3 1.  Image 2 (2x1, no defect): map 5, 0.
    # OK pixels pooled: 3, 1, 5, 0 -> 4.  One region of 2 px.
    # t=5 (OK) (1/4, 0); t=4 (reg) (1/4, 1/2); t=3 (OK) (1/2, 1/2);
    # t=2 (reg) (1/2, 1); t=1 (OK) (3/4, 1); t=0 (OK) (1, 1).
    # Area to 1: 1/4 * 1/2 + 1/4 * 1 + 1/4 * 1 = 5/8.
    # Area to 0.3: [1/4, 0.3] at 1/2 -> 0.05 * 1/2 = 1/40, / 0.3 = 1/12.
    maps = [row(4, 2, 3, 1), np.array([[5.0], [0.0]])]
    masks = [row(1, 1, 0, 0), np.zeros((2, 1), dtype=bool)]
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(5 / 8, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(1 / 12, abs=1e-12)


def test_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(0)
    masks = [(rng.random((7, 9)) < 0.2).astype(np.uint8) for _ in range(3)]
    perfect = [m.astype(np.float32) for m in masks]
    inverted = [1.0 - m for m in masks]
    for limit in (0.05, 0.3, 1.0):
        assert au_pro(perfect, masks, fpr_limit=limit) == pytest.approx(1.0, abs=1e-12)
        # Inverted: pro stays 0 until fpr reaches 1.
        assert au_pro(inverted, masks, fpr_limit=limit) == pytest.approx(0.0, abs=1e-12)


def test_stacked_array_and_dtypes_agree_with_list() -> None:
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 6, size=(4, 6, 5))
    masks = rng.random((4, 6, 5)) < 0.25
    ref = au_pro(list(maps.astype(np.float64)), list(masks), fpr_limit=0.4)
    assert au_pro(maps, masks.astype(np.uint8), fpr_limit=0.4) == pytest.approx(ref, abs=1e-12)
    assert au_pro(maps.astype(np.float32), masks * 7.0, fpr_limit=0.4) == pytest.approx(
        ref, abs=1e-12
    )


def test_curve_starts_at_origin_and_ends_at_one() -> None:
    rng = np.random.default_rng(2)
    maps = [rng.random((5, 8)), rng.random((9, 3))]
    masks = [rng.random((5, 8)) < 0.3, rng.random((9, 3)) < 0.3]
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-15)
    assert fpr.size == 1 + np.unique(np.concatenate([m.ravel() for m in maps])).size


# ---------------------------------------------------------------- brute-force oracle


def label_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first search (independent of scipy)."""
    seen = np.zeros(mask.shape, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    inside = 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1]
                    if inside and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        regions.append(pixels)
    return regions


def oracle_au_pro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    regions = [(i, reg) for i, g in enumerate(masks) for reg in label_8(g != 0)]
    n_ok = sum(int(np.count_nonzero(g == 0)) for g in masks)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        binary = [m >= t for m in maps]
        fp = sum(int(np.count_nonzero(b & (g == 0))) for b, g in zip(binary, masks, strict=True))
        overlaps = [np.mean([binary[i][p] for p in reg]) for i, reg in regions]
        fprs.append(fp / n_ok)
        pros.append(float(np.mean(overlaps)))
    fpr, pro = np.array(fprs), np.array(pros)
    y_lim = np.interp(limit, fpr, pro)
    inside = fpr <= limit
    x = np.append(fpr[inside], limit)
    y = np.append(pro[inside], y_lim)
    return float(np.trapezoid(y, x)) / limit


def random_case(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    n_images = int(rng.integers(2, 6))
    for k in range(n_images):
        h, w = (int(v) for v in rng.integers(3, 13, size=2))
        maps.append(rng.integers(0, 6, size=(h, w)).astype(np.float64))
        mask = np.zeros((h, w), dtype=np.uint8)
        if k > 0 or seed % 2:  # first image is defect-free for even seeds
            for _ in range(int(rng.integers(0, 4))):
                r, c = int(rng.integers(0, h)), int(rng.integers(0, w))
                dh, dw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
                mask[r : r + dh, c : c + dw] = 1
            mask |= (rng.random((h, w)) < 0.05).astype(np.uint8)  # speckles, diagonals
        masks.append(mask)
    if not any(m.any() for m in masks):
        masks[-1][0, 0] = 1
    return maps, masks


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("limit", [0.05, 0.3, 0.55, 1.0])
def test_matches_brute_force_oracle(seed: int, limit: float) -> None:
    maps, masks = random_case(seed)
    assert au_pro(maps, masks, fpr_limit=limit) == pytest.approx(
        oracle_au_pro(maps, masks, limit), abs=1e-9
    )


# ---------------------------------------------------------------- AU-PRO errors


def test_au_pro_errors() -> None:
    with pytest.raises(DataError, match="region"):
        au_pro([row(1, 2)], [row(0, 0)])
    with pytest.raises(DataError, match="OK"):
        au_pro([row(1, 2)], [row(1, 1)])
    with pytest.raises(DataError, match=r"image 1.*\(2, 2\).*\(2, 3\)"):
        au_pro([row(1, 2), np.zeros((2, 2))], [row(1, 0), np.zeros((2, 3))])
    with pytest.raises(DataError, match="2 maps but 1 masks"):
        au_pro([row(1, 2), row(1, 2)], [row(1, 0)])
    with pytest.raises(DataError):
        au_pro([], [])
    with pytest.raises(DataError, match="3-D"):
        au_pro(row(1, 2), row(1, 0))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError):
            au_pro([row(1, 2)], [row(1, 0)], fpr_limit=bad)


# ---------------------------------------------------------------- AUROC


def test_pixel_auroc_by_hand() -> None:
    # Pooled scores 0.1 (n), 0.35 (a), 0.4 (n), 0.8 (a).
    # Pairs (a, n): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, *) ok -> 3/4.
    maps = [row(0.1, 0.35), np.array([[0.4], [0.8]])]
    masks = [row(0, 1), np.array([[0], [1]], dtype=bool)]
    assert pixel_auroc(maps, masks) == pytest.approx(0.75, abs=1e-12)
    # Ties count 1/2: scores a: 1, 2; n: 1, 0 -> (0.5 + 1 + 1 + 1) / 4 = 7/8.
    assert pixel_auroc([row(1, 1, 0, 2)], [row(0, 1, 0, 1)]) == pytest.approx(7 / 8, abs=1e-12)


def test_pixel_auroc_errors() -> None:
    with pytest.raises(DataError, match=r"image 0.*\(1, 2\).*\(2, 1\)"):
        pixel_auroc([row(1, 2)], [np.zeros((2, 1))])
    with pytest.raises(DataError, match="no anomalous"):
        pixel_auroc([row(1, 2)], [row(0, 0)])
    with pytest.raises(DataError, match="no normal"):
        pixel_auroc([row(1, 2)], [row(1, 1)])


def test_image_auroc_by_hand() -> None:
    # Same pairs as the pixel case: 3/4; with a tie: 7/8.
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75, abs=1e-12)
    assert image_auroc(np.array([1, 1, 0, 2]), np.array([0, 1, 0, 1])) == pytest.approx(
        7 / 8, abs=1e-12
    )


def test_image_auroc_errors() -> None:
    with pytest.raises(DataError, match="one class"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(DataError, match="3 scores but 2 labels"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(DataError, match="0 .*or 1"):
        image_auroc([0.1, 0.2], [0, 2])
