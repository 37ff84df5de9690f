"""BTAD, MNIST and folder indexers, the dataset check and `vtadl data check`."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.data import (
    INDEXERS,
    FolderLayout,
    dataset_categories,
    image_size,
    index_btad,
    index_dataset,
    index_mnist,
    index_mvtec,
    load_image,
    read_sample_image,
    sample_image_size,
)
from vtadl.data.check import check_dataset
from vtadl.data.folder import LAYOUT_FILE
from vtadl.data.mnist import MNIST_FILES, read_idx, write_idx
from vtadl.exceptions import DataError

runner = CliRunner()


def _image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> Path:
    """A smooth random image; size is (width, height), as PIL takes it."""
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "L": 1}[mode]
    small = rng.integers(0, 256, (4, 4, bands), dtype=np.uint8).squeeze()
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (40, 30), value: int = 255) -> Path:
    mask = np.zeros(size[::-1], dtype=np.uint8)
    mask[: size[1] // 2, : size[0] // 3] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def _problems(report, severity: str) -> list[str]:
    return [p.message for p in report.problems if p.severity == severity]


# ---------------------------------------------------------------- BTAD


@pytest.fixture
def btad_root(tmp_path: Path) -> Path:
    root = tmp_path / "BTech"
    p = root / "01"
    _image(p / "train" / "ok" / "0000.bmp", (1600, 1600), seed=1)
    _image(p / "train" / "ok" / "0001.png", seed=2)
    _image(p / "train" / "ok" / "0002.bmp", seed=3)
    _image(p / "test" / "ok" / "0000.bmp", seed=4)
    # Names chosen so that image and mask listing orders differ; each mask's value is its
    # image's number, so the pairing can be checked by content.
    for stem, value in [("3", 3), ("10", 10), ("2", 2)]:
        _image(p / "test" / "ko" / f"{stem}.bmp", seed=value)
        _mask(p / "ground_truth" / "ko" / f"{stem}.png", value=value)
    q = root / "03"
    _image(q / "train" / "ok" / "0000.bmp", (800, 600))
    _image(q / "test" / "ko" / "0000.bmp", (800, 600))
    _mask(q / "ground_truth" / "ko" / "0000.bmp", (800, 600))
    return root


def test_btad_index_order_labels_and_pairing(btad_root: Path) -> None:
    samples = index_btad(btad_root, "01")
    assert [(s.split, s.defect, s.image.name, s.label) for s in samples] == [
        ("train", "good", "0000.bmp", 0),
        ("train", "good", "0001.png", 0),
        ("train", "good", "0002.bmp", 0),
        ("test", "ko", "10.bmp", 1),
        ("test", "ko", "2.bmp", 1),
        ("test", "ko", "3.bmp", 1),
        ("test", "good", "0000.bmp", 0),
    ]
    for s in samples:
        if s.label == 0:
            assert s.mask is None
            continue
        assert s.mask.stem == s.image.stem
        assert int(np.asarray(Image.open(s.mask)).max()) == int(s.image.stem)
    assert image_size(samples[0].image) == (1600, 1600)
    assert samples == index_dataset("btad", btad_root, "01")


def test_btad_non_square_and_products(btad_root: Path) -> None:
    samples = index_btad(btad_root, "03")
    assert [sample_image_size(s) for s in samples] == [(600, 800), (600, 800)]
    assert samples[1].mask.suffix == ".bmp"
    assert dataset_categories("btad", btad_root) == ["01", "03"]
    assert set(INDEXERS) >= {"mvtec", "btad", "mnist", "folder"}


def test_btad_defect_without_mask(btad_root: Path) -> None:
    image = _image(btad_root / "01" / "test" / "ko" / "7.bmp")
    with pytest.raises(DataError, match="has no mask") as excinfo:
        index_btad(btad_root, "01")
    assert str(image) in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_btad_unknown_product(btad_root: Path) -> None:
    with pytest.raises(DataError, match=r"'02' not found .*available: 01, 03"):
        index_btad(btad_root, "02")


# ---------------------------------------------------------------- MNIST


def _write_mnist(root: Path, n_train: int = 1000) -> Path:
    """scikit-learn's 8x8 digits as MNIST IDX files: train gzipped, test not."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"{MNIST_FILES['train_images']}.gz", images[:n_train], compress=True)
    write_idx(root / f"{MNIST_FILES['train_labels']}.gz", labels[:n_train], compress=True)
    write_idx(root / MNIST_FILES["test_images"], images[n_train:])
    write_idx(root / MNIST_FILES["test_labels"], labels[n_train:])
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mnist(tmp_path_factory.mktemp("mnist"))


