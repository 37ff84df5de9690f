"""The kernel's coreset measured along the tokens' principal axes (the default) against a
random Gaussian projection to 128 dimensions (PatchCore's, vtadl's before session 25): the
same trained runs evaluated both ways, with seconds and the covering radius in all dimensions.

    python benchmarks/coreset_projection.py --root data/bench0/photos --categories coins page
    python benchmarks/coreset_projection.py --runs RUN [RUN ...]

Each category is trained with the defaults first (`--set section.key=value` as quality.py)
unless `--runs` names trained runs. Prints one JSON line per run and projection, then a table.
The run is left evaluated the default way.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from quality import _parse_sets  # a script beside this one

import vtadl.scoring.mixture_fit as mixture_fit
from vtadl.config import layered_config
from vtadl.evaluation import evaluate_run
from vtadl.scoring import coreset
from vtadl.scoring.mixture_fit import CACHE, kernel_log_var
from vtadl.training import fit

DEFAULT_ORDER = mixture_fit.greedy_order


def random_order(
    tokens: np.ndarray,
    k: int,
    seed: int,
    dim: int = 128,
    projection_seed: int | None = None,
    whiten: bool = False,
) -> np.ndarray:
    """The greedy order after a seeded Gaussian projection to `dim` dimensions scaled by
    1/sqrt(dim) (128 and the run's seed: the projection of vtadl before session 25).
    `whiten`: the tokens divided by their spread per dimension first, the kernel's own
    metric (its variance is one shared diagonal)."""
    if whiten:
        tokens = tokens / np.exp(0.5 * kernel_log_var(tokens).numpy())
    d = tokens.shape[-1]
    axes = None
    if d > dim:
        gen = torch.Generator().manual_seed(seed if projection_seed is None else projection_seed)
        axes = torch.randn(d, dim, generator=gen).div_(math.sqrt(dim))
    x = coreset._projected(tokens[None], axes, None)
    start = coreset.start_index(len(tokens), seed)
    return coreset._greedy(x, min(int(k), len(tokens)), start)[0].numpy()


def radius(tokens: np.ndarray, centres: np.ndarray) -> tuple[float, float]:
    """The largest and the mean distance from a token to its nearest centre, all dimensions."""
    x, c = torch.from_numpy(tokens), torch.from_numpy(centres)
    x_sq, c_sq = x.square().sum(1), c.square().sum(1)
    nearest = torch.empty(len(x))
    for a in range(0, len(x), 4096):
        d = torch.addmm(c_sq[None], x[a : a + 4096], c.T, alpha=-2)
        nearest[a : a + 4096] = d.add_(x_sq[a : a + 4096, None]).amin(1).clamp_(min=0)
    r = nearest.sqrt()
    return float(r.max()), float(r.mean())


# How the coreset's distances are measured: name -> the order function's keyword arguments
# (random projections), or the principal axes' count.
PROJECTIONS = {
    "random128": {"dim": 128},
    "random128_seed99": {"dim": 128, "projection_seed": 99},
    "random64": {"dim": 64},
    "whitened128": {"dim": 128, "whiten": True},
    "whitened64": {"dim": 64, "whiten": True},
    "principal32": 32,
    "principal64": 64,
}


def measure(run_dir: Path, how: str) -> dict:
    """Evaluate the run with the coreset projected `how` (its cached fits removed first); the
    covering radius is taken on the tokens the coreset was selected from."""
    for cached in run_dir.glob(CACHE.split("{")[0] + "*"):
        cached.unlink()
    selected: list[tuple[np.ndarray, np.ndarray]] = []

    def recorded(tokens: np.ndarray, k: int, seed: int) -> np.ndarray:
        spec = PROJECTIONS[how]
        if isinstance(spec, dict):
            order = random_order(tokens, k, seed, **spec)
        else:
            order = DEFAULT_ORDER(tokens, k, seed, dim=spec)
        selected.append((tokens, order))
        return order

    mixture_fit.greedy_order = recorded
    try:
        tic = time.perf_counter()
        result = evaluate_run(run_dir)
        seconds = time.perf_counter() - tic
    finally:
        mixture_fit.greedy_order = DEFAULT_ORDER
    row = {"run_dir": str(run_dir), "projection": how, "seconds": round(seconds, 1)}
    row.update({k: round(result[k], 4) for k in ("image_auroc", "pixel_auroc", "au_pro")})
    row["n_gaussians"] = result["n_gaussians"]
    if selected:
        tokens, order = selected[0]
        centres = tokens[order[: result["n_gaussians"]]]
        row["radius_max"], row["radius_mean"] = (round(v, 3) for v in radius(tokens, centres))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="an MVTec-layout root to train the categories of")
    ap.add_argument("--categories", nargs="*", default=[])
    ap.add_argument("--runs", nargs="*", default=[], help="trained runs to evaluate instead")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    ap.add_argument("--out", default="runs/coreset_projection")
    ap.add_argument(
        "--projections",
        nargs="*",
        default=["random128", f"principal{coreset.DIM}"],
        help=f"of {', '.join(PROJECTIONS)}; the last stays evaluated",
    )
    args = ap.parse_args()
    runs = [Path(r) for r in args.runs]
    for category in args.categories:
        sets = _parse_sets(args.set)
        sets.setdefault("data", {}).update(root=args.root, category=category)
        sets.setdefault("train", {}).setdefault("out", args.out)
        runs.append(fit(layered_config("vtadl_small", {}, sets)))
    rows = []
    for run_dir in runs:
        for how in args.projections:
            rows.append(measure(run_dir, how))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'run':<40} {'projection':>12} {'image':>6} {'pixel':>6} {'AU-PRO':>6} "
        f"{'r max':>6} {'r mean':>6} {'s':>6}"
    )
    for r in rows:
        print(
            f"{Path(r['run_dir']).parent.name + '/' + Path(r['run_dir']).name:<40} "
            f"{r['projection']:>12} {r['image_auroc']:>6.3f} {r['pixel_auroc']:>6.3f} "
            f"{r['au_pro']:>6.3f} {r.get('radius_max', float('nan')):>6.3f} "
            f"{r.get('radius_mean', float('nan')):>6.3f} {r['seconds']:>6.1f}"
        )


if __name__ == "__main__":
    main()
