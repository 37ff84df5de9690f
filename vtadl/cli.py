"""The `vtadl` command line: each command parses, calls one library function, prints.

Errors a user can cause become one line on stderr and exit code 2; nothing is a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vtadl.config import VARIANTS, DataConfig, EvalConfig, ModelConfig, TrainConfig
from vtadl.console import METRIC_NAMES, err, handle_errors, out

HELP = """Find defects in images of your products: train an anomaly detector (VT-ADL) on images
of good parts, measure it on a test split with known defects, and get heat maps of where
new images look wrong.

Start with `vtadl data demo data/demo`, then
`vtadl train --root data/demo --category brick --variant vtadl_small`.
"""

app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
data_app = typer.Typer(
    no_args_is_help=True,
    help="Datasets: write the demo dataset or the benchmark (bench), download, check and pack.",
)
app.add_typer(data_app, name="data")


def _flag(name: str, help: str, *short: str):
    """A boolean option that is a flag (`--json`), shown without a value type."""
    return typer.Option(False, name, *short, help=help, metavar="")


@app.callback()
def main(verbose: bool = _flag("--verbose", "Log progress details.", "-v")):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class _RichCallbacks:
    """Epoch and step progress bars on a terminal; elsewhere (a job log, `nohup`), one line
    per epoch on stderr, so that a long run does not look hung."""

    reads_checkpoints = False  # the loop need not wait for checkpoint writes to call us

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.epochs = self.steps = self.evaluation = None
        self.total_epochs = 0

    def on_train_start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None:
        self.total_epochs = epochs
        self.epochs = self.progress.add_task("epochs", total=epochs)
        self.steps = self.progress.add_task("steps", total=steps_per_epoch)
        _log_line(f"training in {run_dir}")

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        self.progress.update(self.steps, completed=step + 1, description=f"loss {loss:.4f}")

    def on_epoch_end(self, record: dict) -> None:
        self.progress.update(
            self.epochs,
            completed=record["epoch"],
            description=f"epoch {record['epoch']} val {record['val_loss']:.4f}",
        )
        self.progress.reset(self.steps)
        _log_line(
            f"epoch {record['epoch']}/{self.total_epochs}: loss {record['loss']:.4f}, "
            f"val {record['val_loss']:.4f}{' (best)' if record['best'] else ''}, "
            f"training steps {record['train_seconds']:.1f} s, {record['wall_seconds']:.1f} s"
        )

    def evaluating(self, done: int, total: int) -> None:
        if self.evaluation is None:
            _log_line(f"evaluating the best checkpoint on {total} test images")
            self.evaluation = self.progress.add_task("evaluating", total=total)
        self.progress.update(self.evaluation, completed=done, total=total)


def _log_line(text: str) -> None:
    """Progress for logs: a line on stderr when it is not a terminal (which has the bars)."""
    if not err.is_terminal:
        err.print(text, markup=False, highlight=False, soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )


def _print_metrics(result: dict, run_dir: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), **result}))
        return
    table = Table(
        title=f"{result['dataset']}/{result['category']} ({result['n_test']} test images)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, name in METRIC_NAMES.items():
        if result.get(key) is not None:
            table.add_row(name, f"{result[key]:.4f}")
    out.print(table)
    if result.get("pixel_metrics_absent"):
        out.print(f"no pixel metrics: {result['pixel_metrics_absent']}", highlight=False)
    by_defect = result.get("by_defect") or {}
    if len(by_defect) > 1:
        per = Table(title="each defect type against the good test images")
        keys = ["image_auroc"] + ([] if result.get("pixel_metrics_absent") else ["pixel_auroc"])
        per.add_column("defect type")
        per.add_column("images", justify="right")
        for key in keys:
            per.add_column(METRIC_NAMES[key], justify="right")
        for defect, m in by_defect.items():
            values = ["-" if m[k] is None else f"{m[k]:.4f}" for k in keys]
            per.add_row(defect, str(m["n_images"]), *values)
        out.print(per)
    timing = result.get("timing")
    if timing and timing["epochs"]:
        out.print(
            f"took {timing['wall_seconds']:.1f} s: training {timing['fit_seconds']:.1f} s for "
            f"{timing['epochs']} epochs ({timing['wall_images_per_second']:.1f} images/s; "
            f"{timing['images_per_second']:.1f} images/s in the {timing['train_seconds']:.1f} s "
            f"of training steps), evaluation {timing['evaluate_seconds']:.1f} s",
            highlight=False,
        )
    out.print(f"run folder: {run_dir}  (heat maps in {run_dir / 'maps'})", highlight=False)


def config_from_options(o: dict[str, Any]):
    """The config (and run folder to resume) that `train`'s options describe; `submit` builds
    each category's request with it too, so both accept the same options."""
    from vtadl.runs import train_config

    path = lambda p: str(p) if p else None
    return train_config(
        config_file=o["config"],
        variant=o["variant"],
        dataset=o["dataset"],
        root=o["root"],
        category=o["category"],
        resume=o.get("resume", False),
        data=dict(
            pack=o["pack"],
            tile=o["tile"],
            tile_overlap=o["tile_overlap"],
            num_workers=o["loader_workers"],
            augment=o["augment"],
            local_copy=path(o.get("local_copy")),
        ),
        model=dict(
            img_size=o["image_size"], n_gaussians=o["n_gaussians"], noise_std=o["noise_std"]
        ),
        train=dict(
            epochs=o["epochs"],
            batch_size=o["batch_size"],
            lr=o["lr"],
            mdn_loss=o["mdn_loss"],
            mixture_fit=o["mixture_fit"],
            precision=o["precision"],
            device=o["device"],
            seed=o["seed"],
            out=path(o["out_dir"]),
            strategy=o["strategy"],
            num_workers=o["num_workers"],
            gpus_per_worker=o["gpus_per_worker"],
            cpus_per_worker=o["cpus_per_worker"],
            ray_address=o["ray_address"],
            placement=o.get("placement"),
            zero_stage=o["zero_stage"],
            deepspeed_config=path(o["deepspeed_config"]),
        ),
        eval=dict(
            score=o["score"],
            scale=o["score_scale"],
            grid_shifts=o["grid_shifts"],
            kernel_scope=o["kernel_scope"],
        ),
    )


