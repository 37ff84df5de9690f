"""What searching several K costs against searching one, when K is fitted after training.

Runs `vtadl.tune.driver.tune` twice in one process on the same base config (one noise level,
FIFO, the mixture fitted after training): once over one value of K, once over several. Each
search trains one network; the second fits every K to it at each scoring epoch. Prints both
wall clocks (Ray started once for both, so its start-up is in neither) and their ratio.

    .venv/bin/vtadl data bench data/bench0 --seed 0
    .venv/bin/python benchmarks/tune_k_cost.py --root data/bench0/photos --category coins
    .venv/bin/python benchmarks/tune_k_cost.py --fit kernel --one 4096 --many 1024,4096,16384,all
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from vtadl.config import default_config
from vtadl.ray_session import start_local
from vtadl.tune.driver import tune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/bench0/photos")
    p.add_argument("--category", default="coins")
    p.add_argument("--variant", default="vtadl_small")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--fit", default="em", help="em or kernel")
    p.add_argument("--one", default="150")
    p.add_argument("--many", default="10,50,100,150")
    p.add_argument("--noise", default="0.2")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vtadl-tune-k-"))
    config = default_config(args.variant).override(
        data={"root": str(Path(args.root).resolve()), "category": args.category},
        train={"epochs": args.epochs, "out": str(out), "mixture_fit": args.fit},
    )
    start_local(os.cpu_count() or 1, logging_level="ERROR", log_to_driver=False)
    seconds = {}
    for name, ks in (("one", args.one), ("many", args.many)):
        options = {"gaussians": ks, "noise": args.noise, "scheduler": "fifo", "name": name}
        tic = time.perf_counter()
        summary = tune(config, options)
        seconds[name] = time.perf_counter() - tic
        best = summary["best"]
        print(
            f"K {ks}: {seconds[name]:.1f} s, {len(summary['trials'])} rows, best K "
            f"{best['n_gaussians']} ({summary['metric']} {best[summary['metric']]:.4f})",
            flush=True,
        )
    print(
        f"{args.variant}, {args.epochs} epochs, {args.fit}, noise {args.noise}: "
        f"{len(args.many.split(','))} K / 1 K = {seconds['many'] / seconds['one']:.2f}x"
    )


if __name__ == "__main__":
    main()