def test_mnist_one_class_protocol(mnist_root: Path) -> None:
    digits = load_digits()
    train_labels, test_labels = digits.target[:1000], digits.target[1000:]
    samples = index_mnist(mnist_root, "3")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert [s.index for s in train] == np.flatnonzero(train_labels == 3).tolist()
    assert all(s.label == 0 and s.defect == "good" and s.mask is None for s in train)
    assert train[0].image.name == "train-images-idx3-ubyte.gz"
    assert [s.index for s in test] == list(range(len(test_labels)))
    assert [s.label for s in test] == [int(d != 3) for d in test_labels]
    assert [s.defect for s in test] == ["good" if d == 3 else f"digit_{d}" for d in test_labels]
    assert all(s.mask is None for s in test)
    assert samples == index_dataset("mnist", mnist_root, "3")
    assert dataset_categories("mnist", mnist_root) == [str(d) for d in range(10)]


def test_mnist_reads_records_like_image_files(mnist_root: Path, tmp_path: Path) -> None:
    sample = index_mnist(mnist_root, "5")[0]
    record = read_idx(sample.image)[sample.index]
    native = read_sample_image(sample)
    assert native.shape == (8, 8, 3) and sample_image_size(sample) == (8, 8)
    for c in range(3):
        np.testing.assert_array_equal(native[..., c], record)
    Image.fromarray(record).save(tmp_path / "record.png")
    np.testing.assert_array_equal(
        read_sample_image(sample, 20), load_image(tmp_path / "record.png", 20)
    )


def test_mnist_gzip_detected_by_content(mnist_root: Path, tmp_path: Path) -> None:
    plain = read_idx(mnist_root / MNIST_FILES["test_images"])
    renamed = tmp_path / "images.gz"
    renamed.write_bytes((mnist_root / MNIST_FILES["test_images"]).read_bytes())
    np.testing.assert_array_equal(read_idx(renamed), plain)
    zipped = tmp_path / "images"
    zipped.write_bytes(gzip.compress(renamed.read_bytes()))
    np.testing.assert_array_equal(read_idx(zipped), plain)


def test_mnist_bad_inputs(mnist_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="must be a digit 0-9, got 'bottle'"):
        index_mnist(mnist_root, "bottle")
    missing = r"MNIST file .*train-images-idx3-ubyte\[\.gz\] does not exist"
    with pytest.raises(DataError, match=missing):
        index_mnist(tmp_path, "1")
    data = (mnist_root / MNIST_FILES["test_images"]).read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated") as excinfo:
        read_idx(cut)
    assert str(cut) in str(excinfo.value)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(data)[:-50])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(cut_gz)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)


def test_mnist_label_count_mismatch(mnist_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    _write_mnist(root)
    write_idx(root / MNIST_FILES["test_labels"], np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="has 5 labels for 797 images"):
        index_mnist(root, "0")
    report = check_dataset("mnist", root, "0")
    assert not report.ok and "has 5 labels" in report.errors[0].message


# ---------------------------------------------------------------- folders


def test_folder_layout_round_trip_and_index(tmp_path: Path) -> None:
    layout = FolderLayout(
        train="training", test="inspection", ground_truth="masks", good="OK", mask_suffix="_gt"
    )
    assert FolderLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    root = tmp_path / "line"
    w = root / "widget"
    _image(w / "training" / "OK" / "a.jpg")
    _image(w / "training" / "OK" / "b.png")
    _image(w / "inspection" / "OK" / "c.png")
    _image(w / "inspection" / "dent" / "d.png")
    _mask(w / "masks" / "dent" / "d_gt.png")
    layout.save(root)
    samples = index_dataset("folder", root, "widget")
    assert [(s.split, s.defect, s.image.name) for s in samples] == [
        ("train", "good", "a.jpg"),
        ("train", "good", "b.png"),
        ("test", "good", "c.png"),  # "OK" sorts before "dent"
        ("test", "dent", "d.png"),
    ]
    assert samples[3].mask == w / "masks" / "dent" / "d_gt.png"
    assert dataset_categories("folder", root) == ["widget"]


def test_folder_default_layout_is_mvtec(demo_root: Path) -> None:
    assert index_dataset("folder", demo_root, "brick") == index_mvtec(demo_root, "brick")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"good": "ok", "colour": "red"}, "unknown keys colour"),
        ({"train": "a/b"}, "path separator"),
        ({"test": ""}, "must be a folder name"),
        ({"good": 3}, "must be a string"),
    ],
)
def test_folder_layout_rejects_bad_values(tmp_path: Path, raw: dict, message: str) -> None:
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message):
        index_dataset("folder", tmp_path, "x")


