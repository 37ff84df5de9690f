"""MVTec AD: the folder layout with its original names, and its 15 categories.

<root>/<category>/train/good/*.png
<root>/<category>/test/good/*.png
<root>/<category>/test/<defect>/*.png
<root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

from pathlib import Path

from vtadl.data.folder import FolderLayout, index_folder, list_folder_categories
from vtadl.data.samples import Sample

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
MVTEC_LAYOUT = FolderLayout()


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the folders under `root` that contain a `train/` folder."""
    return list_folder_categories(root, MVTEC_LAYOUT)


def index_mvtec(root: str | Path, category: str) -> list[Sample]:
    """Train samples sorted by file name, then test samples grouped by sorted folder name."""
    return index_folder(root, category, MVTEC_LAYOUT, name="mvtec")
