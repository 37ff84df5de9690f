from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtadl.data import (
    DEFECT_TYPES,
    DEMO_CATEGORIES,
    INDEXERS,
    image_size,
    index_dataset,
    index_mvtec,
    list_categories,
    load_image,
    load_mask,
    make_demo_dataset,
)
from vtadl.data import demo as demo_module
from vtadl.exceptions import DataError


def _png(
    path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", value: int | tuple = 128
) -> Path:
    """size is (width, height), as PIL takes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# Defect images named so that listing order of images and of masks disagree:
# "1" < "10" < "2" but "10_mask" < "1_mask" < "2_mask".
CRACK_STEMS = ["1", "10", "2"]


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    cat = root / "bottle"
    files: list[tuple[Path, int]] = []
    for stem in ["003", "000", "002", "001"]:
        files.append((cat / "train" / "good" / f"{stem}.png", 0))
    files.append((cat / "train" / "good" / "004.PNG", 0))
    files.append((cat / "test" / "good" / "001.jpg", 0))
    files.append((cat / "test" / "good" / "000.png", 0))
    for stem in CRACK_STEMS:
        files.append((cat / "test" / "crack" / f"{stem}.png", 0))
        # Each mask is marked with its image's number so the pairing can be checked by content.
        files.append((cat / "ground_truth" / "crack" / f"{stem}_mask.png", int(stem)))
    files.append((cat / "test" / "broken_large" / "000.png", 0))
    files.append((cat / "ground_truth" / "broken_large" / "000_mask.png", 255))
    random.Random(3).shuffle(files)
    for path, value in files:
        if "ground_truth" in path.parts:
            _png(path, mode="L", value=value)
        else:
            _png(path)
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "train" / "good" / "._000.png").write_bytes(b"macOS resource fork")
    _png(root / "cable" / "train" / "good" / "000.png")
    (root / "not_a_category").mkdir()
    return root


def test_list_categories(mvtec_root: Path) -> None:
    assert list_categories(mvtec_root) == ["bottle", "cable"]


def test_index_counts_labels_and_order(mvtec_root: Path) -> None:
    samples = index_mvtec(mvtec_root, "bottle")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert [s.image.name for s in train] == ["000.png", "001.png", "002.png", "003.png", "004.PNG"]
    assert all(s.label == 0 and s.defect == "good" and s.mask is None for s in train)
    assert [(s.defect, s.image.name) for s in test] == [
        ("broken_large", "000.png"),
        ("crack", "1.png"),
        ("crack", "10.png"),
        ("crack", "2.png"),
        ("good", "000.png"),
        ("good", "001.jpg"),
    ]
    assert [s.label for s in test] == [1, 1, 1, 1, 0, 0]
    assert all(s.mask is None for s in test if s.label == 0)
    assert samples == index_dataset("mvtec", mvtec_root, "bottle")


def test_masks_paired_by_name(mvtec_root: Path) -> None:
    crack = [s for s in index_mvtec(mvtec_root, "bottle") if s.defect == "crack"]
    assert len(crack) == 3
    for s in crack:
        assert s.mask is not None
        assert s.mask.name == f"{s.image.stem}_mask.png"
        assert s.mask.parent == mvtec_root / "bottle" / "ground_truth" / "crack"
        assert int(np.asarray(Image.open(s.mask)).max()) == int(s.image.stem)


def test_mask_without_image_is_ignored_with_warning(
    mvtec_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _png(mvtec_root / "bottle" / "ground_truth" / "crack" / "7_mask.png", mode="L", value=255)
    with caplog.at_level(logging.WARNING, logger="vtadl.data.mvtec"):
        samples = index_mvtec(mvtec_root, "bottle")
    assert sum(s.defect == "crack" for s in samples) == 3
    assert "7_mask.png" in caplog.text


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as excinfo:
        index_mvtec(tmp_path / "nope", "bottle")
    assert str(tmp_path / "nope") in _one_line_error(excinfo)
    with pytest.raises(DataError, match="does not exist"):
        list_categories(tmp_path / "nope")


def test_unknown_category_lists_available(mvtec_root: Path) -> None:
    with pytest.raises(DataError, match="'screw' not found") as excinfo:
        index_mvtec(mvtec_root, "screw")
    assert "available: bottle, cable" in _one_line_error(excinfo)


def test_empty_training_folder(mvtec_root: Path) -> None:
    (mvtec_root / "empty" / "train" / "good").mkdir(parents=True)
    (mvtec_root / "empty" / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="has no images") as excinfo:
        index_mvtec(mvtec_root, "empty")
    assert str(mvtec_root / "empty" / "train" / "good") in _one_line_error(excinfo)


def test_missing_training_folder(mvtec_root: Path) -> None:
    (mvtec_root / "odd" / "train" / "other").mkdir(parents=True)
    with pytest.raises(DataError, match="train/good does not exist"):
        index_mvtec(mvtec_root, "odd")


def test_missing_or_empty_test_folder(mvtec_root: Path) -> None:
    with pytest.raises(DataError, match="test folder .* does not exist"):
        index_mvtec(mvtec_root, "cable")
    (mvtec_root / "cable" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        index_mvtec(mvtec_root, "cable")


def test_defect_image_without_mask(mvtec_root: Path) -> None:
    image = _png(mvtec_root / "bottle" / "test" / "crack" / "5.png")
    with pytest.raises(DataError, match="has no mask") as excinfo:
        index_mvtec(mvtec_root, "bottle")
    message = _one_line_error(excinfo)
    assert str(image) in message
    assert str(mvtec_root / "bottle" / "ground_truth" / "crack" / "5_mask.png") in message


def test_unknown_dataset(mvtec_root: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'imagenet'") as excinfo:
        index_dataset("imagenet", mvtec_root, "bottle")
    assert "mvtec" in _one_line_error(excinfo)
    assert set(INDEXERS) >= {"mvtec"}


# ---------------------------------------------------------------- images and masks


def test_load_image_grey_to_rgb(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_load_image_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_load_image_16_bit_and_palette(tmp_path: Path) -> None:
    deep = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png")[..., 0], [[0, 255], [100, 200]])
    Image.new("RGB", (4, 4), (10, 200, 30)).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (4, 4, 3)


def test_load_image_resize(tmp_path: Path) -> None:
    _png(tmp_path / "x.jpg", size=(40, 30), value=(200, 100, 50))
    square = load_image(tmp_path / "x.jpg", 16)
    assert square.shape == (16, 16, 3) and square.dtype == np.uint8
    assert load_image(tmp_path / "x.jpg", (10, 20)).shape == (10, 20, 3)
    assert np.abs(square.astype(int) - [200, 100, 50]).max() <= 3
    assert image_size(tmp_path / "x.jpg") == (30, 40)


def test_load_image_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a picture" * 10)
    with pytest.raises(DataError, match="cannot read image") as excinfo:
        load_image(path)
    assert str(path) in _one_line_error(excinfo)
    with pytest.raises(DataError, match="cannot read image"):
        image_size(path)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_load_image_truncated_png(tmp_path: Path, keep: float) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError) as excinfo:
        load_image(path)
    assert str(path) in _one_line_error(excinfo)


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="is not a file"):
        load_image(tmp_path)


def test_load_mask(tmp_path: Path) -> None:
    for high in (255, 1):  # a binary mask counts every nonzero pixel, 0/255 and 0/1 alike
        values = np.array([[0, high, 0], [0, high, 0]], dtype=np.uint8)
        Image.fromarray(values).save(tmp_path / "m.png")
        mask = load_mask(tmp_path / "m.png", shape=(2, 3))
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, values != 0)
    colour = np.zeros((2, 3, 3), dtype=np.uint8)
    colour[1, 2, 0] = 255
    Image.fromarray(colour).save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "c.png"), colour[..., 0] != 0)


def test_load_mask_wrong_size(tmp_path: Path) -> None:
    path = _png(tmp_path / "m.png", size=(8, 6), mode="L", value=255)
    with pytest.raises(DataError) as excinfo:
        load_mask(path, shape=(10, 12))
    assert _one_line_error(excinfo) == f"mask {path} is 6x8 but its image is 10x12"


# ---------------------------------------------------------------- demo dataset

SMALL = {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 3}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert make_demo_dataset(root, **SMALL) == list(DEMO_CATEGORIES)
    return root


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_demo_indexes_as_mvtec(demo_root: Path) -> None:
    assert list_categories(demo_root) == sorted(DEMO_CATEGORIES)
    for category in DEMO_CATEGORIES:
        samples = index_mvtec(demo_root, category)
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        assert len(train) == SMALL["n_train"]
        assert len(test) == SMALL["n_test_good"] + len(DEFECT_TYPES) * SMALL["n_test_defect"]
        assert {s.defect for s in test} == {"good", *DEFECT_TYPES}
        assert sum(s.label for s in test) == len(DEFECT_TYPES) * SMALL["n_test_defect"]


def test_demo_images_and_masks(demo_root: Path) -> None:
    size = SMALL["image_size"]
    for category in DEMO_CATEGORIES:
        for s in index_mvtec(demo_root, category):
            with Image.open(s.image) as img:
                assert img.mode == "RGB" and img.size == (size, size)
            if s.mask is None:
                continue
            with Image.open(s.mask) as m:
                assert m.mode == "L" and m.size == (size, size)
                raw = np.asarray(m)
            assert set(np.unique(raw).tolist()) == {0, 255}, s.mask
            area = (raw > 0).mean()
            assert demo_module.MIN_DEFECT_AREA <= area <= demo_module.MAX_DEFECT_AREA, (
                s.mask,
                area,
            )


def test_demo_categories_differ_in_colour(demo_root: Path) -> None:
    means = [
        load_image(index_mvtec(demo_root, c)[0].image).reshape(-1, 3).mean(axis=0)
        for c in DEMO_CATEGORIES
    ]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 10


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_changes_only_the_mask(defect: str) -> None:
    rng = np.random.default_rng(5)
    photo = demo_module._photo("grass")
    for _ in range(10):
        clean = demo_module._tint(demo_module._crop(photo, rng, 64, "test"), "grass")
        image, mask = demo_module._add_defect(clean, defect, rng, "grass")
        assert image.dtype == np.uint8 and image.shape == clean.shape
        np.testing.assert_array_equal(image[~mask], clean[~mask])
        change = np.abs(image.astype(int) - clean.astype(int))[mask].mean()
        assert change >= demo_module.MIN_DEFECT_CONTRAST
        assert demo_module.MIN_DEFECT_AREA <= mask.mean() <= demo_module.MAX_DEFECT_AREA


def test_demo_train_and_test_crops_disjoint() -> None:
    # A photo whose grey level is half its column index: a crop's values tell its columns.
    photo = np.broadcast_to((np.arange(512) // 2).astype(np.uint8), (512, 512))
    split = round(512 * 0.7)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert int(demo_module._crop(photo, rng, 32, "train").max()) * 2 < split
        assert int(demo_module._crop(photo, rng, 32, "test").min()) * 2 >= split


def test_demo_is_deterministic(tmp_path: Path, demo_root: Path) -> None:
    make_demo_dataset(tmp_path / "same", **SMALL)
    assert _all_files(tmp_path / "same") == _all_files(demo_root)
    make_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    assert _all_files(tmp_path / "other") != _all_files(demo_root)
    make_demo_dataset(tmp_path / "one", ["grass"], **SMALL)
    assert _all_files(tmp_path / "one" / "grass") == _all_files(demo_root / "grass")


def test_demo_overwrites_itself_but_nothing_else(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, ["brick"], image_size=32, n_train=5, n_test_good=3, n_test_defect=2)
    make_demo_dataset(tmp_path, ["brick"], image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    samples = index_mvtec(tmp_path, "brick")
    assert len(samples) == 2 + 1 + len(DEFECT_TYPES)
    _png(tmp_path / "grass" / "mine.png")
    with pytest.raises(DataError, match="refusing to overwrite"):
        make_demo_dataset(tmp_path, ["grass"], **SMALL)
    assert (tmp_path / "grass" / "mine.png").is_file()


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown demo categories carpet"):
        make_demo_dataset(tmp_path, ["carpet"])
    with pytest.raises(DataError, match="image_size"):
        make_demo_dataset(tmp_path, image_size=8)
    with pytest.raises(DataError, match="n_train"):
        make_demo_dataset(tmp_path, n_train=0)
