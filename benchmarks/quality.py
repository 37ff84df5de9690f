"""Detection quality on the demo categories: the model against a trivial baseline.

For each category: train (`vtadl.training.fit`), evaluate on the test split, and score the
same test images with a nearest-neighbour baseline on raw pixel patches (each 8x8 patch of a
test image, its L2 distance to the closest 8x8 patch of the training images, at the model's
input size; the map is upsampled and smoothed exactly like the model's). Prints image AUROC,
pixel AUROC and AU-PRO for the model's default map, for the paper's map (the mixture NLL
alone on a linear scale) from the same checkpoint, for the baseline, and for the baseline's
distance on a log scale (log(1 + d / median training-set distance)), the same treatment the
model's default map gets, so the comparison is not one-sided. A colour threshold is scored
too: each pixel's score is how rare its colour (16 levels per channel) is among the training
pixels, unsmoothed.

On MNIST-layout data (`--dataset mnist`, categories are digits) there are no masks: the
baseline is the whole-image nearest neighbour (L2 distance of a test image to the closest
training image, both at the model's input size) and only image AUROC is printed.

    python benchmarks/quality.py                       # demo data, the make-demo settings
    python benchmarks/quality.py --set train.epochs=40 --set model.noise_std=0
    python benchmarks/quality.py --root data/bench/photos --categories coins page
    python benchmarks/quality.py --dataset mnist --root data/bench/digits --categories 3 \\
        --variant vtadl_tiny --set train.epochs=20
    python benchmarks/quality.py --root data/bench/photos --gaussians 1024,4096,all  # K curve

`--gaussians` evaluates each category's one training again with each K (the mixture refitted
after training, the network not retrained), with the seconds of each evaluation: rows `k=K`.
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
from vtadl.config import layered_config
from vtadl.data.bench import colour_bins
from vtadl.data.demo import DEMO_CATEGORIES, make_demo_dataset
from vtadl.data.source import category_source
from vtadl.evaluation import evaluate_run
from vtadl.inference.maps import image_score, to_original
from vtadl.presets import preset_layer
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


def colour_rarity_maps(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """-log frequency of each test pixel's colour bin among the training pixels: (N, S, S)."""
    counts = np.bincount(colour_bins(train).ravel(), minlength=4096)
    rarity = -np.log((counts + 1) / (counts.sum() + 4096))
    return rarity[colour_bins(test)]


def baseline_metrics(config, sigma: float = 4.0) -> dict[str, dict]:
    """The baselines on exactly the images, splits and masks the model was evaluated on:
    the patch NN as the issue defines it ("baseline"), on a log scale ("baseline_log"),
    and the colour threshold ("colour")."""
    source = category_source(config)
    train, test, val = (_inputs(source, split) for split in ("train", "test", "val"))
    items = source.items("test")
    grids = patch_nn_maps(train, test)
    spread = float(np.median(patch_nn_maps(train, val)))
    masks = [source.mask("test", i) for i in range(len(items))]
    labels = np.array([item.label for item in items])
    out = {}
    for name, scaled, smooth in (
        ("baseline", grids, sigma),
        ("baseline_log", np.log1p(grids / spread), sigma),
        ("colour", colour_rarity_maps(train, test), 0.0),
    ):
        maps = [to_original(grid, item.shape, smooth) for grid, item in zip(scaled, items)]
        out[name] = {
            "image_auroc": metrics.image_auroc([image_score(m) for m in maps], labels),
            "pixel_auroc": metrics.pixel_auroc(maps, masks),
            "au_pro": metrics.au_pro(maps, masks),
        }
    return out


def image_nn_metrics(config) -> dict[str, dict]:
    """Whole-image nearest neighbour on image-level labels (MNIST): image AUROC only."""
    source = category_source(config)
    train, test = (_inputs(source, split) for split in ("train", "test"))
    flat = [torch.from_numpy(x.reshape(len(x), -1)).float() / 255 for x in (train, test)]
    dist = torch.cat([torch.cdist(q, flat[0]).min(1).values for q in flat[1].split(1024)])
    labels = np.array([item.label for item in source.items("test")])
    auroc = metrics.image_auroc(dist.numpy(), labels)
    return {"image_nn": {"image_auroc": auroc, "pixel_auroc": None, "au_pro": None}}


def _rounded(result: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "au_pro")
    return {k: None if result.get(k) is None else round(result[k], 4) for k in keys}


