"""The `vtadl data bench` command (registered on `vtadl.cli.data_app`)."""

from __future__ import annotations

from pathlib import Path

import typer

from vtadl.cli import data_app
from vtadl.console import handle_errors, out


@data_app.command("bench")
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