def test_folder_layout_unreadable_json(tmp_path: Path) -> None:
    (tmp_path / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(DataError, match=f"cannot read folder layout .*{LAYOUT_FILE}"):
        index_dataset("folder", tmp_path, "x")


# ---------------------------------------------------------------- check


def test_check_clean_tree(btad_root: Path) -> None:
    report = check_dataset("btad", btad_root, "01")
    assert report.ok and report.problems == []
    assert report.counts == {("train", "good"): 3, ("test", "good"): 1, ("test", "ko"): 3}
    assert report.sizes == {(1600, 1600): 1, (30, 40): 6}


def test_check_reports_every_problem(btad_root: Path) -> None:
    p = btad_root / "01"
    truncated = p / "train" / "ok" / "0001.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage = p / "test" / "ok" / "0000.bmp"
    garbage.write_bytes(b"not a bitmap" * 20)
    grey = _image(p / "train" / "ok" / "0003.png", mode="L")
    orphan = _image(p / "test" / "ko" / "5.bmp")
    lonely = _mask(p / "ground_truth" / "ko" / "9.png")
    wrong_size = _mask(p / "ground_truth" / "ko" / "10.png", (20, 10))
    soft = p / "ground_truth" / "ko" / "2.png"
    ramp = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1))
    Image.fromarray(ramp).save(soft)
    (p / "test" / "scratch").mkdir()

    report = check_dataset("btad", btad_root, "01")
    errors, warnings = _problems(report, "error"), _problems(report, "warning")
    assert not report.ok
    assert any(str(truncated) in m and "cannot read image" in m for m in errors)
    assert any(str(garbage) in m and "cannot read image" in m for m in errors)
    assert any(str(orphan) in m and "has no mask" in m for m in errors)
    assert f"mask {wrong_size} is 10x20 but its image is 30x40" in errors
    assert len(errors) == 4
    assert any(str(lonely) in m and "has no image" in m for m in warnings)
    assert any(str(soft) in m and "not binary (40 values" in m for m in warnings)
    assert any(str(grey) in m and "1 channel(s)" in m for m in warnings)
    assert any(str(p / "test" / "scratch") in m and "no images" in m for m in warnings)
    assert len(warnings) == 4
    assert {p.path for p in report.problems} >= {truncated, garbage, orphan, lonely, soft, grey}


@pytest.mark.parametrize("broken", ["no_train", "empty_train", "no_test", "empty_test"])
def test_check_missing_or_empty_folders(btad_root: Path, broken: str) -> None:
    p = btad_root / "01"
    folder = {
        "no_train": p / "train" / "ok",
        "empty_train": p / "train" / "ok",
        "no_test": p / "test",
        "empty_test": p / "test",
    }[broken]
    shutil.rmtree(folder)
    if broken.startswith("empty"):
        folder.mkdir()
    report = check_dataset("btad", btad_root, "01")
    expected = "does not exist" if broken.startswith("no") else "has no images"
    assert any(str(folder) in m and expected in m for m in _problems(report, "error"))


def test_check_mnist(mnist_root: Path) -> None:
    report = check_dataset("mnist", mnist_root, "7")
    assert report.ok
    assert report.sizes == {(8, 8): sum(report.counts.values())}
    assert report.counts[("test", "good")] == int((load_digits().target[1000:] == 7).sum())


def test_check_missing_root_is_raised(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_dataset("btad", tmp_path / "nope", "01")
    with pytest.raises(DataError, match="unknown dataset 'visa'"):
        check_dataset("visa", tmp_path, "01")


def test_warnings_do_not_stop_indexing(btad_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    _mask(btad_root / "01" / "ground_truth" / "ko" / "9.png")
    with caplog.at_level(logging.WARNING):
        assert len(index_btad(btad_root, "01")) == 7
    assert "9.png" in caplog.text


# ---------------------------------------------------------------- CLI


def _check(*args: str):
    return runner.invoke(app, ["data", "check", *args])


def test_cli_check_exit_codes(btad_root: Path) -> None:
    ok = _check("--dataset", "btad", "--root", str(btad_root), "--category", "01")
    assert ok.exit_code == 0, ok.output
    assert "btad/01: 7 images, 0 errors, 0 warnings" in ok.stdout
    assert "1600x1600 (1)" in ok.stdout

    _mask(btad_root / "01" / "ground_truth" / "ko" / "9.png")
    warned = _check("--dataset", "btad", "--root", str(btad_root), "--all-categories")
    assert warned.exit_code == 0, warned.output
    assert "btad/03" in warned.stdout and "9.png" in warned.stdout
    strict = _check("--dataset", "btad", "--root", str(btad_root), "--category", "01", "--strict")
    assert strict.exit_code == 1

    _image(btad_root / "01" / "test" / "ko" / "5.bmp")
    failed = _check("--dataset", "btad", "--root", str(btad_root), "--category", "01")
    assert failed.exit_code == 1
    assert "5.bmp" in failed.stdout and "has no mask" in failed.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "btad"], "give either --category C or --all-categories"),
        (["--dataset", "btad", "--category", "01", "--all-categories"], "give either"),
        (["--dataset", "visa", "--category", "01"], "unknown dataset 'visa'"),
        (["--dataset", "btad", "--category", "07"], "'07' not found"),
    ],
)
def test_cli_check_usage_errors(btad_root: Path, args: list[str], message: str) -> None:
    result = _check("--root", str(btad_root), *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
