"""`train`, `evaluate` and `predict`: a run from its options to its metrics, and its use.

`train`'s signature is where each of its options is declared; `submit` and `tune` take them
from it, and `vtadl.cli.options.TRAIN_FIELDS` reads them into the config.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vtadl.cli.console import err, handle_errors, out
from vtadl.cli.options import (
    GAUSSIANS_DEFAULT,
    config_from_options,
    flag,
    option,
    variant_default,
)
from vtadl.cli.progress import RichCallbacks, print_metrics, progress_bars
from vtadl.config import VARIANTS, DataConfig, EvalConfig, ModelConfig, TrainConfig
from vtadl.exceptions import ConfigError
from vtadl.presets import PRESETS

_D, _M, _T, _E = DataConfig(), ModelConfig(), TrainConfig(), EvalConfig()


@handle_errors
def train(
    dataset: str | None = option(_D.dataset, "mvtec, btad, mnist or folder."),
    root: Path | None = option(_D.root, "Folder that holds the category folders."),
    category: str | None = option(None, "Product category, e.g. bottle (required)."),
    pack: str | None = option(
        _D.pack, "auto (pack once into <out>/packs), none (read the files), or a .h5 path."
    ),
    tile: int | None = option(
        "0: off", "Train on native-resolution tiles of this size (= --image-size)."
    ),
    tile_overlap: int | None = option(_D.tile_overlap, "Overlap of neighbouring tiles (pixels)."),
    loader_workers: int | None = option(_D.num_workers, "Data loader processes per worker."),
    augment: bool | None = typer.Option(
        None,
        "--augment/--no-augment",
        help="Random horizontal and vertical flips (for textures and symmetric parts).",
        show_default="no-augment",
        metavar="",
    ),
    strategy: str | None = option(_T.strategy, "single (this process), ddp or deepspeed."),
    num_workers: int | None = option(_T.num_workers, "Ray Train workers (ddp, deepspeed)."),
    gpus_per_worker: float | None = option(_T.gpus_per_worker, "GPUs per Ray Train worker."),
    cpus_per_worker: float | None = option(_T.cpus_per_worker, "CPUs per Ray Train worker."),
    ray_address: str | None = option(
        "start a private local Ray", "Ray cluster to join: auto or host:port."
    ),
    placement: str | None = option(
        _T.placement, "Ray Train workers: pack (fill a node first) or spread (one per node)."
    ),
    local_copy: Path | None = option(
        "read the pack where it is",
        "Node-local folder: each node copies the pack there first (packs on a shared disk).",
    ),
    zero_stage: int | None = option(_T.zero_stage, "DeepSpeed ZeRO stage 0-3."),
    deepspeed_config: Path | None = option(
        "generated from the options", "DeepSpeed JSON config (experts)."
    ),
    variant: str | None = option(
        "vtadl_paper", f"Model size: {', '.join(VARIANTS)} (paper: 512 px; tiny: for tests)."
    ),
    preset: str | None = option(
        "none",
        f"A whole method: {', '.join(PRESETS)} (the paper's, docs/model.md). It overrides the "
        "variant; --config and options override it.",
    ),
    config: Path | None = option(
        None, "YAML/JSON config file; it overrides the variant and preset, options override it."
    ),
    epochs: int | None = option(_T.epochs, "Passes over the training images."),
    image_size: int | None = option(
        variant_default("img_size"), "Input size; divisible by the patch size."
    ),
    batch_size: int | None = option(_T.batch_size, "Images per step, over all workers."),
    lr: float | None = option(_T.lr, "Learning rate (Adam)."),
    mixture_fit: str | None = option(
        _T.mixture_fit,
        "The mixture of K Gaussians over the tokens: kernel (centred on K training tokens "
        "chosen by a coreset), em (fitted by EM after training) or sgd (trained with the "
        "network, the paper).",
    ),
    n_gaussians: str | None = option(
        GAUSSIANS_DEFAULT,
        "K, the number of Gaussians, in every fit: a number, all (kernel: every training "
        "token) or auto.",
    ),
    noise_std: float | None = option(_M.noise_std, "Noise on the tokens in training; 0 disables."),
    mdn_loss: str | None = option(_T.mdn_loss, "mixture (true NLL) or reference (published form)."),
    score: str | None = option(_E.score, "Anomaly map: nll, recon or nll+recon."),
    score_scale: str | None = option(
        _E.scale, "log (compress each score's tail) or linear, before standardising."
    ),
    grid_shifts: int | None = option(
        _E.grid_shifts, "Score the patch grid at N x N offsets, a map of stride patch/N."
    ),
    kernel_scope: str | None = option(
        "auto: position for mnist, else image",
        "A kernel scores each token against the training tokens of the whole image (image) "
        "or of its own grid position (position, for aligned images).",
    ),
    precision: str | None = option(_T.precision, "fp32 or bf16 (autocast)."),
    device: str | None = option(_T.device, "auto, cpu, cuda, cuda:1, ..."),
    seed: int | None = option(_T.seed, "Seed of the weights, the data split and the noise."),
    out_dir: Path | None = option(_T.out, "Runs folder.", "--out"),
    resume: bool = flag(
        "--resume",
        "Continue the newest run of this category with its stored config (--epochs and a "
        "moved --root may change).",
    ),
    as_json: bool = flag("--json", "Print one JSON object as the last line."),
) -> None:
    """Train on one category, then evaluate on its test split."""
    from vtadl.runs import train_and_evaluate

    cfg, run_dir = config_from_options(locals())
    with progress_bars() as progress:
        callbacks = RichCallbacks(progress)
        run_dir, result = train_and_evaluate(
            cfg, run_dir=run_dir, callbacks=callbacks, progress=callbacks.evaluating
        )
    print_metrics(result, run_dir, as_json)


@handle_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `vtadl train`."),
    score: str | None = typer.Option(None, help="Anomaly map: nll, recon or nll+recon."),
    score_scale: str | None = typer.Option(
        None, help="log (compress each score's tail) or linear, before standardising."
    ),
    image_score: str | None = typer.Option(
        None,
        help="Image score: peak (the highest patch scores before smoothing), peak+recon "
        "(plus the image's reconstruction error), peak+recon+neighbour (plus its tokens' "
        "distance to the nearest training image's; a kernel by position), auto "
        "(mnist: peak+recon+neighbour, or peak+recon without a kernel by position; else "
        "peak), or the smoothed map's max, mean or top1pct.",
    ),
    peak_patches: int | None = typer.Option(
        None, help="The peak is the mean of this many highest patch scores (1: the highest)."
    ),
    recon_weight: float | None = typer.Option(
        None, help="Weight of the reconstruction error in peak+recon[+neighbour]."
    ),
    neighbour_weight: float | None = typer.Option(
        None, help="Weight of the nearest training image's distance in peak+recon+neighbour."
    ),
    sigma: float | None = typer.Option(None, help="Smoothing of the map, in original pixels."),
    grid_shifts: int | None = typer.Option(
        None, help="Score the patch grid at N x N offsets for a finer map (N^2 passes)."
    ),
    mixture_fit: str | None = typer.Option(
        None,
        help="Refit the mixture after training: em or kernel (on an sgd run: fitted beside "
        "the trained network, its trained head unused).",
    ),
    n_gaussians: str | None = typer.Option(
        None,
        help="Refit the mixture after training with K Gaussians (a number, all for a kernel "
        "on every training token, auto); the network is not retrained.",
    ),
    kernel_scope: str | None = typer.Option(
        None, help="Kernel: tokens of the whole image (image) or of each position (position)."
    ),
    as_json: bool = flag("--json", "Print one JSON object as the last line."),
) -> None:
    """Evaluate a run's best checkpoint on its test split; rewrites metrics.json and maps/."""
    overrides = {
        "score": score,
        "scale": score_scale,
        "image_score": image_score,
        "peak_patches": peak_patches,
        "recon_weight": recon_weight,
        "neighbour_weight": neighbour_weight,
        "smoothing_sigma": sigma,
        "grid_shifts": grid_shifts,
        "kernel_scope": kernel_scope,
    }
    from vtadl.evaluation import evaluate_run

    with progress_bars() as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate_run(
            run_dir,
            eval_overrides=overrides,
            mixture_fit=mixture_fit,
            n_gaussians=n_gaussians,
            progress=lambda i, n: progress.update(task, completed=i, total=n),
        )
    print_metrics(result, run_dir, as_json)