def _variant_default(field: str) -> str:
    values = {name.removeprefix("vtadl_"): getattr(m, field) for name, m in VARIANTS.items()}
    shown = ", ".join(f"{name} {value}" for name, value in values.items())
    return f"from the variant: {shown}"


def _option(default: object, help: str, *names: str):
    """A `train` option that is None unless given (so a --config file can set it), with the
    default it stands for shown in the help (None: no default)."""
    return typer.Option(None, *names, help=help, show_default=default is not None and str(default))


_D, _M, _T, _E = DataConfig(), ModelConfig(), TrainConfig(), EvalConfig()


@app.command()
@handle_errors
def train(
    dataset: str | None = _option(_D.dataset, "mvtec, btad, mnist or folder."),
    root: Path | None = _option(_D.root, "Folder that holds the category folders."),
    category: str | None = _option(None, "Product category, e.g. bottle (required)."),
    pack: str | None = _option(
        _D.pack, "auto (pack once into <out>/packs), none (read the files), or a .h5 path."
    ),
    tile: int | None = _option(
        "0: off", "Train on native-resolution tiles of this size (= --image-size)."
    ),
    tile_overlap: int | None = _option(_D.tile_overlap, "Overlap of neighbouring tiles (pixels)."),
    loader_workers: int | None = _option(_D.num_workers, "Data loader processes per worker."),
    augment: bool | None = typer.Option(
        None,
        "--augment/--no-augment",
        help="Random horizontal and vertical flips (for textures and symmetric parts).",
        show_default="no-augment",
        metavar="",
    ),
    strategy: str | None = _option(_T.strategy, "single (this process), ddp or deepspeed."),
    num_workers: int | None = _option(_T.num_workers, "Ray Train workers (ddp, deepspeed)."),
    gpus_per_worker: float | None = _option(_T.gpus_per_worker, "GPUs per Ray Train worker."),
    cpus_per_worker: float | None = _option(_T.cpus_per_worker, "CPUs per Ray Train worker."),
    ray_address: str | None = _option(
        "start a private local Ray", "Ray cluster to join: auto or host:port."
    ),
    placement: str | None = _option(
        _T.placement, "Ray Train workers: pack (fill a node first) or spread (one per node)."
    ),
    local_copy: Path | None = _option(
        "read the pack where it is",
        "Node-local folder: each node copies the pack there first (packs on a shared disk).",
    ),
    zero_stage: int | None = _option(_T.zero_stage, "DeepSpeed ZeRO stage 0-3."),
    deepspeed_config: Path | None = _option(
        "generated from the options", "DeepSpeed JSON config (experts)."
    ),
    variant: str | None = _option(
        "vtadl_paper", f"Model size: {', '.join(VARIANTS)} (paper: 512 px; tiny: for tests)."
    ),
    config: Path | None = _option(
        None, "YAML/JSON config file; it overrides the variant, options override it."
    ),
    epochs: int | None = _option(_T.epochs, "Passes over the training images."),
    image_size: int | None = _option(
        _variant_default("img_size"), "Input size; divisible by the patch size."
    ),
    batch_size: int | None = _option(_T.batch_size, "Images per step, over all workers."),
    lr: float | None = _option(_T.lr, "Learning rate (Adam)."),
    mixture_fit: str | None = _option(
        _T.mixture_fit,
        "The mixture over the tokens: kernel (a Gaussian on every training token), em "
        "(--n-gaussians fitted after training) or sgd (trained with the network, the paper).",
    ),
    n_gaussians: int | None = _option(
        _variant_default("n_gaussians"), "Gaussians in the mixture (em, sgd)."
    ),
    noise_std: float | None = _option(_M.noise_std, "Noise on the tokens in training; 0 disables."),
    mdn_loss: str | None = _option(
        _T.mdn_loss, "mixture (true NLL) or reference (published form)."
    ),
    score: str | None = _option(_E.score, "Anomaly map: nll, recon or nll+recon."),
    score_scale: str | None = _option(
        _E.scale, "log (compress each score's tail) or linear, before standardising."
    ),
    grid_shifts: int | None = _option(
        _E.grid_shifts, "Score the patch grid at N x N offsets, a map of stride patch/N."
    ),
    kernel_scope: str | None = _option(
        "auto: position for mnist, else image",
        "A kernel scores each token against the training tokens of the whole image (image) "
        "or of its own grid position (position, for aligned images).",
    ),
    precision: str | None = _option(_T.precision, "fp32 or bf16 (autocast)."),
    device: str | None = _option(_T.device, "auto, cpu, cuda, cuda:1, ..."),
    seed: int | None = _option(_T.seed, "Seed of the weights, the data split and the noise."),
    out_dir: Path | None = _option(_T.out, "Runs folder.", "--out"),
    resume: bool = _flag(
        "--resume",
        "Continue the newest run of this category with its stored config (--epochs and a "
        "moved --root may change).",
    ),
    as_json: bool = _flag("--json", "Print one JSON object as the last line."),
) -> None:
    """Train on one category, then evaluate on its test split."""
    from vtadl.runs import train_and_evaluate

    cfg, run_dir = config_from_options(locals())
    with _progress() as progress:
        callbacks = _RichCallbacks(progress)
        run_dir, result = train_and_evaluate(
            cfg, run_dir=run_dir, callbacks=callbacks, progress=callbacks.evaluating
        )
    _print_metrics(result, run_dir, as_json)


