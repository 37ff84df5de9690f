"""What an exported detector costs: file size and CPU seconds per image, against K, beside a
run's own scorer (what `vtadl predict RUN` does per image, its loading and heat maps aside).

For each K, the run is copied with its mixture refitted at K (`vtadl.runs.set_gaussians`;
the network stays as trained), exported as ONNX and TorchScript (`vtadl export`), and the
same images are scored in batches of 1 and of 8: by `vtadl.inference.Detector` (onnxruntime,
torch) and by the run's `Scorer` (forward passes in torch, `raw_many`, then `scored`). Images
are decoded once beforehand; maps and image scores are included in every figure. Each figure
is the best of 3 repeats.

    python benchmarks/export_latency.py --run RUN_DIR --ks 4096,32768
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vtadl.export import export_run
from vtadl.inference import Detector
from vtadl.runs import set_gaussians
from vtadl.scoring.scorer import Scorer


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def per_image(score, images: list[np.ndarray], batch: int) -> float:
    """Seconds per image, scoring `images` `batch` at a time."""
    chunks = [images[a : a + batch] for a in range(0, len(images), batch)]
    return best_of(lambda: [score(chunk) for chunk in chunks]) / len(images)


def scorer_scores(scorer: Scorer, src):
    def score(chunk: list[int]) -> None:
        inputs = [src.model_input("test", i) for i in chunk]
        raws = scorer.raw_many([x for x, _ in inputs])
        for i, (_, corners), raw in zip(chunk, inputs, raws):
            scorer.scored(raw, corners, src.items("test")[i].shape)

    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained run folder (em or kernel)")
    ap.add_argument("--ks", default="", help="comma-separated K to refit (default: the run's)")
    ap.add_argument("--images", type=int, default=16, help="test images scored per figure")
    args = ap.parse_args()
    run = Path(args.run)
    ks = [k if k == "all" else int(k) for k in args.ks.split(",") if k] or [None]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; run {run}")
    print(f"{'K':>7} {'what':>12} {'size MiB':>9} {'s/image b1':>11} {'s/image b8':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            copy = Path(tmp) / f"run_{k}"
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("maps", "tensorboard"))
            if k is not None:
                set_gaussians(copy, k)
            scorer = Scorer(copy)
            src = scorer.source
            n = min(args.images, len(src.items("test")))
            label = scorer.n_gaussians
            for fmt in ("onnx", "torchscript"):
                path = Path(tmp) / f"k{k}.{fmt}"
                export_run(copy, fmt, path)
                detector = Detector(path)
                images = [src.display_image("test", i) for i in range(n)]
                b1, b8 = (per_image(detector.score, images, b) for b in (1, 8))
                size = path.stat().st_size / 2**20
                print(f"{label:>7} {fmt:>12} {size:>9.1f} {b1:>11.3f} {b8:>11.3f}", flush=True)
            indices = list(range(n))
            b1, b8 = (per_image(scorer_scores(scorer, src), indices, b) for b in (1, 8))
            print(f"{label:>7} {'vtadl run':>12} {'':>9} {b1:>11.3f} {b8:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
