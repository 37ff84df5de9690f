"""`vtadl data`: write the demo dataset or the benchmark, check, pack and download."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from vtadl.cli.console import handle_errors, out
from vtadl.cli.options import flag


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


@handle_errors
def data_check(
    dataset: str = typer.Option("mvtec", help="mvtec, btad, mnist or folder."),
    root: Path = typer.Option(..., help="Folder of the categories (MNIST: of the IDX files)."),
    category: str | None = typer.Option(None, help="The category to check."),
    all_categories: bool = flag("--all-categories", "Check every category."),
    strict: bool = flag("--strict", "Exit non-zero on warnings too."),
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


@handle_errors
def data_pack(
    dataset: str = typer.Option("mvtec", help="mvtec, btad, mnist or folder."),
    root: Path = typer.Option(..., help="Folder of the categories (MNIST: of the IDX files)."),
    category: str | None = typer.Option(None, help="The category to pack."),
    all_categories: bool = flag("--all-categories", "Pack every category."),
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


@handle_errors
def data_bench(
    out_dir: Path = typer.Argument(..., help="Where to write the benchmark."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    image_size: int = typer.Option(128, help="Side of the photo benchmark's images."),
) -> None:
    """Write the benchmark: real photographs with subtle defects, and handwritten digits.

    OUT/photos is in the MVTec layout (--dataset mvtec), OUT/digits holds MNIST IDX files
    (--dataset mnist). The same seed writes the same files.
    """
    from vtadl.data.bench import make_digits_benchmark, make_photo_benchmark

    categories = make_photo_benchmark(out_dir / "photos", seed=seed, image_size=image_size)
    counts = make_digits_benchmark(out_dir / "digits", seed=seed)
    out.print(
        f"photo benchmark in {out_dir / 'photos'}: {', '.join(categories)} (--dataset mvtec)\n"
        f"digits benchmark in {out_dir / 'digits'}: {counts['train']} train, "
        f"{counts['test']} test images (--dataset mnist, categories 0-9)",
        highlight=False,
    )
