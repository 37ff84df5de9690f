"""Evaluation pinned to what it must find: a tiny product with large, obvious defects whose
positions are known, trained for a few epochs of vtadl_tiny.

The tree: 64 px images of a smooth texture; each defect is a 20 px square in one corner,
bright ("bright") or dark ("dark"); masks mark exactly the square. A map that points at the
square scores a pixel AUROC near 1; the same map against masks turned 180 degrees (the
square in the opposite corner) scores at chance or below, and an AU-PRO near 0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from vtadl.checkpoints import LAST
from vtadl.cli.main import app
from vtadl.config import Config, default_config, resolved_image_score
from vtadl.data import index_dataset
from vtadl.data.check import check_dataset
from vtadl.data.images import MASK_THRESHOLD, load_mask
from vtadl.data.mnist import MNIST_FILES, write_idx
from vtadl.data.prepare import split_samples
from vtadl.data.source import FileSource, PackSource, category_source
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import VtadlError
from vtadl.inference.maps import standardised
from vtadl.prediction import predict
from vtadl.scoring.grids import grid_offsets, shift_images
from vtadl.scoring.scorer import Scorer
from vtadl.training import fit

CATEGORY = "plate"
SIZE, SIDE, MARGIN = 64, 20, 4
# (defect type, file stem, corner (row, column): 0 top/left, 1 bottom/right, grey level)
DEFECTS = [
    ("bright", "000", (0, 0), 250),
    ("bright", "001", (1, 1), 250),
    ("bright", "002", (0, 1), 250),
    ("dark", "000", (1, 0), 5),
    ("dark", "001", (0, 1), 5),
]
N_GOOD_TEST = 3

runner = CliRunner()


def _texture(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE]
    phase = rng.uniform(0, 2 * np.pi, 2)
    grey = 110 + 25 * np.sin(x / 5 + phase[0]) * np.cos(y / 7 + phase[1])
    grey = grey + rng.normal(0, 3, (SIZE, SIZE))
    return np.clip(np.stack([grey, grey * 0.8, grey * 0.6], -1), 0, 255).astype(np.uint8)


def _square(corner: tuple[int, int]) -> tuple[slice, slice]:
    y, x = (MARGIN if c == 0 else SIZE - MARGIN - SIDE for c in corner)
    return slice(y, y + SIDE), slice(x, x + SIDE)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mask_path(root: Path, defect: str, stem: str) -> Path:
    return root / CATEGORY / "ground_truth" / defect / f"{stem}_mask.png"


def write_plate(root: Path, n_train: int = 10) -> Path:
    """The tiny product under root/plate; returns root."""
    rng = np.random.default_rng(0)
    for i in range(n_train):
        _save(root / CATEGORY / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(N_GOOD_TEST):
        _save(root / CATEGORY / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for defect, stem, corner, level in DEFECTS:
        image, mask = _texture(rng), np.zeros((SIZE, SIZE), np.uint8)
        image[_square(corner)] = level
        mask[_square(corner)] = 255
        _save(root / CATEGORY / "test" / defect / f"{stem}.png", image)
        _save(_mask_path(root, defect, stem), mask)
    return root


def plate_config(root: Path, out: Path, **data) -> Config:
    return default_config("vtadl_tiny").override(
        data={"root": str(root), "category": CATEGORY, **data},
        train={"epochs": 3, "batch_size": 4, "out": str(out)},
    )


@contextmanager
def masks_turned(root: Path) -> Iterator[None]:
    """Every mask turned 180 degrees on disk for the block (the square in the far corner)."""
    saved = {}
    for defect, stem, _, _ in DEFECTS:
        path = _mask_path(root, defect, stem)
        saved[path] = path.read_bytes()
        _save(path, np.rot90(np.asarray(Image.open(path)), 2).copy())
    try:
        yield
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plate(tmp_path_factory.mktemp("plate"))


@pytest.fixture(scope="module")
def plate_run(plate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs on the whole images (resized to 32 px), read from an automatic pack."""
    return fit(plate_config(plate, tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def tiled_run(plate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs on the four 32 px tiles of each 64 px image; maps are stitched."""
    return fit(plate_config(plate, tmp_path_factory.mktemp("runs"), tile=32))


def _inside(yx: list[int], corner: tuple[int, int], slack: int = 0) -> bool:
    rows, cols = _square(corner)
    return (
        rows.start - slack <= yx[0] < rows.stop + slack
        and cols.start - slack <= yx[1] < cols.stop + slack
    )


# ---------------------------------------------------------------- maps against known defects


@pytest.mark.parametrize("run", ["plate_run", "tiled_run"])
def test_pixel_metrics_see_the_defect_and_not_its_mirror_image(
    run: str, plate: Path, request: pytest.FixtureRequest
) -> None:
    run_dir = request.getfixturevalue(run)
    result = evaluate_run(run_dir)
    assert result["image_auroc"] == 1.0
    # (.94 / .81 for the whole images at 32 px: the 4 x 4 grids, shifted 2 px at a time,
    # reflect much of their border; .97 / .91 tiled)
    assert result["pixel_auroc"] > 0.93
    assert result["au_pro"] > 0.78
    for defect in ("bright", "dark"):
        assert result["by_defect"][defect]["pixel_auroc"] > 0.95, defect
    with masks_turned(plate):
        turned = evaluate_run(run_dir)
    assert turned["image_auroc"] == 1.0  # image scores do not depend on masks
    # Chance level at best: the turned masks cover plain texture, and the squares count as
    # normal pixels.
    assert turned["pixel_auroc"] < 0.65
    assert turned["au_pro"] < 0.2


@pytest.mark.parametrize("run", ["plate_run", "tiled_run"])
def test_predicted_map_peaks_on_the_defect(
    run: str, plate: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run_dir = request.getfixturevalue(run)
    result = predict(run_dir, [plate / CATEGORY / "test"], tmp_path / "pred")
    rows = {r["image"]: r for r in result["images"]}
    assert len(rows) == N_GOOD_TEST + len(DEFECTS) and not result["failed"]
    for defect, stem, corner, _ in DEFECTS:
        row = rows[str(plate / CATEGORY / "test" / defect / f"{stem}.png")]
        # The mixture's map has the token grid's resolution (8 px tokens of the 32 px input,
        # 16 px here); at the image border its plateau reaches the edge, so the peak is
        # within half a token of the square.
        assert _inside(row["max_at"], corner, slack=8), (defect, stem, row["max_at"])
        assert not _inside(row["max_at"], (1 - corner[0], 1 - corner[1]), slack=8)
        assert row["anomalous"]


def test_threshold_is_the_highest_validation_score(plate: Path, plate_run: Path, tmp_path: Path):
    cfg = plate_config(plate, tmp_path)
    samples = index_dataset("mvtec", plate, CATEGORY)
    val = split_samples(samples, cfg.data.val_fraction, cfg.train.seed).val
    result = predict(plate_run, [s.image for s in val], tmp_path / "pred")
    scores = [r["score"] for r in result["images"]]
    assert len(scores) == len(val) >= 1
    assert result["threshold"] == pytest.approx(max(scores), rel=1e-5)
    assert evaluate_run(plate_run)["threshold"] == pytest.approx(max(scores), rel=1e-5)
    assert not any(r["anomalous"] for r in result["images"])


def test_metrics_json_has_every_image_and_each_defect_type(plate_run: Path) -> None:
    result = evaluate_run(plate_run)
    assert json.loads((plate_run / "metrics.json").read_text()) == result
    images = result["images"]
    expected = {f"{CATEGORY}/test/good/{i:03d}.png": ("good", 0) for i in range(N_GOOD_TEST)}
    expected |= {f"{CATEGORY}/test/{d}/{s}.png": (d, 1) for d, s, _, _ in DEFECTS}
    assert {r["name"]: (r["defect"], r["label"]) for r in images} == expected
    assert set(result["by_defect"]) == {"bright", "dark"}
    for defect, m in result["by_defect"].items():
        chosen = [r for r in images if r["defect"] in ("good", defect)]
        labels, scores = [r["label"] for r in chosen], [r["score"] for r in chosen]
        assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
        assert m["n_images"] == sum(labels)


# ---------------------------------------------------------------- heat maps


def test_heat_maps_are_large_and_show_the_source_file(plate: Path, plate_run: Path) -> None:
    evaluate_run(plate_run)
    with Image.open(plate_run / "maps" / "bright_000.png") as img:
        width, height = img.size
    assert width >= 3 * 256 and height >= 256 + 40  # three panels of 256 px and a title
    # The left panel is the 64 px source file itself, not the pack's 32 px copy.
    src = category_source(plate_config(plate, plate_run.parents[2]))
    assert isinstance(src, PackSource)
    i = [it.name for it in src.items("test")].index(f"{CATEGORY}/test/bright/000.png")
    source = np.asarray(Image.open(plate / CATEGORY / "test" / "bright" / "000.png"))
    np.testing.assert_array_equal(src.display_image("test", i), source)


# ---------------------------------------------------------------- masks: one rule everywhere


def _grey_masks(root: Path) -> None:
    """Each mask as a JPEG-like grey picture: the square at 200, a soft edge, noise below."""
    rng = np.random.default_rng(1)
    for defect, stem, corner, _ in DEFECTS:
        grey = rng.integers(0, 30, (SIZE, SIZE)).astype(np.uint8)
        rows, cols = _square(corner)
        grey[max(rows.start - 2, 0) : rows.stop + 2, max(cols.start - 2, 0) : cols.stop + 2] = 90
        grey[rows, cols] = 200
        _save(_mask_path(root, defect, stem), grey)


def test_grey_mask_is_binarised_at_the_stated_threshold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    _save(tmp_path / "ramp.png", ramp)
    with caplog.at_level(logging.WARNING):
        mask = load_mask(tmp_path / "ramp.png")
    np.testing.assert_array_equal(mask, ramp > MASK_THRESHOLD)
    assert "ramp.png is not binary (64 values" in caplog.text and "above 127" in caplog.text


def test_evaluation_packing_and_check_read_grey_masks_alike(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_plate(root, n_train=4)
    _grey_masks(root)
    corners = {f"{CATEGORY}/test/{d}/{s}.png": corner for d, s, corner, _ in DEFECTS}
    cfg = plate_config(root, tmp_path / "runs")
    for source in (FileSource(cfg), category_source(cfg)):
        for i, item in enumerate(source.items("test")):
            truth = np.zeros((SIZE, SIZE), bool)
            if item.name in corners:
                truth[_square(corners[item.name])] = True
            np.testing.assert_array_equal(source.mask("test", i), truth, err_msg=item.name)
    assert isinstance(category_source(cfg), PackSource)
    warnings = [p.message for p in check_dataset("mvtec", root, CATEGORY).warnings]
    assert len(warnings) == len(DEFECTS)
    assert all("not binary" in w and "above 127" in w for w in warnings)


def test_check_warns_about_a_mask_that_marks_nothing(tmp_path: Path) -> None:
    root = write_plate(tmp_path / "data", n_train=3)
    empty = _mask_path(root, "dark", "001")
    _save(empty, np.zeros((SIZE, SIZE), np.uint8))
    report = check_dataset("mvtec", root, CATEGORY)
    assert report.ok
    assert [p.path for p in report.warnings] == [empty]
    assert "marks no anomalous pixel" in report.warnings[0].message


# ---------------------------------------------------------------- no masks: image AUROC only


def _train_cli(*args: str):
    return runner.invoke(
        app,
        ["train", *args, "--variant", "vtadl_tiny", "--image-size", "32", "--epochs", "1"],
    )


def write_digits(root: Path, n_train: int, n_test: int) -> Path:
    """scikit-learn's handwritten digits as MNIST IDX files under root; returns root."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    end = n_train + n_test
    write_idx(root / MNIST_FILES["train_images"], images[:n_train])
    write_idx(root / MNIST_FILES["train_labels"], labels[:n_train])
    write_idx(root / MNIST_FILES["test_images"], images[n_train:end])
    write_idx(root / MNIST_FILES["test_labels"], labels[n_train:end])
    return root


def test_train_on_mnist_prints_image_auroc_and_why_pixel_metrics_are_absent(tmp_path: Path):
    root, out = write_digits(tmp_path / "mnist", 60, 40), tmp_path / "runs"
    result = _train_cli(
        "--dataset", "mnist", "--root", str(root), "--category", "3", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "image AUROC" in result.stdout and "pixel AUROC" not in result.stdout
    assert "no pixel metrics: MNIST has image-level labels only" in result.stdout
    run_dir = next((out / "mnist" / "3").iterdir())
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["pixel_auroc"] is None and saved["au_pro"] is None
    assert 0 <= saved["image_auroc"] <= 1
    # Digits of another class are anomalies of the whole image: the default image score
    # adds the reconstruction error and the distance to the nearest training image there.
    assert saved["image_score"] == "peak+recon+neighbour"
    assert saved["recon_weight"] == 0.3 and saved["neighbour_weight"] == 0.5


def test_evaluate_with_empty_masks_prints_image_auroc_and_the_reason(tmp_path: Path) -> None:
    root = write_plate(tmp_path / "data", n_train=4)
    for defect, stem, _, _ in DEFECTS:
        _save(_mask_path(root, defect, stem), np.zeros((SIZE, SIZE), np.uint8))
    out = tmp_path / "runs"
    trained = _train_cli("--root", str(root), "--category", CATEGORY, "--out", str(out))
    assert trained.exit_code == 0, trained.output
    run_dir = next((out / "mvtec" / CATEGORY).iterdir())
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    reason = f"no pixel metrics: the masks of all {len(DEFECTS)} defective test images mark"
    assert reason in result.stdout
    assert "image AUROC" in result.stdout and "AU-PRO" not in result.stdout


def test_evaluation_warns_about_a_defect_whose_mask_is_empty(
    plate: Path, plate_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _mask_path(plate, "dark", "001")
    saved = path.read_bytes()
    _save(path, np.zeros((SIZE, SIZE), np.uint8))
    try:
        with caplog.at_level(logging.WARNING, logger="vtadl.evaluation"):
            result = evaluate_run(plate_run)
    finally:
        path.write_bytes(saved)
    assert result["pixel_auroc"] is not None
    assert "1 defective test images have masks that mark no pixel" in caplog.text
    assert f"{CATEGORY}/test/dark/001.png" in caplog.text


# ---------------------------------------------------------------- predict on bad input


def test_predict_scores_every_readable_image_and_lists_the_rest(
    plate: Path, plate_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "incoming"
    for defect in ("good", "bright"):
        for name in ("000.png", "001.png"):
            (folder / defect).mkdir(parents=True, exist_ok=True)
            source = plate / CATEGORY / "test" / defect / name
            (folder / defect / name).write_bytes(source.read_bytes())
    truncated = folder / "good" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:80])
    garbage = folder / "bright" / "002.png"
    garbage.write_text("not an image")
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(plate_run), str(folder), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    saved = json.loads((out / "scores.json").read_text())
    assert sorted(r["heatmap"] for r in saved["images"]) == [
        "incoming/bright/000.png",
        "incoming/bright/001.png",
        "incoming/good/001.png",
    ]
    for row in saved["images"]:
        assert (out / row["heatmap"]).is_file()
    failed = {f["image"]: f["error"] for f in saved["failed"]}
    assert set(failed) == {str(truncated), str(garbage)}
    for path, reason in failed.items():
        assert path in reason and "cannot read image" in reason
        assert path in result.stderr
    assert "3 images scored" in result.stdout


def test_predict_names_an_unwritable_output_in_one_line(plate: Path, plate_run: Path, tmp_path):
    image = plate / CATEGORY / "test" / "good" / "000.png"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for target, words in ((blocker, "is a file"), (blocker / "sub", "cannot create")):
        with pytest.raises(VtadlError, match=words):
            predict(plate_run, [image], target)
        result = runner.invoke(app, ["predict", str(plate_run), str(image), "--out", str(target)])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(target) in lines[0] and words in lines[0], result.output


def test_the_peak_scores_an_image_by_its_highest_patches(plate_run: Path) -> None:
    peak = evaluate_run(plate_run)  # the default image score
    assert peak["image_score"] == "peak" and peak["peak_patches"] == 10
    assert peak["image_auroc"] > 0.9  # the squares are plain to see
    scorer = Scorer(plate_run)
    one = Scorer(plate_run, eval_overrides={"peak_patches": 1})
    src, cal = scorer.source, scorer.calibration
    for i in (0, len(src.items("test")) - 1):
        raw = scorer.raw(src.model_input("test", i)[0])
        patches = np.sort(cal.nll.apply(raw[0], cal.scale).ravel())  # every shifted grid's
        assert patches.size == 16 * 4 * 4  # 4 x 4 grids of 4 x 4 patches
        assert peak["images"][i]["score"] == pytest.approx(float(patches[-10:].mean()), rel=1e-6)
        highest = one.scored(raw, None, src.items("test")[i].shape)[1]
        assert highest == pytest.approx(float(patches[-1]), rel=1e-6)
    # The smoothed map's maximum is another number.
    raw, item = scorer.raw(src.model_input("test", 0)[0]), src.items("test")[0]
    amap, score = scorer.scored(raw, None, item.shape)
    assert score == pytest.approx(peak["images"][0]["score"])
    assert amap.max() != pytest.approx(score, rel=1e-3)
    # With the reconstruction error in the map, the peak is the map's at model resolution.
    both = Scorer(plate_run, eval_overrides={"score": "nll+recon"})
    raw = both.raw(src.model_input("test", 0)[0])
    small = np.sort(standardised(raw.nll, raw.rec, both.calibration, "nll+recon").ravel())
    assert both.scored(raw, None, item.shape)[1] == pytest.approx(float(small[-10:].mean()))


@pytest.fixture(scope="module")
def three_val_run(plate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 epoch, with 3 of the 10 training images held out for validation."""
    config = plate_config(plate, tmp_path_factory.mktemp("runs"), val_fraction=0.3)
    return fit(config.override(train={"epochs": 1}))


def test_peak_plus_recon_adds_the_standardised_reconstruction_error(three_val_run: Path) -> None:
    plate_run = three_val_run

    def parts(scorer: Scorer, split: str) -> tuple[np.ndarray, np.ndarray]:
        src, cal = scorer.source, scorer.calibration
        raws = [scorer.raw(src.model_input(split, i)[0]) for i in range(len(src.items(split)))]
        peaks = [np.sort(cal.nll.apply(r[0], cal.scale).ravel())[-10:].mean() for r in raws]
        return np.array(peaks), np.array([np.log(r[1].mean()) for r in raws])

    both = Scorer(plate_run, eval_overrides={"image_score": "peak+recon"})
    heavier = Scorer(plate_run, eval_overrides={"image_score": "peak+recon", "recon_weight": 2})
    val_peak, val_rec = parts(both, "val")
    test_peak, test_rec = parts(both, "test")
    z_peak = (test_peak - val_peak.mean()) / val_peak.std()
    z_rec = (test_rec - val_rec.mean()) / val_rec.std()
    src = both.source
    for i, item in enumerate(src.items("test")):
        raw = both.raw(src.model_input("test", i)[0])
        score = both.scored(raw, None, item.shape)[1]
        assert score == pytest.approx(z_peak[i] + 0.3 * z_rec[i], rel=1e-3, abs=1e-3)
        assert heavier.scored(raw, None, item.shape)[1] == pytest.approx(
            z_peak[i] + 2 * z_rec[i], rel=1e-3, abs=1e-3
        )
    # The threshold is the highest validation image's score, in the same units.
    expected = ((val_peak - val_peak.mean()) / val_peak.std()) + 0.3 * (
        (val_rec - val_rec.mean()) / val_rec.std()
    )
    assert both.calibration.image_threshold == pytest.approx(expected.max(), rel=1e-4)
    result = evaluate_run(plate_run, eval_overrides={"image_score": "peak+recon"})
    assert result["image_score"] == "peak+recon"
    assert [im["score"] for im in result["images"]] == pytest.approx(
        list(z_peak + 0.3 * z_rec), rel=1e-3, abs=1e-3
    )


def test_a_calibration_written_before_image_level_parts_is_kept_unless_needed(
    plate: Path, three_val_run: Path, tmp_path: Path
) -> None:
    def written_before(run: Path) -> tuple[dict, str]:
        current = json.loads((run / "calibration.json").read_text())
        newer = ("image_peak", "image_rec", "image_near", "made_for")
        old = {k: v for k, v in current.items() if k not in newer}
        (run / "calibration.json").write_text(json.dumps(old))
        return current, json.dumps(old)

    # The peak does not need the image-level parts: an older calibration is used as it is.
    Scorer(three_val_run)
    _, old = written_before(three_val_run)
    assert Scorer(three_val_run).calibration.image_peak.std == 1.0
    assert (three_val_run / "calibration.json").read_text() == old
    # peak+recon does: its run's calibration is made afresh, the same as before.
    config = plate_config(plate, tmp_path, val_fraction=0.3)
    run = fit(config.override(train={"epochs": 1}, eval={"image_score": "peak+recon"}))
    Scorer(run)
    current, _ = written_before(run)
    Scorer(run)
    assert json.loads((run / "calibration.json").read_text()) == current


def test_images_scored_together_score_as_each_alone(tiled_run: Path) -> None:
    # Evaluation scores several images (here four tiles each) in shared batches: each
    # image's patch scores and reconstruction errors are its own, in its own order.
    scorer = Scorer(tiled_run)
    src = scorer.source
    inputs = [src.model_input("test", i)[0] for i in (0, 1, len(src.items("test")) - 1)]
    assert all(len(x) == 4 for x in inputs)
    together = scorer.raw_many(inputs)
    assert len(together) == len(inputs)
    for x, (nll, rec, _) in zip(inputs, together):
        alone_nll, alone_rec, _ = scorer.raw(x)
        np.testing.assert_allclose(nll, alone_nll, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(rec, alone_rec, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 epoch on the 3s among 300 digits (9 held out for validation), 32 px, kernel by
    position (the MNIST default)."""
    root = write_digits(tmp_path_factory.mktemp("digits"), 300, 100)
    config = default_config("vtadl_tiny").override(
        data={"dataset": "mnist", "root": str(root), "category": "3", "val_fraction": 0.3},
        model={"img_size": 32},
        train={"epochs": 1, "batch_size": 8, "out": str(tmp_path_factory.mktemp("runs"))},
    )
    return fit(config)


def _tokens_on_every_grid(scorer: Scorer, images: np.ndarray) -> np.ndarray:
    """Each image's tokens on all its shifted grids, one row per image, float64."""
    model, p = scorer.model, scorer.config.model.patch_size
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        grids = [
            model.encode(shift_images(x, dy, dx))
            for dy, dx in grid_offsets(p, scorer.eval.grid_shifts)
        ]
    return torch.cat(grids, 1).flatten(1).double().numpy()


def test_peak_recon_neighbour_adds_the_distance_to_the_nearest_training_image(
    digits_run: Path,
) -> None:
    scorer = Scorer(digits_run)
    src, cal = scorer.source, scorer.calibration
    assert resolved_image_score(scorer.config) == "peak+recon+neighbour"
    train = _tokens_on_every_grid(scorer, _split_inputs(src, "train"))

    def parts(split: str) -> np.ndarray:
        images = _split_inputs(src, split)
        raw = scorer.raw(images)
        peak = [np.sort(cal.nll.apply(n, cal.scale).ravel())[-10:].mean() for n in raw.nll]
        rec = np.log(raw.rec.reshape(len(images), -1).mean(1))
        near = cdist(_tokens_on_every_grid(scorer, images), train).min(1)
        np.testing.assert_allclose(raw.near, near, rtol=1e-4)
        return np.stack([peak, rec, np.log(near)], 1)

    val, test = parts("val"), parts("test")
    z = (test - val.mean(0)) / val.std(0)
    expected = z @ np.array([1, 0.3, 0.5])
    result = evaluate_run(digits_run)
    assert result["image_score"] == "peak+recon+neighbour"
    assert [im["score"] for im in result["images"]] == pytest.approx(list(expected), abs=1e-3)
    # The threshold is the highest validation image's score, in the same units.
    z_val = (val - val.mean(0)) / val.std(0)
    assert cal.image_threshold == pytest.approx((z_val @ np.array([1, 0.3, 0.5])).max(), abs=1e-4)
    # A training image is its own nearest neighbour; such a near-duplicate's distance
    # counts as a tenth of the validation images' median, not as the log of about zero.
    first = src.model_input("train", 0)[0]
    raw = scorer.raw(first)
    assert raw.near[0] < 1e-3 * np.exp(test[:, 2]).min()
    floor = 0.1 * np.median(np.exp(val[:, 2]))
    assert cal.image_near.floor == pytest.approx(floor, rel=1e-6)
    z_floor = (np.log(floor) - val[:, 2].mean()) / val[:, 2].std()
    own = scorer.scored(raw, None, src.items("train")[0].shape)[1]
    z_first = (np.array(parts_of(scorer, first)) - val[:, :2].mean(0)) / val[:, :2].std(0)
    assert own == pytest.approx(z_first[0] + 0.3 * z_first[1] + 0.5 * z_floor, abs=1e-3)
    # Another checkpoint is calibrated for itself, and the run's calibration stays.
    before = (digits_run / "calibration.json").read_text()
    Scorer(digits_run, checkpoint=LAST)
    assert (digits_run / "calibration.json").read_text() == before


def parts_of(scorer: Scorer, images: np.ndarray) -> tuple[float, float]:
    """The peak and the log mean squared error of one image."""
    cal, raw = scorer.calibration, scorer.raw(images)
    peak = np.sort(cal.nll.apply(raw.nll[0], cal.scale).ravel())[-10:].mean()
    return float(peak), float(np.log(raw.rec[0].mean()))


def _split_inputs(src, split: str) -> np.ndarray:
    return np.concatenate([src.model_input(split, i)[0] for i in range(len(src.items(split)))])


def test_a_calibration_made_for_other_settings_is_made_afresh(digits_run: Path) -> None:
    # A calibration's threshold holds for the settings it was made with, which it records;
    # one made for others (an older version's defaults, say) is not used.
    stored = Scorer(digits_run).calibration
    assert stored.made_for["image_score"] == "peak+recon+neighbour"
    assert stored.made_for["neighbour_weight"] == 0.5
    path = digits_run / "calibration.json"
    other = stored.to_dict()
    other["made_for"] = {**other["made_for"], "neighbour_weight": 2.0}
    other["image_threshold"] = 123.0
    path.write_text(json.dumps(other))
    assert Scorer(digits_run).calibration == stored
    assert json.loads(path.read_text()) == stored.to_dict()
    # One written before the settings were recorded lacks the neighbour's part: remade too.
    old = {k: v for k, v in stored.to_dict().items() if k not in ("image_near", "made_for")}
    path.write_text(json.dumps({**old, "image_threshold": 123.0}))
    assert Scorer(digits_run).calibration == stored
    # Evaluated with other weights, a run is calibrated for them, and its own file stays.
    heavier = Scorer(digits_run, eval_overrides={"neighbour_weight": 2.0}).calibration
    assert heavier.made_for["neighbour_weight"] == 2.0
    assert heavier.image_threshold != pytest.approx(stored.image_threshold)
    assert json.loads(path.read_text()) == stored.to_dict()
