"""Does tuning on the tuning split pick what the test split would? A small grid on demo data.

Runs `vtadl.tune.driver.tune` (every trial to the end: FIFO), then, for this benchmark only,
evaluates every trial's best checkpoint on the test split (a copy of each trial folder, so
the experiment is not touched) and prints a Markdown table of the tuning objective beside the
test metrics, with the rank correlation between them.

    .venv/bin/vtadl data demo data/demo
    .venv/bin/python benchmarks/tune_demo.py --root data/demo --category gravel --epochs 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

from vtadl.config import default_config
from vtadl.evaluation import evaluate_run
from vtadl.tune.driver import tune


def _params(r: dict) -> str:
    return f"K={r['n_gaussians']}, noise {r['noise_std']:g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/demo")
    p.add_argument("--category", default="gravel")
    p.add_argument("--variant", default="vtadl_small")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--gaussians", default="5,30,100")
    p.add_argument("--noise", default="0,0.2")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--out", default=None, help="Runs folder (default: a temporary one).")
    p.add_argument("--resume", action="store_true", help="Print the tables of a finished --out.")
    a = p.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="tune-demo-"))
    base = default_config(a.variant).override(
        data={"root": a.root, "category": a.category}, train={"epochs": a.epochs, "out": str(out)}
    )
    tic = time.perf_counter()
    summary = tune(
        base,
        {
            "gaussians": a.gaussians,
            "noise": a.noise,
            "scheduler": "fifo",
            "max_concurrent": a.max_concurrent,
            "name": "demo-grid",
            "resume": a.resume,
        },
    )
    seconds = time.perf_counter() - tic
    peek = out.parent / f"{out.name}-test-peek"  # outside the runs folder: not runs to report
    rows = []
    for r in summary["trials"]:
        copy = peek / r["trial_id"]
        if (copy / "metrics.json").exists():
            rows.append((r, json.loads((copy / "metrics.json").read_text())))
            continue
        shutil.copytree(r["run_dir"], copy, ignore=shutil.ignore_patterns("ray", "workers"))
        rows.append((r, evaluate_run(copy)))
    took = (
        "results read back"
        if a.resume
        else f"{seconds:.0f} s for the search and the final evaluation"
    )
    print(
        f"{a.category}, {a.variant}, {a.epochs} epochs, {len(rows)} trials, "
        f"{a.max_concurrent} at once: {took}"
    )
    print()
    print(
        "| Gaussians | noise | tuning AU-PRO | tuning pixel AUROC | test image AUROC "
        "| test pixel AUROC | test AU-PRO |"
    )
    print("|---|---|---|---|---|---|---|")
    best = summary["best"]["trial_id"]
    for r, m in sorted(rows, key=lambda x: (x[0]["n_gaussians"], x[0]["noise_std"])):
        mark = " **(chosen)**" if r["trial_id"] == best else ""
        print(
            f"| {r['n_gaussians']}{mark} | {r['noise_std']:g} | {r['au_pro']:.3f} "
            f"| {r['tuning_pixel_auroc']:.3f} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} "
            f"| {m['au_pro']:.3f} |"
        )
    tuning = [r["au_pro"] for r, _ in rows]
    print()
    for key, name in (
        ("au_pro", "AU-PRO"),
        ("pixel_auroc", "pixel AUROC"),
        ("image_auroc", "image AUROC"),
    ):
        rho = spearmanr(tuning, [m[key] for _, m in rows]).statistic
        top = max(rows, key=lambda x: x[1][key])[0]
        which = "the chosen one" if top["trial_id"] == best else _params(top)
        print(
            f"- test {name}: Spearman rank correlation with the tuning AU-PRO {rho:.2f}; "
            f"best on the test split: {which}"
        )
    print(
        f"\nchosen ({_params(summary['best'])}) on the test split: "
        f"{summary['test_metrics']['au_pro']:.3f} AU-PRO"
    )


if __name__ == "__main__":
    main()
