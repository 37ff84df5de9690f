"""BTAD (beanTech Anomaly Detection): the folder layout with BTAD's names.

    <root>/<product>/train/ok/*.bmp|png
    <root>/<product>/test/ok/*
    <root>/<product>/test/ko/*
    <root>/<product>/ground_truth/ko/<image stem>.*

Products `01` (1600x1600), `02` (600x600) and `03` (800x600). Masks share their image's
stem (no suffix) and may have another extension than the image. Normal samples get the
defect type "good" and defective ones "ko", as in the tree.
"""

from __future__ import annotations

from pathlib import Path

from vtadl.data.folder import FolderLayout, index_folder, list_folder_categories
from vtadl.data.samples import Sample

BTAD_PRODUCTS: tuple[str, ...] = ("01", "02", "03")
BTAD_LAYOUT = FolderLayout(good="ok", mask_suffix="")


def list_btad_products(root: str | Path) -> list[str]:
    return list_folder_categories(root, BTAD_LAYOUT)


def index_btad(root: str | Path, category: str) -> list[Sample]:
    """Train samples sorted by file name, then test samples of `ko/` and `ok/`."""
    return index_folder(root, category, BTAD_LAYOUT, name="btad")
