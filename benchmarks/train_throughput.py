"""Training throughput: images per second, peak memory, GFLOPs per image, matmul efficiency.

Each precision runs in its own process, so its peak resident memory is its own. A training
step is the real one (forward, the full loss, backward, gradient clipping, Adam) on random
images; the FLOPs of one step are counted with torch.utils.flop_counter.

    python benchmarks/train_throughput.py --variant vtadl_paper --n-gaussians 10
    python benchmarks/train_throughput.py --variant vtadl_small --batch-size 8

With --strategy, the real training loop (`vtadl.training.fit`, data loading and validation
included) runs on a demo category for a few epochs per strategy and worker count, and the
median images per second of the epochs after the first is printed:

    python benchmarks/train_throughput.py --variant vtadl_small --strategy single ddp \
        --num-workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from vtadl.config import Config, default_config
from vtadl.model import build_model
from vtadl.training import Engine, Workers, loss_terms, pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """This machine's measured dense matmul rate in GFLOP/s."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    tic = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - tic) / 1e9


def _step(engine: Engine, images: torch.Tensor, config: Config) -> None:
    engine.step(loss_terms(engine.module, images, config).total)


def measure(args: argparse.Namespace, precision: str) -> dict:
    torch.manual_seed(0)
    model_over = {"img_size": args.image_size, "n_gaussians": args.n_gaussians}
    config = default_config(args.variant).override(
        model={k: v for k, v in model_over.items() if v is not None},
        train={"precision": precision, "batch_size": args.batch_size},
    )
    device = pick_device(args.device)
    model = build_model(config.model).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    engine = Workers().engine(model, config)
    size = config.model.img_size
    images = torch.rand(args.batch_size, 3, size, size, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(engine, images, config)
    gflop_per_image = counter.get_total_flops() / args.batch_size / 1e9
    for _ in range(args.warmup):
        _step(engine, images, config)
    _sync(device)
    tic = time.perf_counter()
    for _ in range(args.steps):
        _step(engine, images, config)
    _sync(device)
    seconds = time.perf_counter() - tic
    ips = args.steps * args.batch_size / seconds
    peak = matmul_rate(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    gpu_peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return {
        "device": str(device),
        "peak_gpu_memory_gb": None if gpu_peak is None else round(gpu_peak, 3),
        "variant": args.variant,
        "image_size": size,
        "n_gaussians": config.model.n_gaussians,
        "batch_size": args.batch_size,
        "precision": precision,
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "images_per_second": round(ips, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "rss_before_model_step_gb": round(rss_before / 1024, 3),
        "gflop_per_image": round(gflop_per_image, 2),
        "matmul_gflops": round(peak, 1),
        "matmul_fraction": round(gflop_per_image * ips / peak, 3),
    }


def loop_throughput(args: argparse.Namespace) -> None:
    import statistics
    import tempfile
    from pathlib import Path

    from vtadl.data.demo import make_demo_dataset
    from vtadl.runs import fit

    tmp = Path(tempfile.mkdtemp(prefix="vtadl-throughput-"))
    size = args.image_size or default_config(args.variant).model.img_size
    make_demo_dataset(tmp / "data", categories=["brick"], image_size=size, n_train=72)
    rows = []
    for strategy in args.strategy:
        for workers in args.num_workers if strategy != "single" else [1]:
            config = default_config(args.variant).override(
                model={"img_size": size},
                data={"root": str(tmp / "data"), "category": "brick"},
                train={
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "strategy": strategy,
                    "num_workers": workers,
                    "out": str(tmp / "runs"),
                    # each worker gets its share of the cores; the single process has them all
                    "cpus_per_worker": max(1, (os.cpu_count() or 1) // workers),
                },
            )
            run = fit(config)
            lines = (run / "history.jsonl").read_text().splitlines()
            rates = [json.loads(line)["images_per_second"] for line in lines][1:]
            rows.append((strategy, workers, statistics.median(rates)))
            print(
                json.dumps(
                    {
                        "strategy": strategy,
                        "workers": workers,
                        "variant": args.variant,
                        "image_size": size,
                        "batch_size": args.batch_size,
                        "images_per_second": rows[-1][2],
                    }
                ),
                flush=True,
            )
    base = next((r[2] for r in rows if r[0] == "single"), None)
    print(f"\n{'strategy':<10} {'workers':>7} {'img/s':>8} {'vs single':>10}")
    for strategy, workers, ips in rows:
        rel = f"{ips / base - 1:+.1%}" if base else ""
        print(f"{strategy:<10} {workers:>7} {ips:>8.2f} {rel:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vtadl_paper")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--n-gaussians", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--strategy", nargs="*", default=None, help="single ddp deepspeed: time fit()")
    ap.add_argument("--num-workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.strategy:
        loop_throughput(args)
        return
    if args.child:
        print(json.dumps(measure(args, args.precision[0])))
        return
    rows = []
    for precision in args.precision:
        cmd = [sys.executable, __file__, "--child", "--precision", precision] + [
            a for a in sys.argv[1:] if a not in args.precision and a != "--precision"
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'precision':<9} {'img/s':>7} {'peak GB':>8} {'GFLOP/img':>10} {'matmul GFLOP/s':>15} "
        f"{'fraction':>9}"
    )
    for r in rows:
        print(
            f"{r['precision']:<9} {r['images_per_second']:>7} {r['peak_rss_gb']:>8} "
            f"{r['gflop_per_image']:>10} {r['matmul_gflops']:>15} {r['matmul_fraction']:>9}"
        )


if __name__ == "__main__":
    main()
