"""Dataset readers: one indexer per dataset layout, all returning `Sample` records.

Packing (`vtadl.data.pack`), checking (`vtadl.data.check`) and downloading
(`vtadl.data.download`) are imported from their modules; they are not loaded here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vtadl.data.btad import BTAD_PRODUCTS, index_btad, list_btad_products
from vtadl.data.demo import DEFECT_TYPES, DEMO_CATEGORIES, make_demo_dataset
from vtadl.data.folder import FolderLayout, index_folder, list_folder_categories
from vtadl.data.images import image_size, load_image, load_mask
from vtadl.data.mnist import MNIST_DIGITS, find_mnist_files, index_mnist
from vtadl.data.mvtec import MVTEC_CATEGORIES, index_mvtec, list_categories
from vtadl.data.reader import read_sample_image, read_sample_mask, sample_image_size
from vtadl.data.samples import IMAGE_EXTENSIONS, NORMAL, Sample, list_image_files
from vtadl.exceptions import DataError

__all__ = [
    "BTAD_PRODUCTS",
    "DEFECT_TYPES",
    "DEMO_CATEGORIES",
    "IMAGE_EXTENSIONS",
    "INDEXERS",
    "Indexer",
    "FolderLayout",
    "MNIST_DIGITS",
    "MVTEC_CATEGORIES",
    "NORMAL",
    "Sample",
    "dataset_categories",
    "image_size",
    "index_btad",
    "index_dataset",
    "index_folder",
    "index_mnist",
    "index_mvtec",
    "list_categories",
    "list_image_files",
    "load_image",
    "load_mask",
    "make_demo_dataset",
    "read_sample_image",
    "read_sample_mask",
    "sample_image_size",
]

Indexer = Callable[[str | Path, str], list[Sample]]

# Dataset name -> indexer(root, category). New layouts register here. "folder" reads its
# folder names from <root>/vtadl-layout.json when there is one.
INDEXERS: dict[str, Indexer] = {
    "mvtec": index_mvtec,
    "btad": index_btad,
    "mnist": index_mnist,
    "folder": index_folder,
}


def _known(dataset: str) -> None:
    if dataset not in INDEXERS:
        raise DataError(f"unknown dataset {dataset!r} (known: {', '.join(sorted(INDEXERS))})")


def index_dataset(dataset: str, root: str | Path, category: str) -> list[Sample]:
    """Index `category` under `root` with the indexer registered for `dataset`."""
    _known(dataset)
    return INDEXERS[dataset](root, category)


def dataset_categories(dataset: str, root: str | Path) -> list[str]:
    """The categories present under `root` (for MNIST: the ten digits, once the files exist)."""
    _known(dataset)
    if dataset == "mnist":
        find_mnist_files(root)
        return list(MNIST_DIGITS)
    if dataset == "btad":
        return list_btad_products(root)
    if dataset == "mvtec":
        return list_categories(root)
    return list_folder_categories(root)