# Other ways to score the same checkpoint (`--score-variants`): eval overrides by row name.
SCORE_VARIANTS = {
    # The session-15 default: 400 Gaussians fitted by EM, one grid of stride p.
    "em_s1": {"grid_shifts": 1, "mixture_fit": "em"},
    # The default kernel mixture on one grid.
    "kernel_s1": {"grid_shifts": 1},
    # The smoothed map's maximum (the image score before session 17).
    "max_s4": {"image_score": "max"},
    "log_top1": {"image_score": "top1pct"},
    "log_sigma2": {"smoothing_sigma": 2.0},
    "nll+recon": {"score": "nll+recon"},
    # vtadl's map and peak on a run of another method (--preset paper): what they buy there,
    # together and one at a time.
    "vtadl_map": {"scale": "log", "grid_shifts": 4, "peak_patches": 10},
    "log_map": {"scale": "log"},
    "grids4": {"grid_shifts": 4},
    "peak10": {"peak_patches": 10},
    # vtadl's whole scoring (its default kernel mixture fitted after training, its map and
    # peak) on the network another method trained: what the training departures buy.
    "vtadl_scoring": {
        "scale": "log",
        "grid_shifts": 4,
        "peak_patches": 10,
        "mixture_fit": "kernel",
        "n_gaussians": 32768,
    },
}
POST_TRAINING = ("mixture_fit", "n_gaussians")


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def _parse_sets(items: list[str]) -> dict[str, dict]:
    sections: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="dataset root (default: write the demo data to a temp dir)")
    ap.add_argument("--dataset", default="mvtec", help="mvtec (any MVTec-layout root) or mnist")
    ap.add_argument("--categories", nargs="*", default=list(DEMO_CATEGORIES))
    ap.add_argument("--variant", default="vtadl_small")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    ap.add_argument("--out", default=None, help="runs folder (default: a temp dir)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-paper-map", action="store_true", help="skip the paper's map")
    ap.add_argument(
        "--gaussians",
        default="",
        help="comma-separated K (or all) to refit and evaluate each run with, e.g. 1024,all",
    )
    ap.add_argument(
        "--score-variants",
        nargs="*",
        default=None,
        help=f"also evaluate the checkpoint as these of {', '.join(SCORE_VARIANTS)} (none: all)",
    )
    ap.add_argument("--preset", default="", help="a preset (paper) over the variant")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vtadl-quality-"))
    root = Path(args.root) if args.root else tmp / "demo"
    if not args.root:
        make_demo_dataset(root)
    rows = []
    for category in args.categories:
        sets = _parse_sets(args.set)
        sets.setdefault("data", {}).update(dataset=args.dataset, root=str(root), category=category)
        sets.setdefault("train", {}).setdefault("out", args.out or str(tmp / "runs"))
        config = layered_config(args.variant, preset_layer(args.preset), sets)
        tic = time.perf_counter()
        run_dir = fit(config)
        train_seconds = time.perf_counter() - tic
        # The paper's map first (untimed), so that the run's own evaluation, written last,
        # is what stays in its metrics.json and maps/.
        paper = (
            None
            if args.no_paper_map
            else evaluate_run(run_dir, eval_overrides={"score": "nll", "scale": "linear"})
        )
        others = {
            name: _rounded(
                evaluate_run(
                    run_dir,
                    eval_overrides={k: v for k, v in overrides.items() if k not in POST_TRAINING},
                    mixture_fit=overrides.get("mixture_fit"),
                    n_gaussians=overrides.get("n_gaussians"),
                )
            )
            for name, overrides in SCORE_VARIANTS.items()
            if args.score_variants is not None and name in (args.score_variants or SCORE_VARIANTS)
        }
        by_k = {}
        for k in [k for k in args.gaussians.split(",") if k]:
            tic = time.perf_counter()
            result = evaluate_run(run_dir, n_gaussians=k)
            by_k[f"k={k}"] = {
                **_rounded(result),
                "n_gaussians": result["n_gaussians"],
                "seconds": round(time.perf_counter() - tic, 1),
            }
        tic = time.perf_counter()
        model = evaluate_run(run_dir)
        row = {
            "category": category,
            "train_seconds": round(train_seconds, 1),
            "seconds": round(train_seconds + time.perf_counter() - tic, 1),
            "run_dir": str(run_dir),
            "model": _rounded(model),
            **({"paper_map": _rounded(paper)} if paper else {}),
            **others,
            **by_k,
        }
        if not args.no_baseline:
            baselines = image_nn_metrics if args.dataset == "mnist" else baseline_metrics
            for name, base in baselines(config).items():
                row[name] = _rounded(base)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{args.dataset} {root}, variant {args.variant}, overrides {args.set or 'none'}")
    head = f"{'image AUROC':>12} {'pixel AUROC':>12} {'AU-PRO':>8} {'train s':>8} {'total s':>8}"
    print(f"{'category':<10} {'':>12} {head}")
    for row in rows:
        ks = [k for k in row if k.startswith("k=")]
        names = ("model", "paper_map", *SCORE_VARIANTS, *ks, "baseline", "baseline_log", "colour")
        for who in (*names, "image_nn"):
            if who in row:
                m = row[who]
                t = f"{row['train_seconds']:>8} {row['seconds']:>8}" if who == "model" else ""
                print(
                    f"{row['category']:<10} {who:>12} {_cell(m['image_auroc'], 12)} "
                    f"{_cell(m['pixel_auroc'], 12)} {_cell(m['au_pro'], 8)} {t}"
                )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