@app.command()
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
        None, help="Refit the mixture after training: em (K Gaussians) or kernel (every token)."
    ),
    kernel_scope: str | None = typer.Option(
        None, help="Kernel: tokens of the whole image (image) or of each position (position)."
    ),
    as_json: bool = _flag("--json", "Print one JSON object as the last line."),
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

    with _progress() as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate_run(
            run_dir,
            eval_overrides=overrides,
            mixture_fit=mixture_fit,
            progress=lambda i, n: progress.update(task, completed=i, total=n),
        )
    _print_metrics(result, run_dir, as_json)


@app.command()
@handle_errors
def predict(
    run_dir: Path = typer.Argument(..., help="A run folder written by `vtadl train`."),
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for heat maps and scores.json."),
) -> None:
    """Score new images: heat maps and scores.json (threshold from validation images).

    Exit code 1 when some images could not be read; the others are scored all the same.
    """
    from vtadl.prediction import predict

    result = predict(run_dir, images, out_dir)
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


@data_app.command("demo")
@handle_errors
def data_demo(
    out_dir: Path = typer.Argument(..., help="Where to write the demo dataset."),
    seed: int = typer.Option(0),
) -> None:
    """Write a small MVTec-layout dataset from scikit-image's texture photographs."""
    from vtadl.data.demo import make_demo_dataset

    categories = make_demo_dataset(out_dir, seed=seed)
    out.print(f"demo dataset in {out_dir}: {', '.join(categories)}", highlight=False)


