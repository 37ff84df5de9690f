"""HDF5 packs: round trips, tiles, lazy Dataset with loader workers, staleness, corruption."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import vtadl
from vtadl.cli.main import app
from vtadl.data import index_btad, index_mnist, index_mvtec, load_image, load_mask
from vtadl.data.mnist import MNIST_FILES, write_idx
from vtadl.data.pack import (
    PackedImages,
    ensure_pack,
    open_pack,
    pack_category,
    pack_index,
    pack_is_current,
    pack_name,
    read_images,
    read_mask,
    read_tiles,
    split_rows,
    stitch_tiles,
)
from vtadl.data.prepare import ImageArray, load_arrays, split_samples
from vtadl.data.reader import read_sample_image
from vtadl.exceptions import DataError
from vtadl.inference.tiles import cut_tiles, tile_grid

CATEGORY = "brick"  # conftest's demo category: 12 train, 4 good + 8 defect test images, 32 px
SIZE = 24
N = 24  # rows of the demo pack

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_pack(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_category(
        "mvtec", demo_root, CATEGORY, tmp_path_factory.mktemp("packs"), image_size=SIZE
    )


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    return np.clip(big.astype(int) + rng.integers(-4, 5, big.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def btad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Product 01 of 1600x1600 images and product 03 of 800x600 ones."""
    root = tmp_path_factory.mktemp("btad")
    rng = np.random.default_rng(0)
    for product, (h, w) in (("01", (1600, 1600)), ("03", (600, 800))):
        p = root / product
        for folder, names in (("train/ok", ["0000", "0001"]), ("test/ok", ["0000"])):
            for name in names:
                (p / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(_smooth(rng, h, w)).save(p / folder / f"{name}.bmp")
        (p / "test" / "ko").mkdir(parents=True)
        (p / "ground_truth" / "ko").mkdir(parents=True)
        Image.fromarray(_smooth(rng, h, w)).save(p / "test" / "ko" / "0000.png")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 3 : h // 2, w // 5 : w // 4] = 255
        Image.fromarray(mask).save(p / "ground_truth" / "ko" / "0000.png")
    return root


# ---------------------------------------------------------------- round trip


def test_pack_round_trip(demo_root: Path, demo_pack: Path) -> None:
    samples = index_mvtec(demo_root, CATEGORY)
    assert demo_pack.name == pack_name("mvtec", CATEGORY, SIZE) == f"mvtec_{CATEGORY}_{SIZE}.h5"
    images = read_images(demo_pack, range(len(samples)))
    for row, s in enumerate(samples):
        np.testing.assert_array_equal(images[row], load_image(s.image, SIZE))
        mask = read_mask(demo_pack, row)
        expected = load_mask(s.mask) if s.mask else np.zeros((32, 32), dtype=bool)
        np.testing.assert_array_equal(mask, expected)
    assert any(read_mask(demo_pack, row).any() for row in range(len(samples)))
    index = pack_index(demo_pack)
    assert index.samples(demo_root) == samples
    assert index.shapes.tolist() == [[32, 32]] * len(samples)
    assert index.rows("train") == list(range(12))
    assert index.attrs["vtadl_version"] == vtadl.__version__
    assert index.attrs["image_size"] == SIZE and index.attrs["tile"] == 0
    assert index.attrs["compression"] == "none" and len(index.attrs["source_hash"]) == 64
    with open_pack(demo_pack) as f:
        assert f["images"].chunks == (1, SIZE, SIZE, 3) and f["images"].compression is None


def test_read_images_in_any_order(demo_pack: Path) -> None:
    everything = read_images(demo_pack, range(N))
    picked = read_images(demo_pack, [7, 2, 7, 0])
    np.testing.assert_array_equal(picked, everything[[7, 2, 7, 0]])
    assert read_images(demo_pack, []).shape == (0, SIZE, SIZE, 3)
    with pytest.raises(DataError, match="out of range"):
        read_images(demo_pack, [N])


def test_split_rows_equal_split_samples(demo_root: Path, demo_pack: Path) -> None:
    samples = index_mvtec(demo_root, CATEGORY)
    for seed in (0, 1, 7):
        expected = split_samples(samples, 0.25, seed)
        rows = split_rows(pack_index(demo_pack), 0.25, seed)
        for split in ("train", "val", "test"):
            assert [samples[r] for r in rows[split]] == getattr(expected, split)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_packed_images_with_loader_workers(demo_root: Path, demo_pack: Path, workers: int) -> None:
    rows = split_rows(pack_index(demo_pack), 0.25, 0)["train"]
    dataset = PackedImages(demo_pack, rows)
    assert dataset._file is None  # nothing opened by the constructor
    pickle.dumps(dataset)
    loader = DataLoader(dataset, batch_size=4, num_workers=workers)
    got = torch.cat(list(loader))
    samples = index_mvtec(demo_root, CATEGORY)
    reference = ImageArray(load_arrays([samples[r] for r in rows], SIZE))
    assert torch.equal(got, torch.stack([reference[i] for i in range(len(reference))]))
    assert got.dtype == torch.uint8  # converted to float on the device, by the loop
    assert dataset[0].shape == (3, SIZE, SIZE)
    assert dataset._file is not None
    clone = pickle.loads(pickle.dumps(dataset))  # an open handle is not pickled
    assert clone._file is None and torch.equal(clone[1], dataset[1])
    dataset.close()


def test_pack_with_workers_equals_in_process(demo_root: Path, demo_pack: Path, tmp_path: Path):
    path = pack_category("mvtec", demo_root, CATEGORY, tmp_path, image_size=SIZE, workers=2)
    np.testing.assert_array_equal(read_images(path, range(N)), read_images(demo_pack, range(N)))
    with h5py.File(path) as a, h5py.File(demo_pack) as b:
        assert sorted(a["masks"]) == sorted(b["masks"])


def test_pack_index_with_odd_file_names(demo_copy: Path, tmp_path: Path) -> None:
    image = index_mvtec(demo_copy, CATEGORY)[0].image
    image.rename(image.with_name("x#12.png"))
    path = pack_category("mvtec", demo_copy, CATEGORY, tmp_path, image_size=SIZE)
    assert pack_index(path).samples(demo_copy) == index_mvtec(demo_copy, CATEGORY)


# ---------------------------------------------------------------- high resolution, tiles


def test_pack_btad_tiles_and_stitching(btad_root: Path, tmp_path: Path) -> None:
    path = pack_category(
        "btad", btad_root, "01", tmp_path, image_size=64, tile=512, tile_overlap=64
    )
    assert path.name == "btad_01_64_t512o64.h5"
    samples = index_btad(btad_root, "01")
    assert pack_index(path).samples(btad_root) == samples
    for row, s in enumerate(samples):
        native = load_image(s.image)
        np.testing.assert_array_equal(read_images(path, [row])[0], load_image(s.image, 64))
        tiles, corners = read_tiles(path, row)
        assert tiles.shape == (16, 512, 512, 3)  # starts 0, 448, 896, 1088 on both axes
        assert sorted({int(y) for y, _ in corners}) == [0, 448, 896, 1088]
        for t, (y, x) in zip(tiles, corners):
            np.testing.assert_array_equal(t, native[y : y + 512, x : x + 512])
        stitched = stitch_tiles(tiles[..., 1].astype(np.float32), corners, native.shape[:2])
        np.testing.assert_array_equal(stitched, native[..., 1])
    ko = [i for i, s in enumerate(samples) if s.label == 1][0]
    mask = read_mask(path, ko)
    assert mask.shape == (1600, 1600)
    np.testing.assert_array_equal(mask, load_mask(samples[ko].mask))
    tiles = PackedImages(path, [0], tiles=True)
    assert len(tiles) == 16 and tiles[15].shape == (3, 512, 512)
    np.testing.assert_array_equal(tiles[15].permute(1, 2, 0).numpy(), read_tiles(path, 0)[0][15])
    assert len(PackedImages(path, [0, 3], tiles=True)) == 32


def test_pack_non_square_tiles(btad_root: Path, tmp_path: Path) -> None:
    path = pack_category(
        "btad", btad_root, "03", tmp_path, image_size=32, tile=256, tile_overlap=32
    )
    samples = index_btad(btad_root, "03")
    tiles, corners = read_tiles(path, 0)
    assert [tuple(c) for c in corners] == tile_grid(600, 800, 256, 32)
    np.testing.assert_array_equal(read_images(path, [0])[0], load_image(samples[0].image, 32))
    known = np.random.default_rng(3).random((600, 800)).astype(np.float32)
    cut, at = cut_tiles(known, 256, 32)
    np.testing.assert_array_equal(at, corners)
    np.testing.assert_allclose(stitch_tiles(cut, at, (600, 800)), known, rtol=1e-6)


def test_tile_grid_covers_every_pixel() -> None:
    for h, w, tile, overlap in [(1600, 1600, 512, 64), (600, 800, 256, 0), (300, 300, 300, 10)]:
        grid = tile_grid(h, w, tile, overlap)
        cover = np.zeros((h, w), dtype=int)
        for y, x in grid:
            assert 0 <= y <= h - tile and 0 <= x <= w - tile
            cover[y : y + tile, x : x + tile] += 1
        assert cover.min() >= 1
        ys = sorted({y for y, _ in grid})
        assert all(b - a <= tile - overlap for a, b in zip(ys, ys[1:]))
    with pytest.raises(DataError, match="smaller than the 512x512 tile"):
        tile_grid(300, 800, 512)
    with pytest.raises(DataError, match="overlap < tile"):
        tile_grid(1000, 1000, 128, 128)


def test_stitch_constant_and_overlap_average() -> None:
    corners = np.array(tile_grid(100, 150, 64, 20))
    constant = np.full((len(corners), 64, 64), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(stitch_tiles(constant, corners, (100, 150)), 0.25)
    # Two tiles over a 1x3 strip: the middle pixel is the average of both.
    two = np.array([[[1.0, 2.0]], [[4.0, 8.0]]])
    np.testing.assert_array_equal(
        stitch_tiles(two, np.array([[0, 0], [0, 1]]), (1, 3)), [[1, 3, 8]]
    )
    with pytest.raises(ValueError, match="uncovered"):
        stitch_tiles(two, np.array([[0, 0], [0, 0]]), (1, 3))
    with pytest.raises(ValueError, match="outside"):
        stitch_tiles(two, np.array([[0, 0], [0, 2]]), (1, 3))


def test_pack_refuses_a_tile_bigger_than_an_image(btad_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot tile .*0000.bmp: a 600x800 image is smaller"):
        pack_category("btad", btad_root, "03", tmp_path, image_size=32, tile=700)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- MNIST


def test_pack_mnist(tmp_path: Path) -> None:
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / f"{MNIST_FILES['train_images']}.gz", images[:300], compress=True)
    write_idx(root / MNIST_FILES["train_labels"], digits.target[:300])
    write_idx(root / MNIST_FILES["test_images"], images[300:400])
    write_idx(root / MNIST_FILES["test_labels"], digits.target[300:400])
    path = pack_category("mnist", root, "4", tmp_path / "packs", image_size=16)
    samples = index_mnist(root, "4")
    index = pack_index(path)
    assert index.samples(root) == samples
    assert index.names[0] == f"{MNIST_FILES['train_images']}.gz#{samples[0].index}"
    stored = read_images(path, range(len(samples)))
    for row in (0, len(samples) - 1):
        np.testing.assert_array_equal(stored[row], read_sample_image(samples[row], 16))
    assert read_mask(path, len(samples) - 1).shape == (8, 8)
    assert pack_is_current(path, "mnist", root, "4", 16)


# ---------------------------------------------------------------- staleness and parameters


@pytest.fixture
def packed_copy(demo_copy: Path, tmp_path: Path) -> tuple[Path, Path]:
    return demo_copy, pack_category(
        "mvtec", demo_copy, CATEGORY, tmp_path / "cache", image_size=SIZE
    )


def _is_current(path: Path, root: Path, size: int = SIZE) -> bool:
    return pack_is_current(path, "mvtec", root, CATEGORY, size)


def test_stale_after_touch_edit_add_or_remove(packed_copy: tuple[Path, Path]) -> None:
    root, path = packed_copy
    assert _is_current(path, root)
    image = index_mvtec(root, CATEGORY)[3].image
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not _is_current(path, root)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _is_current(path, root)

    mask = next(s.mask for s in index_mvtec(root, CATEGORY) if s.mask)
    mask.write_bytes(mask.read_bytes() + b"\0")
    assert not _is_current(path, root)
    path = ensure_pack("mvtec", root, CATEGORY, path.parent, image_size=SIZE)
    assert _is_current(path, root)

    shutil.copy(image, image.with_name("extra.png"))
    assert not _is_current(path, root)
    path = ensure_pack("mvtec", root, CATEGORY, path.parent, image_size=SIZE)
    assert len(pack_index(path)) == N + 1
    image.unlink()
    assert not _is_current(path, root)


def test_ensure_pack_reuses_a_current_pack(packed_copy: tuple[Path, Path]) -> None:
    root, path = packed_copy
    before = path.stat().st_mtime_ns
    assert ensure_pack("mvtec", root, CATEGORY, path.parent, image_size=SIZE) == path
    assert path.stat().st_mtime_ns == before


def test_parameter_mismatch(packed_copy: tuple[Path, Path]) -> None:
    root, path = packed_copy
    with pytest.raises(DataError, match=r"was built with image_size=24 \(expected 64\)"):
        open_pack(path, expect={"image_size": 64})
    with pytest.raises(DataError, match=r"category='brick' \(expected 'grass'\)"):
        open_pack(path, expect={"category": "grass", "image_size": SIZE})
    open_pack(path, expect={"dataset": "mvtec", "category": CATEGORY, "image_size": SIZE}).close()
    assert not _is_current(path, root, size=64)
    assert not pack_is_current(path, "mvtec", root, CATEGORY, SIZE, tile=16)
    other = ensure_pack("mvtec", root, CATEGORY, path.parent, image_size=16)
    assert other != path and read_images(other, [0]).shape == (1, 16, 16, 3)


# ---------------------------------------------------------------- broken packs


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_truncated_and_garbage_packs(demo_pack: Path, tmp_path: Path) -> None:
    data = demo_pack.read_bytes()
    for name, content in (("cut.h5", data[: len(data) // 2]), ("junk.h5", b"\x89HDF junk" * 99)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match="truncated or not an HDF5 file") as excinfo:
            open_pack(path)
        assert str(path) in _one_line(excinfo)
        with pytest.raises(DataError, match="truncated or not an HDF5"):
            PackedImages(path)
        with pytest.raises(DataError, match="truncated or not an HDF5"):
            read_images(path, [0])
    with pytest.raises(DataError, match="does not exist"):
        open_pack(tmp_path / "missing.h5")


def test_foreign_and_unfinished_hdf5(demo_pack: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["images"] = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="not a vtadl pack"):
        open_pack(foreign)
    unfinished = tmp_path / "unfinished.h5"
    shutil.copy(demo_pack, unfinished)
    with h5py.File(unfinished, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(DataError, match="incomplete"):
        open_pack(unfinished)


def test_ensure_pack_replaces_a_corrupt_pack(demo_copy: Path, tmp_path: Path) -> None:
    path = tmp_path / pack_name("mvtec", CATEGORY, SIZE)
    path.write_bytes(b"garbage")
    assert not _is_current(path, demo_copy)
    assert ensure_pack("mvtec", demo_copy, CATEGORY, tmp_path, image_size=SIZE) == path
    assert _is_current(path, demo_copy)


def test_bad_source_leaves_no_pack(demo_copy: Path, tmp_path: Path) -> None:
    mask = next(s.mask for s in index_mvtec(demo_copy, CATEGORY) if s.mask)
    Image.new("L", (10, 10)).save(mask)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"is 10x10 but its image is 32x32"):
        pack_category("mvtec", demo_copy, CATEGORY, out, image_size=SIZE)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- CLI


def test_cli_pack(demo_root: Path, tmp_path: Path) -> None:
    args = ["data", "pack", "--root", str(demo_root), "--out", str(tmp_path), "--image-size", "16"]
    result = runner.invoke(app, [*args, "--category", CATEGORY])
    assert result.exit_code == 0, result.output
    path = tmp_path / pack_name("mvtec", CATEGORY, 16)
    assert path.is_file() and str(path) in result.stdout.replace("\n", "")
    assert pack_is_current(path, "mvtec", demo_root, CATEGORY, 16)
    again = runner.invoke(app, [*args, "--all-categories", "--compression", "lzf"])
    assert again.exit_code == 0, again.output
    with open_pack(path) as f:
        assert f["images"].compression == "lzf"
    bad = runner.invoke(app, [*args, "--category", CATEGORY, "--compression", "zip"])
    assert bad.exit_code == 2 and "unknown compression 'zip'" in bad.stderr
