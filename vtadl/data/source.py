"""One category's images as training and evaluation need them: from its HDF5 pack or its files.

`category_source(config)` is the one entry point. By default (`data.pack: auto`) the category is
packed once into `data.pack_cache` (rebuilt when its source files or parameters change) and
everything is read from the pack; `data.pack: PATH` uses a given pack after checking that it
matches the run; `data.pack: none` decodes the files directly. Both sources split the normal
training images into train and validation the same way, and yield the same pixels.

With `data.tile`, the model sees native-resolution tiles instead of the resized image, and the
tile maps are stitched back into one map per image for the metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from vtadl.data import index_dataset
from vtadl.data.pack import ensure_pack, pack_is_current, pack_params
from vtadl.data.packed import (
    PackedImages,
    open_pack,
    pack_index,
    read_images,
    read_mask,
    read_tiles,
    split_rows,
)
from vtadl.data.prepare import ImageArray, split_samples
from vtadl.data.reader import read_sample_image, read_sample_mask, sample_image_size, sample_name
from vtadl.exceptions import ConfigError, DataError
from vtadl.inference.tiles import cut_tiles

if TYPE_CHECKING:
    from vtadl.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One evaluation image: what it is and its original (height, width)."""

    name: str
    label: int
    defect: str
    shape: tuple[int, int]


class FileSource:
    """Decodes the category's image files (and IDX records)."""

    def __init__(self, config: Config) -> None:
        d = config.data
        self.size, self.tile, self.overlap = config.model.img_size, d.tile, d.tile_overlap
        self.root = d.root
        samples = index_dataset(d.dataset, d.root, d.category)
        s = split_samples(samples, d.val_fraction, config.train.seed)
        self.samples = {"train": s.train, "val": s.val, "test": s.test}

    def dataset(self, split: str) -> Dataset:
        if self.tile:
            tiles = [self.model_input(split, i)[0] for i in range(len(self.samples[split]))]
            return ImageArray(np.concatenate(tiles))
        return ImageArray(np.stack([read_sample_image(s, self.size) for s in self.samples[split]]))

    def items(self, split: str) -> list[Item]:
        return [
            Item(sample_name(s, self.root), s.label, s.defect, sample_image_size(s))
            for s in self.samples[split]
        ]

    def model_input(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (k, S, S, 3) model inputs of one image, with tile corners (k, 2) or None."""
        s = self.samples[split][i]
        if self.tile:
            return cut_tiles(read_sample_image(s), self.tile, self.overlap)
        return read_sample_image(s, self.size)[None], None

    def mask(self, split: str, i: int) -> np.ndarray:
        s = self.samples[split][i]
        return read_sample_mask(s, sample_image_size(s))

    def display_image(self, split: str, i: int) -> np.ndarray:
        return read_sample_image(self.samples[split][i])


class PackSource:
    """Reads everything from one HDF5 pack."""

    def __init__(self, config: Config, path: Path) -> None:
        d = config.data
        self.path, self.tile = path, d.tile
        self.index = pack_index(path)
        self.rows = split_rows(self.index, d.val_fraction, config.train.seed)
        self.samples = self.index.samples(d.root)

    def dataset(self, split: str) -> Dataset:
        return PackedImages(self.path, self.rows[split], tiles=bool(self.tile))

    def items(self, split: str) -> list[Item]:
        ix = self.index
        return [
            Item(ix.names[r], int(ix.labels[r]), ix.defects[r], tuple(map(int, ix.shapes[r])))
            for r in self.rows[split]
        ]

    def model_input(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        row = self.rows[split][i]
        if self.tile:
            return read_tiles(self.path, row)
        return read_images(self.path, [row]), None

    def mask(self, split: str, i: int) -> np.ndarray:
        return read_mask(self.path, self.rows[split][i]).astype(bool)

    def display_image(self, split: str, i: int) -> np.ndarray:
        """The source file at full resolution (sharp); the pack's resized copy if it is gone."""
        row = self.rows[split][i]
        try:
            image = read_sample_image(self.samples[row])
        except DataError as exc:
            log.info("showing the packed copy: %s", exc)
            return read_images(self.path, [row])[0]
        if image.shape[:2] != tuple(self.index.shapes[row]):
            return read_images(self.path, [row])[0]
        return image


Source = FileSource | PackSource


def category_source(config: Config) -> Source:
    d = config.data
    if d.tile and d.tile != config.model.img_size:
        raise ConfigError(
            f"tile size {d.tile} must equal the model's image size {config.model.img_size}"
        )
    if d.pack == "none":
        return FileSource(config)
    expect = pack_params(
        d.dataset, d.category, config.model.img_size, d.tile or None, d.tile_overlap
    )
    if d.pack == "auto":
        cache = d.pack_cache or str(Path(config.train.out) / "packs")
        path = ensure_pack(
            d.dataset,
            d.root,
            d.category,
            cache,
            image_size=config.model.img_size,
            tile=d.tile or None,
            tile_overlap=d.tile_overlap,
        )
    else:
        path = Path(d.pack)
        open_pack(path, expect=expect).close()
        if Path(d.root).is_dir() and not pack_is_current(
            path,
            d.dataset,
            d.root,
            d.category,
            config.model.img_size,
            tile=d.tile or None,
            tile_overlap=d.tile_overlap,
        ):
            raise DataError(
                f"pack {path} does not match the files under {d.root} (changed since packing, "
                "or other parameters); pack again, or use --pack auto"
            )
    if d.local_copy:  # read this node's copy of a pack on a shared file system
        from vtadl.data.stage import local_copy

        path = local_copy(path, d.local_copy)
    return PackSource(config, path)
