"""What a kernel mixture costs: coreset selection and scoring against the number of stored
training tokens and against K.

For each number n of training tokens (vtadl_small's width, 192) and each K: the seconds to
choose K centres by the greedy coreset (`vtadl.scoring.coreset.greedy_order`, what a fit
after training does once per checkpoint), and the seconds to score one image's tokens on
4 x 4 shifted grids of 16 x 16 (4,096 tokens, what `vtadl evaluate` does per test image)
with the kernel of those K centres. "all" keeps every token (no selection).

Tokens are drawn from a mixture of a few hundred clusters of different spreads, roughly as
a trained encoder's are (random Gaussian tokens would make every token equally far from
every other and the coreset's job artificially hard).

    python benchmarks/kernel_cost.py                       # n 10k..320k, K 1024..16384, all
    python benchmarks/kernel_cost.py --tokens 40000 --ks 4096
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vtadl.scoring.coreset import greedy_order
from vtadl.scoring.mixture_fit import fit_kernel

WIDTH = 192
QUERY = 4096  # one image: 16 x 16 tokens on 4 x 4 shifted grids


def tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (300, WIDTH))
    spread = rng.uniform(0.1, 0.6, 300)
    which = rng.integers(0, 300, n)
    return (centres[which] + rng.normal(0, 1, (n, WIDTH)) * spread[which, None]).astype(np.float32)


def best_of(fn, arg, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="10000,40000,160000,320000")
    ap.add_argument("--ks", default="1024,4096,16384,all")
    args = ap.parse_args()
    ns = [int(n) for n in args.tokens.split(",")]
    ks = [k if k == "all" else int(k) for k in args.ks.split(",")]
    query = torch.from_numpy(tokens(QUERY, seed=1))[None]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; width {WIDTH}")
    print(f"{'tokens':>8} {'K':>7} {'coreset s':>10} {'score s/image':>14} {'fit+36 images s':>16}")
    for n in ns:
        bank = tokens(n)
        for k in ks:
            if k != "all" and k >= n:
                continue
            tic = time.perf_counter()
            order = greedy_order(bank, k, seed=0) if k != "all" else None
            select = time.perf_counter() - tic
            kernel = fit_kernel(bank, k, order)
            score = best_of(kernel.nll, query)
            print(f"{n:>8} {k!s:>7} {select:>10.2f} {score:>14.3f} {select + 36 * score:>16.1f}")


if __name__ == "__main__":
    main()
