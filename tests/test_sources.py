"""Training and evaluation read a category from its HDF5 pack, from its files, or as tiles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from vtadl.checkpoints import load_checkpoint
from vtadl.config import default_config
from vtadl.data.mnist import MNIST_FILES, write_idx
from vtadl.data.pack import pack_category
from vtadl.data.source import FileSource, PackSource, category_source
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import ConfigError, DataError
from vtadl.training import fit


def _config(root: Path, out: Path, **data):
    return default_config("vtadl_tiny").override(
        data={"root": str(root), "category": "brick", **data},
        train={"epochs": 2, "batch_size": 4, "out": str(out)},
    )


def test_pack_and_files_give_the_same_inputs(demo_root: Path, tmp_path: Path) -> None:
    packed = category_source(_config(demo_root, tmp_path))
    files = category_source(_config(demo_root, tmp_path, pack="none"))
    assert isinstance(packed, PackSource) and isinstance(files, FileSource)
    assert (tmp_path / "packs" / "mvtec_brick_32.h5").is_file()
    for split in ("train", "val", "test"):
        assert packed.items(split) == files.items(split)
        a, b = packed.dataset(split), files.dataset(split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert torch.equal(a[i], b[i])
    for i in range(len(files.items("test"))):
        np.testing.assert_array_equal(packed.mask("test", i), files.mask("test", i))
        np.testing.assert_array_equal(
            packed.model_input("test", i)[0], files.model_input("test", i)[0]
        )


def test_training_from_the_pack_equals_training_from_files(demo_root: Path, tmp_path: Path) -> None:
    run_pack = fit(_config(demo_root, tmp_path / "a"))
    run_files = fit(_config(demo_root, tmp_path / "b", pack="none"))
    a = load_checkpoint(run_pack / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run_files / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = evaluate_run(run_pack), evaluate_run(run_files)
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-9)


def test_given_pack_is_checked_against_the_run(demo_root: Path, tmp_path: Path) -> None:
    path = pack_category("mvtec", demo_root, "brick", tmp_path / "p", image_size=64)
    with pytest.raises(DataError, match="image_size=64"):
        category_source(_config(demo_root, tmp_path, pack=str(path)))


def test_given_pack_out_of_date_is_refused(demo_copy: Path, tmp_path: Path) -> None:
    path = pack_category("mvtec", demo_copy, "brick", tmp_path / "p", image_size=32)
    assert isinstance(category_source(_config(demo_copy, tmp_path, pack=str(path))), PackSource)
    image = demo_copy / "brick" / "train" / "good" / "000.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(image)
    os.utime(image, (1, 1))
    with pytest.raises(DataError, match="does not match the files"):
        category_source(_config(demo_copy, tmp_path, pack=str(path)))


def test_auto_pack_is_rebuilt_when_a_source_changes(demo_copy: Path, tmp_path: Path) -> None:
    first = category_source(_config(demo_copy, tmp_path))
    before = first.dataset("train")[0].clone()
    name = first.items("train")[0].name
    Image.new("RGB", (32, 32), (200, 10, 10)).save(demo_copy / name)
    again = category_source(_config(demo_copy, tmp_path))
    after = again.dataset("train")[0]
    assert not torch.equal(before, after)
    assert torch.equal(after[0], torch.full((32, 32), 200, dtype=torch.uint8))


def test_tiles_train_and_stitch_into_full_resolution_maps(tmp_path: Path) -> None:
    from vtadl.data.demo import make_demo_dataset

    root = tmp_path / "data"
    make_demo_dataset(
        root, categories=["brick"], image_size=48, n_train=4, n_test_good=2, n_test_defect=1
    )
    config = _config(root, tmp_path / "runs", tile=32, tile_overlap=16)
    source = category_source(config)
    x, corners = source.model_input("test", 0)
    assert x.shape == (4, 32, 32, 3) and corners.tolist() == [[0, 0], [0, 16], [16, 0], [16, 16]]
    assert len(source.dataset("train")) == 4 * len(source.items("train"))
    run = fit(config)
    result = evaluate_run(run)
    assert 0 <= result["au_pro"] <= 1 and 0 <= result["pixel_auroc"] <= 1
    # The stitched map is at the original 48x48 resolution; the heat map scales it up to
    # readable panels (test_evaluation_behaviour checks where the stitched map points).
    assert result["n_test"] == len(source.items("test"))
    heat = Image.open(next((run / "maps").rglob("*.png")))
    assert heat.size[1] >= 256 and heat.size[0] >= 3 * 256
    with pytest.raises(ConfigError, match="tile size 16 must equal"):
        category_source(_config(root, tmp_path / "runs", tile=16))


def test_mnist_one_class_trains_and_reports_image_auroc_only(tmp_path: Path) -> None:
    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / MNIST_FILES["train_images"], images[:300])
    write_idx(root / MNIST_FILES["train_labels"], digits.target[:300].astype(np.uint8))
    write_idx(root / MNIST_FILES["test_images"], images[1700:1760])
    write_idx(root / MNIST_FILES["test_labels"], digits.target[1700:1760].astype(np.uint8))
    config = default_config("vtadl_tiny").override(
        model={"img_size": 16, "patch_size": 4},
        data={"dataset": "mnist", "root": str(root), "category": "3"},
        train={"epochs": 1, "batch_size": 8, "out": str(tmp_path / "runs")},
    )
    run = fit(config)
    result = evaluate_run(run)
    assert 0 <= result["image_auroc"] <= 1
    assert result["pixel_auroc"] is None and result["au_pro"] is None
    assert json.loads((run / "metrics.json").read_text())["n_anomalous"] == sum(
        digits.target[1700:1760] != 3
    )