@handle_errors
def predict(
    paths: list[Path] = typer.Argument(
        ...,
        metavar="[RUN_DIR] IMAGES...",
        help="A run folder written by `vtadl train`, then image files or folders of images "
        "(with --model: images only).",
    ),
    out_dir: Path = typer.Option(..., "--out", help="Folder for heat maps and scores.json."),
    model: Path | None = typer.Option(
        None, "--model", help="Score with a file from `vtadl export` instead of a run folder."
    ),
) -> None:
    """Score new images: heat maps and scores.json (threshold from validation images).

    Exit code 1 when some images could not be read; the others are scored all the same.
    """
    from vtadl.prediction import predict, predict_exported

    if model is not None:
        result = predict_exported(model, paths, out_dir)
    elif len(paths) < 2:
        raise ConfigError("give a run folder and at least one image (or --model FILE)")
    else:
        result = predict(paths[0], paths[1:], out_dir)
    for failure in result["failed"]:
        err.print(
            f"[yellow]skipped:[/yellow] {escape(failure['error'])}", highlight=False, soft_wrap=True
        )
    scored = result["images"]
    flagged = sum(r["anomalous"] for r in scored)
    out.print(
        f"{len(scored)} images scored, {flagged} above the threshold "
        f"{result['threshold']:.3f}; see {out_dir / 'scores.json'}",
        highlight=False,
    )
    if result["failed"]:
        err.print(f"{len(result['failed'])} images could not be read", highlight=False)
        raise typer.Exit(1)


@handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder written by `vtadl train`."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (onnxruntime) or torchscript (torch)."),
    out_file: Path = typer.Option(..., "--out", help="The file to write."),
) -> None:
    """Write a run as one file that scores images without vtadl's training stack:
    `vtadl predict --model FILE`, or `vtadl.inference.Detector` with numpy, Pillow and the
    format's runtime."""
    from vtadl.export import export_run

    meta = export_run(run_dir, fmt, out_file)
    out.print(
        f"{out_file}: {fmt}, {meta['mixture_fit']} K={meta['n_gaussians']}, threshold "
        f"{meta['threshold']:.3f}, {out_file.stat().st_size / 2**20:.1f} MiB",
        highlight=False,
    )
