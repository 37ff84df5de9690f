"""Loader throughput: images per second from an HDF5 pack vs decoding the original files.

Synthesises a BTAD-like product of high-resolution PNGs in a temporary folder, packs it
(resized images, then native-resolution tiles), and times a DataLoader over each source with
0, 1 and 2 workers: a warm-up epoch, then a timed one (persistent workers, files in the page
cache, so this measures decoding and copying, not the disk). Then, per compression codec:
pack time, size and random single-image reads per second (chunk cache off), for these
images, their tiles and the 128 px demo dataset.

    python benchmarks/loader_throughput.py --n-images 24 --size 1600 --image-size 512
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vtadl.data import index_dataset, make_demo_dataset
from vtadl.data.pack import GZIP_LEVEL, PackedImages, pack_category
from vtadl.data.reader import read_sample_image
from vtadl.data.samples import Sample
from vtadl.inference.tiles import cut_tiles


class FolderImages(Dataset):
    """Decode and resize an original file per item, as training does without a pack."""

    def __init__(self, samples: list[Sample], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        array = read_sample_image(self.samples[i], self.size)
        return torch.from_numpy(array).permute(2, 0, 1)


class FolderTiles(FolderImages):
    """Decode an original file and cut all its tiles: (k, 3, T, T) per item."""

    def __init__(self, samples: list[Sample], tile: int, overlap: int) -> None:
        super().__init__(samples, 0)
        self.tile, self.overlap = tile, overlap

    def __getitem__(self, i: int) -> torch.Tensor:
        tiles = cut_tiles(read_sample_image(self.samples[i]), self.tile, self.overlap)[0]
        return torch.from_numpy(tiles).permute(0, 3, 1, 2)


def write_product(root: Path, n: int, size: int, seed: int = 0) -> None:
    """`n` training PNGs and 2 test PNGs of smooth structure plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    for i in range(n + 2):
        folder = root / "01" / ("train/ok" if i < n else "test/ok")
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(40, 216, (12, 12, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        noisy = smooth.astype(np.int16) + rng.normal(0, 3, smooth.shape).astype(np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def items_per_second(dataset: Dataset, workers: int, batch_size: int) -> float:
    """Items per second over one epoch after a warm-up epoch; a (k, ...) item counts k."""
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:
        pass
    tic, n = time.perf_counter(), 0
    for batch in loader:
        n += batch.shape[0] * (batch.shape[1] if batch.ndim == 5 else 1)
    return n / (time.perf_counter() - tic)


def random_reads(path: Path, key: str = "images", n: int = 200) -> float:
    """Single-item reads in random order, chunk cache off (as over a dataset larger than it)."""
    with h5py.File(path, "r", rdcc_nbytes=0) as f:
        data = f[key]
        order = np.random.default_rng(0).integers(0, len(data), n)
        tic = time.perf_counter()
        for i in order.tolist():
            data[i]
        return n / (time.perf_counter() - tic)


def compression_rows(
    label: str, dataset: str, root: Path, category: str, size: int, out: Path, tile: int = 0
) -> list[str]:
    key = "tiles" if tile else "images"
    rows = []
    for codec in (None, "lzf", "gzip"):
        tic = time.perf_counter()
        path = pack_category(
            dataset,
            root,
            category,
            out / (codec or "none"),
            image_size=size,
            tile=tile or None,
            compression=codec,
        )
        seconds = time.perf_counter() - tic
        with h5py.File(path, "r") as f:
            ratio = f[key].id.get_storage_size() / f[key].size
        name = f"gzip-{GZIP_LEVEL}" if codec == "gzip" else codec or "none"
        rows.append(
            f"| {label} | {name} | {seconds:.1f} | {ratio:.3f} | {random_reads(path, key):.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=24)
    parser.add_argument("--size", type=int, default=1600, help="side of the synthetic PNGs")
    parser.add_argument("--image-size", type=int, default=512, help="model input size")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tile-overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="vtadl-loader-"))
    try:
        root = work / "btad"
        write_product(root, args.n_images, args.size)
        samples = [s for s in index_dataset("btad", root, "01") if s.split == "train"]
        source = folder_bytes(root)

        tic = time.perf_counter()
        packed = pack_category("btad", root, "01", work / "packs", image_size=args.image_size)
        pack_s = time.perf_counter() - tic
        tic = time.perf_counter()
        tiled = pack_category(
            "btad",
            root,
            "01",
            work / "tiles",
            image_size=args.image_size,
            tile=args.tile,
            tile_overlap=args.tile_overlap,
        )
        tiled_s = time.perf_counter() - tic
        n_all = args.n_images + 2
        print(f"{n_all} PNGs of {args.size}x{args.size}: source folder {source / 2**20:.1f} MiB")
        print(
            f"pack at {args.image_size} px: {pack_s:.1f} s, {packed.stat().st_size / 2**20:.1f} MiB"
        )
        print(
            f"pack at {args.image_size} px + {args.tile} px tiles (overlap {args.tile_overlap}): "
            f"{tiled_s:.1f} s, {tiled.stat().st_size / 2**20:.1f} MiB"
        )

        train_rows = list(range(len(samples)))
        header = f"images/s ({args.image_size} px) | tiles/s ({args.tile} px)"
        print(f"\n| source | workers | {header} |")
        print("|---|---|---|---|")
        for workers in (0, 1, 2):
            folder_img = items_per_second(
                FolderImages(samples, args.image_size), workers, args.batch_size
            )
            folder_tiles = items_per_second(
                FolderTiles(samples, args.tile, args.tile_overlap), workers, 1
            )
            pack_img = items_per_second(PackedImages(packed, train_rows), workers, args.batch_size)
            pack_tiles = items_per_second(
                PackedImages(tiled, train_rows, tiles=True), workers, args.batch_size
            )
            print(f"| original PNGs | {workers} | {folder_img:.1f} | {folder_tiles:.1f} |")
            print(f"| HDF5 pack | {workers} | {pack_img:.0f} | {pack_tiles:.0f} |")

        demo = work / "demo"
        make_demo_dataset(demo, ["brick"], image_size=128, n_train=60)
        print("\n| images | codec | pack s | size ratio | random reads/s |")
        print("|---|---|---|---|---|")
        big = f"{args.size} px -> {args.image_size}"
        for row in compression_rows(big, "btad", root, "01", args.image_size, work / "codecs"):
            print(row)
        tiles = f"{args.size} px, {args.tile} px tiles"
        for row in compression_rows(
            tiles, "btad", root, "01", args.image_size, work / "codec-tiles", tile=args.tile
        ):
            print(row)
        for row in compression_rows("demo 128 px", "mvtec", demo, "brick", 128, work / "demo-c"):
            print(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
