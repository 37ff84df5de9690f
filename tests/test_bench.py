from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.data import bench, index_mnist, index_mvtec, list_categories
from vtadl.data.reader import read_sample_image
from vtadl.exceptions import DataError

TINY = {"image_size": 64, "n_train": 3, "n_test_good": 1, "n_test_defect": 1}
TWO = ("coins", "flower")


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    assert bench.make_photo_benchmark(root, TWO, **TINY) == list(TWO)
    return root


def test_layout_indexes_as_mvtec(photos: Path) -> None:
    assert list_categories(photos) == sorted(TWO)
    for category in TWO:
        samples = index_mvtec(photos, category)
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        assert len(train) == 3 and all(s.label == 0 for s in train)
        assert sorted({s.defect for s in test}) == sorted(("good", *bench.BENCH_DEFECTS))
        for s in test:
            image = np.asarray(Image.open(s.image))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            if s.label:
                mask = np.asarray(Image.open(s.mask)) > 0
                assert mask.shape == (64, 64)
                assert bench.MIN_DEFECT_AREA <= mask.mean() <= bench.MAX_DEFECT_AREA


def test_same_seed_same_files_other_seed_other_files(photos: Path, tmp_path: Path) -> None:
    # One category alone: its files do not depend on which others were written.
    bench.make_photo_benchmark(tmp_path / "a", ["flower"], **TINY)
    assert _digest(tmp_path / "a" / "flower") == _digest(photos / "flower")
    bench.make_photo_benchmark(tmp_path / "b", ["flower"], seed=1, **TINY)
    assert _digest(tmp_path / "b" / "flower") != _digest(photos / "flower")


@pytest.mark.parametrize("category", bench.BENCH_CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category: str) -> None:
    rng = np.random.default_rng(7)
    for defect in bench.BENCH_DEFECTS:
        clean = bench._window(category, rng, 64)
        image, mask = bench.add_defect(clean, defect, rng, category)
        changed = (image != clean).any(axis=2)
        assert np.array_equal(changed, mask), (category, defect)
        assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
        contrast = np.abs(image.astype(float) - clean)[mask].mean()
        assert contrast >= bench.MIN_DEFECT_CONTRAST[defect]
        novel = bench._rare_colours(category)[bench.colour_bins(image[mask])].mean()
        assert novel <= bench.MAX_NOVEL_COLOUR


def test_sets_cover_the_categories_and_keep_the_first_five() -> None:
    assert sum(bench.BENCH_SETS, ()) == bench.BENCH_CATEGORIES
    # The figures recorded before 2026-12-07 are over these five, in this order.
    assert bench.BENCH_SETS[0] == ("coins", "coffee", "flower", "page", "table")
    assert bench._foreign_sources("coins") == ["coffee", "flower", "page", "table"]
    assert "engine" not in bench._foreign_sources("table")
    assert bench._foreign_sources("engine")[:5] == list(bench.BENCH_SETS[0])


def test_new_categories_are_written_with_one_region_masks(tmp_path: Path) -> None:
    added = bench.BENCH_SETS[1]
    assert bench.make_photo_benchmark(tmp_path, added, **TINY) == list(added)
    for category in added:
        masks = [s.mask for s in index_mvtec(tmp_path, category) if s.label]
        assert len(masks) == len(bench.BENCH_DEFECTS)
        for path in masks:
            mask = np.asarray(Image.open(path)) > 0
            assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
            assert bench.MIN_DEFECT_AREA <= mask.mean() <= bench.MAX_DEFECT_AREA


def test_adding_a_set_leaves_earlier_categories_unchanged(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A further set whose photograph is one the first set already uses.
    monkeypatch.setitem(bench._SOURCES, "later", ("skimage:coins", (0, 0, 1, 1), (0.5, 0.5)))
    monkeypatch.setattr(bench, "BENCH_SETS", (*bench.BENCH_SETS, ("later",)))
    bench.make_photo_benchmark(tmp_path, ["coins", "later"], **TINY)
    assert _digest(tmp_path / "coins") == _digest(photos / "coins")
    assert "later" not in bench._foreign_sources("coins")


def test_existing_folder_not_written_by_vtadl_is_refused(tmp_path: Path) -> None:
    (tmp_path / "coins").mkdir()
    (tmp_path / "coins" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="refusing to overwrite"):
        bench.make_photo_benchmark(tmp_path, ["coins"], **TINY)
    assert (tmp_path / "coins" / "mine.txt").read_text() == "keep"


def test_unknown_category_lists_known(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="known: coins"):
        bench.make_photo_benchmark(tmp_path, ["brick"], **TINY)


def test_digits_read_by_the_mnist_indexer(tmp_path: Path) -> None:
    counts = bench.make_digits_benchmark(tmp_path)
    assert counts["train"] + counts["test"] == 1797
    samples = index_mnist(tmp_path, "3")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(test) == counts["test"]
    # scikit-learn has 183 threes; 40% of them (73) are test records.
    assert len(train) == 183 - 73
    assert sum(s.label == 0 for s in test) == 73
    assert {s.defect for s in test if s.label} == {f"digit_{d}" for d in range(10) if d != 3}
    image = read_sample_image(train[0], 32)
    assert image.shape == (32, 32, 3) and image.max() > 200
    assert bench.make_digits_benchmark(tmp_path / "again") == counts
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_cli_bench_error_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "bench", str(tmp_path), "--image-size", "16"])
    assert result.exit_code == 2
    assert "image_size must be at least 64" in result.output
    assert "Traceback" not in result.output
