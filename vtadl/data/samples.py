"""The records dataset indexers return, and the image-file listing they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# The defect type of every normal sample, whatever the layout calls its normal folder.
NORMAL = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    `index` is None for an image file; for a sample stored inside a container file (MNIST
    IDX), `image` is that file and `index` the record number in it. Read either kind with
    `vtadl.data.reader.read_sample_image`.
    """

    image: Path
    split: str
    label: int
    defect: str
    mask: Path | None
    index: int | None = None


@dataclass(frozen=True)
class Problem:
    """Something wrong with a dataset tree; "error" stops indexing, "warning" does not."""

    severity: str
    path: Path
    message: str


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension (any case) is in IMAGE_EXTENSIONS."""
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; [] when the folder is missing.

    Hidden files (macOS `._*` forks, `.DS_Store`) and other extensions are skipped.
    """
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)
