"""A contact sheet of the photo benchmark: per category, two training images, then test
images of every defect type; below them, the same images with their masks outlined.

    python benchmarks/bench_sheet.py data/bench/photos sheet.png [--per-defect 2] [--zoom 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from vtadl.data.bench import BENCH_DEFECTS


def _outlined(image: np.ndarray, mask: np.ndarray | None, zoom: int) -> np.ndarray:
    image = np.kron(image, np.ones((zoom, zoom, 1), dtype=np.uint8))
    if mask is None:
        return image
    mask = np.kron(mask, np.ones((zoom, zoom), dtype=bool))
    edge = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_dilation(mask)
    out = image.copy()
    out[edge] = (255, 0, 255) if image.mean() > 110 else (0, 255, 0)
    return out


def contact_sheet(root: Path, per_defect: int, zoom: int) -> Image.Image:
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "train").is_dir()):
        good = sorted((folder / "train/good").glob("*.png"))[:2]
        raws = [_outlined(np.asarray(Image.open(p).convert("RGB")), None, zoom) for p in good]
        outlines = list(raws)
        for defect in BENCH_DEFECTS:
            for path in sorted((folder / "test" / defect).glob("*.png"))[:per_defect]:
                image = np.asarray(Image.open(path).convert("RGB"))
                mask_path = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
                mask = np.asarray(Image.open(mask_path))
                raws.append(_outlined(image, None, zoom))
                outlines.append(_outlined(image, mask > 0, zoom))
        gap = np.full((raws[0].shape[0], 4, 3), 255, dtype=np.uint8)
        for tiles in (raws, outlines):
            rows.append(np.concatenate([x for t in tiles for x in (t, gap)], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return Image.fromarray(np.concatenate(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-defect", type=int, default=1)
    ap.add_argument("--zoom", type=int, default=1)
    args = ap.parse_args()
    contact_sheet(args.root, args.per_defect, args.zoom).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
