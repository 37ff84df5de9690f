"""Detection quality on the demo categories: the model against a trivial baseline.

For each category: train (`vtadl.training.fit`), evaluate on the test split, and score the
same test images with a nearest-neighbour baseline on raw pixel patches (each 8x8 patch of a
test image, its L2 distance to the closest 8x8 patch of the training images, at the model's
input size; the map is upsampled and smoothed exactly like the model's). Prints image AUROC,
pixel AUROC and AU-PRO for the model's default map, for the paper's map (the mixture NLL
alone on a linear scale) from the same checkpoint, for the baseline, and for the baseline's
distance on a log scale (log(1 + d / median training-set distance)), the same treatment the
model's default map gets, so the comparison is not one-sided.

    python benchmarks/quality.py                       # demo data, the make-demo settings
    python benchmarks/quality.py --set train.epochs=40 --set model.noise_std=0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from vtadl import metrics
from vtadl.config import default_config
from vtadl.data.demo import DEMO_CATEGORIES, make_demo_dataset
from vtadl.data.source import category_source
from vtadl.evaluation import evaluate_run, image_score, to_original
from vtadl.training import fit


def _patches(images: np.ndarray, patch: int, stride: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, gh, gw, patch*patch*3) float patches."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    p = F.unfold(x, patch, stride=stride)  # (N, 3*p*p, L)
    g = (images.shape[1] - patch) // stride + 1
    return p.transpose(1, 2).reshape(len(images), g, g, -1)


def patch_nn_maps(train: np.ndarray, test: np.ndarray, patch: int = 8, stride: int = 4):
    """Distance of each test patch to its nearest training patch: (N, g, g) grids."""
    bank = _patches(train, patch, stride).reshape(-1, patch * patch * 3)
    queries = _patches(test, patch, stride)
    n, g = queries.shape[:2]
    flat = queries.reshape(-1, bank.shape[1])
    dist = torch.cat([torch.cdist(q, bank).min(1).values for q in flat.split(2048)])
    return dist.reshape(n, g, g).numpy()


def _inputs(source, split: str) -> np.ndarray:
    """All model inputs of a split, uint8 (N, S, S, 3)."""
    return np.concatenate(
        [source.model_input(split, i)[0] for i in range(len(source.items(split)))]
    )


def baseline_metrics(config, sigma: float = 4.0) -> dict[str, dict]:
    """The baseline on exactly the images, splits and masks the model was evaluated on,
    as the issue defines it ("baseline") and on a log scale ("baseline_log")."""
    source = category_source(config)
    train, test, val = (_inputs(source, split) for split in ("train", "test", "val"))
    items = source.items("test")
    grids = patch_nn_maps(train, test)
    spread = float(np.median(patch_nn_maps(train, val)))
    masks = [source.mask("test", i) for i in range(len(items))]
    labels = np.array([item.label for item in items])
    out = {}
    for name, scaled in (("baseline", grids), ("baseline_log", np.log1p(grids / spread))):
        maps = [to_original(grid, item.shape, sigma) for grid, item in zip(scaled, items)]
        out[name] = {
            "image_auroc": metrics.image_auroc([image_score(m) for m in maps], labels),
            "pixel_auroc": metrics.pixel_auroc(maps, masks),
            "au_pro": metrics.au_pro(maps, masks),
        }
    return out


def _parse_sets(items: list[str]) -> dict[str, dict]:
    sections: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="MVTec-layout root (default: write the demo data to a temp dir)")
    ap.add_argument("--categories", nargs="*", default=list(DEMO_CATEGORIES))
    ap.add_argument("--variant", default="vtadl_small")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    ap.add_argument("--out", default=None, help="runs folder (default: a temp dir)")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vtadl-quality-"))
    root = Path(args.root) if args.root else tmp / "demo"
    if not args.root:
        make_demo_dataset(root)
    rows = []
    for category in args.categories:
        sets = _parse_sets(args.set)
        sets.setdefault("data", {}).update(root=str(root), category=category)
        sets.setdefault("train", {}).setdefault("out", args.out or str(tmp / "runs"))
        config = default_config(args.variant).override(**sets)
        tic = time.perf_counter()
        run_dir = fit(config)
        seconds = time.perf_counter() - tic
        # The paper's map first (untimed), so that the run's own evaluation, written last,
        # is what stays in its metrics.json and maps/.
        paper = evaluate_run(run_dir, eval_overrides={"score": "nll", "scale": "linear"})
        tic = time.perf_counter()
        model = evaluate_run(run_dir)
        seconds += time.perf_counter() - tic
        keys = ("image_auroc", "pixel_auroc", "au_pro")
        row = {
            "category": category,
            "seconds": round(seconds, 1),
            "run_dir": str(run_dir),
            "model": {k: round(model[k], 4) for k in keys},
            "paper_map": {k: round(paper[k], 4) for k in keys},
        }
        if not args.no_baseline:
            for name, base in baseline_metrics(config).items():
                row[name] = {k: round(v, 4) for k, v in base.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nvariant {args.variant}, overrides {args.set or 'none'}")
    head = f"{'image AUROC':>12} {'pixel AUROC':>12} {'AU-PRO':>8} {'time s':>7}"
    print(f"{'category':<10} {'':>12} {head}")
    for row in rows:
        for who in ("model", "paper_map", "baseline", "baseline_log"):
            if who in row:
                m = row[who]
                t = f"{row['seconds']:>7}" if who == "model" else ""
                print(
                    f"{row['category']:<10} {who:>12} {m['image_auroc']:>12.3f} "
                    f"{m['pixel_auroc']:>12.3f} {m['au_pro']:>8.3f} {t}"
                )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