def _data_categories(dataset: str, root: Path, category: str | None, every: bool) -> list[str]:
    from vtadl.data import dataset_categories
    from vtadl.exceptions import ConfigError

    if (category is None) == (not every):
        raise ConfigError("give either --category C or --all-categories")
    return dataset_categories(dataset, root) if every else [category]


def _print_check(report) -> None:
    n = sum(report.counts.values())
    out.print(
        f"{report.dataset}/{report.category}: {n} images, "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings",
        highlight=False,
    )
    table = Table()
    table.add_column("split")
    table.add_column("defect type")
    table.add_column("images", justify="right")
    for (split, defect), count in sorted(report.counts.items()):
        table.add_row(split, defect, str(count))
    out.print(table)
    sizes = ", ".join(f"{h}x{w} ({k})" for (h, w), k in sorted(report.sizes.items()))
    if sizes:
        out.print(f"image sizes (height x width): {sizes}", highlight=False)
    for p in report.errors + report.warnings:
        colour = "red" if p.severity == "error" else "yellow"
        out.print(f"[{colour}]{p.severity}[/{colour}] {escape(p.message)}", highlight=False)


@data_app.command("check")
@handle_errors
def data_check(
    dataset: str = typer.Option("mvtec", help="mvtec, btad, mnist or folder."),
    root: Path = typer.Option(..., help="Folder of the categories (MNIST: of the IDX files)."),
    category: str | None = typer.Option(None, help="The category to check."),
    all_categories: bool = _flag("--all-categories", "Check every category."),
    strict: bool = _flag("--strict", "Exit non-zero on warnings too."),
) -> None:
    """Validate a dataset: counts per split and defect type, every problem with its file."""
    from vtadl.data.check import check_dataset

    failed = False
    for name in _data_categories(dataset, root, category, all_categories):
        report = check_dataset(dataset, root, name)
        _print_check(report)
        failed = failed or bool(report.errors or (strict and report.warnings))
    if failed:
        raise typer.Exit(1)


@data_app.command("pack")
@handle_errors
def data_pack(
    dataset: str = typer.Option("mvtec", help="mvtec, btad, mnist or folder."),
    root: Path = typer.Option(..., help="Folder of the categories (MNIST: of the IDX files)."),
    category: str | None = typer.Option(None, help="The category to pack."),
    all_categories: bool = _flag("--all-categories", "Pack every category."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the .h5 packs."),
    image_size: int | None = typer.Option(None, help="Model input size (default 512)."),
    tile: int | None = typer.Option(None, help="Also store native-resolution tiles this big."),
    tile_overlap: int = typer.Option(0, help="Pixels shared by neighbouring tiles."),
    compression: str = typer.Option("none", help="none (fastest reads), lzf or gzip."),
    workers: int = typer.Option(0, help="Decoding processes (0: in this process)."),
) -> None:
    """Pack categories into HDF5 files (one per category) for fast training reads."""
    from vtadl.config import ModelConfig
    from vtadl.data.pack import pack_category

    for name in _data_categories(dataset, root, category, all_categories):
        path = pack_category(
            dataset,
            root,
            name,
            out_dir,
            image_size=image_size or ModelConfig().img_size,
            tile=tile,
            tile_overlap=tile_overlap,
            compression=None if compression == "none" else compression,
            workers=workers,
        )
        size_mb = path.stat().st_size / 2**20
        out.print(f"{dataset}/{name}: {path} ({size_mb:.1f} MiB)", highlight=False)


@data_app.command("download")
@handle_errors
def data_download(
    dataset: str = typer.Argument(..., help="mvtec, btad or mnist."),
    root: Path = typer.Option(..., help="Folder to extract into (created if missing)."),
    url: str | None = typer.Option(None, help="Another location of the same files."),
    sha256: str | None = typer.Option(None, help="Expected SHA-256 of the archive at --url."),
) -> None:
    """Download a dataset, verify its SHA-256 and extract it; nothing is kept on a mismatch."""
    from vtadl.data.download import download

    download(dataset, root, url=url, sha256=sha256)
    out.print(f"{dataset}: verified and extracted into {root}", highlight=False)


# The other command modules register their commands on `app`.
from vtadl import cli_bench, cli_jobs, cli_tune  # noqa: E402,F401


def run() -> None:
    app(prog_name="vtadl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
