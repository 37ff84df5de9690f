"""Training throughput: the step's images/s and TFLOP/s, and the real loop's wall clock.

Step mode (the default): a training step is the real one (forward, the full loss, backward,
gradient clipping, Adam) on random images, once per precision, batch size and option set, each
in its own process so that its peak memory is its own; the FLOPs of one step are counted with
torch.utils.flop_counter and set against this machine's measured matmul rate. Precisions:
fp32, tf32 (fp32 with TF32 matmuls, CUDA only) and bf16 (autocast).

    python benchmarks/train_throughput.py --variant vtadl_paper --n-gaussians 10
    python benchmarks/train_throughput.py --variant vtadl_small --batch-size 8 16 --fused-adam

Loop mode (--strategy, or --loop after the step rows): the real training loop (`vtadl.runs.fit`:
data from the pack, validation and checkpoints every epoch as configured) on a demo category of
--loop-images training images for --epochs epochs, per strategy and worker count. It prints the
median training-step rate of the epochs after the first (history `images_per_second`) and the
wall-clock rate of the whole fit call (setup included) and of those epochs
(history `wall_images_per_second`):

    python benchmarks/train_throughput.py --variant vtadl_small --strategy single ddp \
        --num-workers 1 2 --loop-images 200 --epochs 20

--profile N profiles N steps (after the warm-up) with torch.profiler and prints where the
step's time goes: per part (the encoder, decoder and mixture head's forward, the loss, the
backward pass with clipping and Adam) and per kernel class (matmul, attention, convolution,
elementwise, reductions and norms, copies, optimiser), by self time on the device that ran it:

    python benchmarks/train_throughput.py --variant vtadl_small --precision fp32 --profile 3

--checkpoint-cost times one epoch's checkpoints on the training thread, before (last.pt and
best.pt with optimiser state, written in turn) and now (a host copy for the background writer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from vtadl.config import Config, default_config
from vtadl.devices import pick_device, set_tf32
from vtadl.model import build_model
from vtadl.training import Engine, Workers, loss_terms, training_model


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


def _config(args: argparse.Namespace, precision: str, batch_size: int) -> Config:
    model_over = {
        "img_size": args.image_size,
        "n_gaussians": args.n_gaussians,
        "mdn_condition": args.mdn_condition,
        "mdn_detach": args.mdn_detach,
    }
    return default_config(args.variant).override(
        model={k: v for k, v in model_over.items() if v is not None},
        train={
            "precision": "bf16" if precision == "bf16" else "fp32",
            "tf32": precision == "tf32",
            "batch_size": batch_size,
            "compile": args.compile,
            "fused_adam": args.fused_adam,
            **({"mixture_fit": args.mixture_fit} if args.mixture_fit else {}),
        },
    )


def _setup(args: argparse.Namespace, precision: str, batch_size: int):
    """The config, device, model, engine and a batch of random images of one measurement."""
    torch.manual_seed(0)
    config = _config(args, precision, batch_size)
    device = pick_device(args.device)
    set_tf32(device, config.train.tf32)
    model = training_model(config, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    engine = Workers().engine(model, config)
    size = config.model.img_size
    images = torch.rand(batch_size, 3, size, size, device=device)
    return config, device, model, engine, images


def measure(args: argparse.Namespace, precision: str, batch_size: int) -> dict:
    config, device, model, engine, images = _setup(args, precision, batch_size)
    size = config.model.img_size
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(engine, images, config)
    gflop_per_image = counter.get_total_flops() / batch_size / 1e9
    for _ in range(args.warmup):
        _step(engine, images, config)
    _sync(device)
    tic = time.perf_counter()
    for _ in range(args.steps):
        _step(engine, images, config)
    _sync(device)
    seconds = time.perf_counter() - tic
    ips = args.steps * batch_size / seconds
    peak = matmul_rate(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    gpu_peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "kind": "step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_gpu_memory_gb": None if gpu_peak is None else round(gpu_peak, 3),
        "variant": args.variant,
        "image_size": size,
        "n_gaussians": config.model.n_gaussians,
        "batch_size": batch_size,
        "precision": precision,
        "options": _options(args),
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "images_per_second": round(ips, 3),
        "peak_rss_gb": round(rss, 3),
        "rss_before_model_step_gb": round(rss_before / 1024, 3),
        "gflop_per_image": round(gflop_per_image, 2),
        "tflops": round(gflop_per_image * ips / 1e3, 3),
        "matmul_gflops": round(peak, 1),
        "matmul_fraction": round(gflop_per_image * ips / peak, 3),
    }


# Kernel classes of the profile, by aten op name (checked in order; the rest is "other").
KERNEL_CLASSES = (
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    (
        "matmul",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::matmul",
            "aten::linear",
            "aten::baddbmm",
            "aten::_addmm_activation",
        ),
    ),
    ("convolution", ("conv", "aten::_convolution")),
    ("optimiser", ("_foreach", "adam", "Optimizer")),
    (
        "reduction and norm",
        ("sum", "mean", "logsumexp", "softmax", "norm", "amax", "max", "var", "std"),
    ),
    (
        "copy and layout",
        (
            "copy",
            "aten::to",
            "aten::_to",
            "contiguous",
            "aten::cat",
            "aten::stack",
            "clone",
            "aten::empty",
            "aten::zeros",
            "fill_",
            "aten::pad",
            "constant_pad",
            "reflection_pad",
        ),
    ),
    (
        "elementwise",
        (
            "add",
            "mul",
            "sub",
            "div",
            "exp",
            "log",
            "square",
            "pow",
            "clamp",
            "gelu",
            "sigmoid",
            "where",
            "masked_fill",
            "neg",
            "rsub",
            "abs",
            "sqrt",
            "rsqrt",
            "threshold",
            "lt",
            "gt",
            "ge",
            "le",
            "eq",
            "silu",
            "tanh",
            "softplus",
            "lerp",
            "addcmul",
            "addcdiv",
            "maximum",
            "minimum",
        ),
    ),
)
PARTS = ("encoder", "decoder", "mdn")


def _kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k.lower() in lowered for k in keys):
            return label
    return "other"


def profile_step(args: argparse.Namespace, precision: str, batch_size: int) -> dict:
    """Where one training step's time goes (torch.profiler), per part and per kernel class."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    config, device, model, engine, images = _setup(args, precision, batch_size)
    # The model calls its encoder's forward_features, not the module itself, so each part's
    # entry point is wrapped in a labelled range (on this instance only).
    for part in PARTS:
        module = getattr(model, part)
        name = "forward_features" if part == "encoder" else "forward"

        def labelled(*a, _run=getattr(module, name), _part=part, **k):
            with record_function(_part):
                return _run(*a, **k)

        setattr(module, name, labelled)

    def step() -> None:
        with record_function("forward and loss"):
            terms = loss_terms(engine.module, images, config)
        with record_function("backward, clip, optimiser"):
            engine.step(terms.total)

    for _ in range(max(1, args.warmup)):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile):
            step()
        _sync(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def total(e) -> float:  # inclusive time of a labelled range, in ms per step
        us = e.device_time_total if on_device else e.cpu_time_total
        return us / 1e3 / args.profile

    def self_time(e) -> float:
        us = e.self_device_time_total if on_device else e.self_cpu_time_total
        return us / 1e3 / args.profile

    labels = {
        e.key: total(e)
        for e in events
        if e.key in (*PARTS, "forward and loss", "backward, clip, optimiser")
    }
    step_ms = labels.get("forward and loss", 0) + labels.get("backward, clip, optimiser", 0)
    parts = {f"forward: {p}": labels.get(p, 0.0) for p in PARTS}
    parts["forward: loss (mixture NLL, MSE, SSIM)"] = labels.get("forward and loss", 0) - sum(
        parts.values()
    )
    parts["backward, clip, optimiser"] = labels.get("backward, clip, optimiser", 0.0)
    classes: dict[str, float] = {}
    for e in events:
        if e.key.startswith("aten::") or "Optimizer" in e.key or "_foreach" in e.key:
            classes[_kernel_class(e.key)] = classes.get(_kernel_class(e.key), 0.0) + self_time(e)
    top = sorted((e for e in events if e.key.startswith("aten::")), key=self_time, reverse=True)[
        :12
    ]
    return {
        "kind": "profile",
        "device": torch.cuda.get_device_name(device) if on_device else "cpu",
        "variant": args.variant,
        "precision": precision,
        "batch_size": batch_size,
        "n_gaussians": config.model.n_gaussians,
        "mdn_condition": config.model.mdn_condition,
        "time": "device" if on_device else "cpu",
        "step_ms": round(step_ms, 2),
        "parts_ms": {k: round(v, 2) for k, v in parts.items()},
        "classes_ms": {k: round(v, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": {e.key: round(self_time(e), 2) for e in top},
    }


def print_profile(row: dict) -> None:
    print(
        f"\nprofile: {row['variant']} K={row['n_gaussians']} ({row['mdn_condition']}), "
        f"{row['precision']}, batch {row['batch_size']}, {row['device']}: "
        f"{row['step_ms']:.1f} ms per step ({row['time']} time)"
    )
    for title, key in (
        ("part", "parts_ms"),
        ("kernel class (self time)", "classes_ms"),
        ("op (self time)", "top_ops_ms"),
    ):
        print(f"\n| {title} | ms per step | share |\n|---|---|---|")
        for name, ms in row[key].items():
            print(f"| {name} | {ms:.1f} | {100 * ms / max(row['step_ms'], 1e-9):.0f}% |")


def checkpoint_cost(args: argparse.Namespace) -> dict:
    """What one epoch's checkpoints cost the training thread: the old way (last.pt and best.pt
    with the optimiser state, written in turn to the page cache) against a host copy handed to
    the background writer; and the bytes and write times (fsync included) of a full and a
    weights-only file."""
    import tempfile
    from pathlib import Path

    from vtadl.checkpoints import CheckpointWriter, save_checkpoint

    config = _config(args, args.precision[0], args.batch_size[0])
    device = pick_device(args.device)
    engine = Workers().engine(build_model(config.model).to(device), config)
    size = config.model.img_size
    _step(engine, torch.rand(args.batch_size[0], 3, size, size, device=device), config)
    folder = Path(tempfile.mkdtemp(prefix="vtadl-ckpt-"))
    full, weights = engine.state(), {"model": engine.state()["model"]}

    def timed(fn) -> float:
        _sync(device)
        tic = time.perf_counter()
        fn()
        return round(time.perf_counter() - tic, 3)

    def before(path: Path) -> None:  # the save before issue 12: no fsync
        torch.save(full, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    row = {"kind": "checkpoint", "variant": args.variant, "device": str(device)}
    row["before_epoch_s"] = timed(lambda: (before(folder / "last.pt"), before(folder / "best.pt")))
    row["full_write_s"] = timed(lambda: save_checkpoint(folder / "last.pt", **full))
    row["weights_write_s"] = timed(lambda: save_checkpoint(folder / "best.pt", **weights))
    row["full_gb"] = round((folder / "last.pt").stat().st_size / 1e9, 3)
    row["weights_gb"] = round((folder / "best.pt").stat().st_size / 1e9, 3)
    files = CheckpointWriter(background=True)
    row["snapshot_s"] = timed(lambda: files.submit(folder / "last.pt", files.snapshot(full)))
    row["background_write_s"] = timed(files.close)
    return row


def _options(args: argparse.Namespace) -> str:
    names = ("compile", "fused_adam", "checkpoint_in_loop")
    chosen = [name for name in names if getattr(args, name, False)]
    return "+".join(chosen) or "-"


def loop_throughput(args: argparse.Namespace) -> list[dict]:
    import tempfile
    from pathlib import Path

    from vtadl.data.demo import make_demo_dataset
    from vtadl.runs import fit

    tmp = Path(tempfile.mkdtemp(prefix="vtadl-throughput-"))
    size = args.image_size or default_config(args.variant).model.img_size
    make_demo_dataset(
        tmp / "data", categories=["brick"], image_size=size, n_train=args.loop_images,
        n_test_good=2, n_test_defect=2,
    )  # fmt: skip
    rows = []
    for strategy in args.strategy or ["single"]:
        for workers in args.num_workers if strategy != "single" else [1]:
            for precision in args.loop_precision or args.precision[:1]:
                gpus = 1 if args.device.startswith("cuda") and strategy != "single" else 0
                config = _config(args, precision, args.batch_size[0]).override(
                    data={"root": str(tmp / "data"), "category": "brick"},
                    train={
                        "epochs": args.epochs,
                        "strategy": strategy,
                        "num_workers": workers,
                        "device": args.device,
                        "gpus_per_worker": gpus,
                        "out": str(tmp / "runs"),
                        # each worker gets its share of the cores; one process has them all
                        "cpus_per_worker": max(1, (os.cpu_count() or 1) // workers),
                        "checkpoint_background": not args.checkpoint_in_loop,
                        "checkpoint_every_epochs": args.checkpoint_every_epochs,
                        "checkpoint_every_minutes": args.checkpoint_every_minutes,
                    },
                )
                tic = time.perf_counter()
                run = fit(config)
                wall = time.perf_counter() - tic
                lines = (run / "history.jsonl").read_text().splitlines()
                history = [json.loads(line) for line in lines]
                later = history[1:] or history
                images = sum(r["images"] for r in history)
                steps = statistics.median(r["images_per_second"] for r in later)
                rows.append(
                    {
                        "kind": "loop",
                        "device": args.device,
                        "strategy": strategy,
                        "workers": workers,
                        "variant": args.variant,
                        "image_size": size,
                        "precision": precision,
                        "batch_size": args.batch_size[0],
                        "options": _options(args),
                        "train_images": args.loop_images,
                        "epochs": args.epochs,
                        "images_per_second": steps,
                        "epoch_wall_images_per_second": statistics.median(
                            r["wall_images_per_second"] for r in later
                        ),
                        "fit_wall_seconds": round(wall, 1),
                        "wall_images_per_second": round(images / wall, 3),
                        "checkpoints": sum(r["checkpoint"] for r in history),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'kind':<5} {'strategy':<9} {'prec':<5} {'batch':>5} {'options':<18} {'img/s':>8} "
        f"{'TFLOP/s':>8} {'of matmul':>9} {'peak GB':>8} {'wall img/s':>10} {'wall/step':>9}"
    )
    print("\n" + head)
    for r in rows:
        memory = r.get("peak_gpu_memory_gb") or r.get("peak_rss_gb")
        wall = r.get("epoch_wall_images_per_second")
        cells = [
            f"{r['kind']:<5}",
            f"{r.get('strategy', '') + (str(r['workers']) if 'workers' in r else ''):<9}",
            f"{r['precision']:<5}",
            f"{r['batch_size']:>5}",
            f"{r['options']:<18}",
            f"{r['images_per_second']:>8.2f}",
            f"{r['tflops']:>8.3f}" if "tflops" in r else f"{'':>8}",
            f"{r['matmul_fraction']:>9.3f}" if "matmul_fraction" in r else f"{'':>9}",
            f"{memory:>8.2f}" if memory else f"{'':>8}",
            f"{wall:>10.2f}" if wall else f"{'':>10}",
            f"{wall / r['images_per_second']:>9.2f}" if wall else f"{'':>9}",
        ]
        print(" ".join(cells))
    loops = [r for r in rows if r["kind"] == "loop"]
    for r in loops:
        print(
            f"loop {r['strategy']}{r['workers']} {r['precision']}: {r['train_images']} training "
            f"images x {r['epochs']} epochs, fit() {r['fit_wall_seconds']} s wall "
            f"({r['wall_images_per_second']} images/s with setup), {r['checkpoints']} checkpoints"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vtadl_paper")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--n-gaussians", type=int, default=None)
    ap.add_argument("--mdn-condition", default=None, help="token, position or global")
    ap.add_argument("--mdn-detach", default=None, action=argparse.BooleanOptionalAction)
    ap.add_argument("--mixture-fit", default=None, help="em or sgd (sgd: the published way)")
    ap.add_argument("--batch-size", nargs="*", type=int, default=[8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", nargs="*", default=["fp32", "bf16"], help="fp32 tf32 bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--fused-adam", action="store_true", help="Adam's fused implementation")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--strategy", nargs="*", default=None, help="single ddp deepspeed: time fit()")
    ap.add_argument("--loop", action="store_true", help="after the step rows, time fit() too")
    ap.add_argument("--loop-precision", nargs="*", default=None, help="default: the first one")
    ap.add_argument("--loop-images", type=int, default=72, help="training images of the loop")
    ap.add_argument("--num-workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--checkpoint-every-epochs", type=int, default=1)
    ap.add_argument("--checkpoint-every-minutes", type=float, default=10.0)
    ap.add_argument("--checkpoint-in-loop", action="store_true", help="no background writes")
    ap.add_argument("--checkpoint-cost", action="store_true", help="time one epoch's saves")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps (torch.profiler)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        args.device = pick_device("auto").type
    if args.child:
        print(json.dumps(measure(args, args.precision[0], args.batch_size[0])))
        return
    if args.checkpoint_cost:
        print(json.dumps(checkpoint_cost(args)))
        return
    if args.profile:
        for precision in args.precision:
            for batch_size in args.batch_size:
                row = profile_step(args, precision, batch_size)
                print(json.dumps(row), flush=True)
                print_profile(row)
        return
    rows = []
    if not args.strategy:
        for precision in args.precision:
            for batch_size in args.batch_size:
                rows.append(_child(args, precision, batch_size))
                print(json.dumps(rows[-1]), flush=True)
    if args.strategy or args.loop:
        rows += loop_throughput(args)
    print_table(rows)


def _child(args: argparse.Namespace, precision: str, batch_size: int) -> dict:
    """One step measurement in a fresh process (its own peak memory)."""
    skip = {"--precision", "--batch-size", "--loop", "--loop-precision"}
    argv, dropping = [], False
    for a in sys.argv[1:]:
        if a.startswith("--"):
            dropping = a in skip
            if dropping:
                continue
        if not dropping:
            argv.append(a)
    cmd = [sys.executable, __file__, *argv, "--child", "--precision", precision]
    cmd += ["--batch-size", str(batch_size), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
