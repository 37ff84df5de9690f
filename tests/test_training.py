from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vtadl.training as training
from vtadl.checkpoints import load_checkpoint, model_from_checkpoint
from vtadl.config import Config, load_config
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import ConfigError, DataError, RunError, TrainingError
from vtadl.losses import LossTerms
from vtadl.prediction import predict
from vtadl.run_folders import latest_run
from vtadl.training import Callbacks, fit

CATEGORY = "brick"  # the demo category of conftest.demo_root


def _history(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def three_epochs(
    demo_root: Path, config_for, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Config, Path]:
    """One uninterrupted 3-epoch run, shared by the read-only tests of this module."""
    cfg = config_for(demo_root, tmp_path_factory.mktemp("runs_a"), epochs=3)
    return cfg, fit(cfg)


def test_fit_writes_run_folder(three_epochs: tuple[Config, Path]) -> None:
    cfg, run_dir = three_epochs
    assert run_dir.parent == Path(cfg.train.out) / "mvtec" / CATEGORY
    assert load_config(run_dir / "config.yaml") == cfg
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    history = _history(run_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record in history:
        for key in ("loss", "mse", "ssim", "nll", "val_loss", "val_mse", "val_ssim", "val_nll"):
            assert math.isfinite(record[key]), key
    assert latest_run(cfg.train.out, "mvtec", CATEGORY) == run_dir


def test_checkpoints_carry_config_and_rebuild_the_model(three_epochs: tuple[Config, Path]) -> None:
    cfg, run_dir = three_epochs
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        state = load_checkpoint(path)
        assert state["config"] == cfg.to_dict()
        rebuilt_cfg, model, _ = model_from_checkpoint(path)
        assert rebuilt_cfg == cfg
        assert not model.training
        _states_equal(model.state_dict(), state["model"])
        _, again, _ = model_from_checkpoint(path)
        with torch.no_grad():
            a, b = model(x), again(x)
        assert torch.equal(a.reconstruction, b.reconstruction)
        assert torch.equal(a.tokens, b.tokens)
        for ta, tb in zip(a.mixture, b.mixture):
            assert torch.equal(ta, tb)
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 2  # zero-based: the third epoch


def test_best_checkpoint_has_lowest_validation_loss(three_epochs: tuple[Config, Path]) -> None:
    _, run_dir = three_epochs
    history = _history(run_dir)
    losses = [r["val_loss"] for r in history]
    best_epoch = min(range(len(losses)), key=losses.__getitem__) + 1
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["epoch"] + 1 == best_epoch
    assert best["record"]["val_loss"] == pytest.approx(min(losses))
    assert best["best_val_loss"] == pytest.approx(min(losses))
    # Each record's flag says whether it improved on every earlier epoch.
    flags = [r["best"] for r in history]
    assert flags == [v < min(losses[:i], default=math.inf) for i, v in enumerate(losses)]


def test_resume_ends_where_an_uninterrupted_run_would(
    three_epochs: tuple[Config, Path], tmp_path: Path
) -> None:
    cfg_a, run_a = three_epochs
    cfg_b = cfg_a.override(train={"epochs": 1, "out": str(tmp_path / "runs_b")})
    run_b = fit(cfg_b)
    assert len(_history(run_b)) == 1
    resumed = fit(cfg_b.override(train={"epochs": 3}), run_dir=run_b)
    assert resumed == run_b

    final_a = load_checkpoint(run_a / "checkpoints" / "last.pt")
    final_b = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert final_b["epoch"] == final_a["epoch"] == 2
    _states_equal(final_a["model"], final_b["model"])
    history_a, history_b = _history(run_a), _history(run_b)
    assert [r["epoch"] for r in history_b] == [1, 2, 3]
    for ra, rb in zip(history_a, history_b):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    best_a = load_checkpoint(run_a / "checkpoints" / "best.pt")
    best_b = load_checkpoint(run_b / "checkpoints" / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    assert load_config(run_b / "config.yaml").train.epochs == 3


def test_resume_without_checkpoint(make_config, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no run"):
        latest_run(tmp_path / "runs", "mvtec", CATEGORY)
    # A given folder without a checkpoint is a new run there (a queued job's first attempt).
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert fit(make_config(epochs=1), run_dir=empty) == empty
    assert load_checkpoint(empty / "checkpoints" / "last.pt")["epoch"] == 0


def test_the_loop_refuses_strategies_it_does_not_launch(make_config) -> None:
    with pytest.raises(ConfigError, match="vtadl.runs.fit"):
        fit(make_config(strategy="ddp", num_workers=2))


class _StepCounter(Callbacks):
    def __init__(self) -> None:
        self.epochs_done = 0
        self.steps_this_epoch = 0

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        self.steps_this_epoch = step + 1

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.epochs_done += 1
        self.steps_this_epoch = 0


def test_non_finite_loss_names_epoch_and_step(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _StepCounter()
    real_loss = training.vtadl_loss

    def loss_that_breaks(*args: Any, **kwargs: Any) -> LossTerms:
        terms = real_loss(*args, **kwargs)
        # The second training step of the second epoch (validation runs without gradients).
        if torch.is_grad_enabled() and counter.epochs_done == 1 and counter.steps_this_epoch == 1:
            return terms._replace(total=terms.total * float("nan"))
        return terms

    monkeypatch.setattr(training, "vtadl_loss", loss_that_breaks)
    cfg = make_config(epochs=3)
    with pytest.raises(TrainingError) as excinfo:
        fit(cfg, callbacks=counter)
    message = str(excinfo.value)
    assert "nan" in message
    assert "epoch 2" in message and "step 2" in message
    # The first epoch's checkpoint survives, and the message points at it.
    run_dir = latest_run(cfg.train.out, "mvtec", CATEGORY)
    assert str(run_dir / "checkpoints") in message
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 0
    assert len(_history(run_dir)) == 1


def test_huge_learning_rate_fails_cleanly(make_config) -> None:
    # Without any patching: Adam's first step moves every weight by about lr = 1e30, so the
    # second step's loss is no longer finite.
    cfg = make_config(epochs=2, lr=1e30, grad_clip=0.0)
    with pytest.raises(TrainingError, match=r"epoch 1, step 2\b"):
        fit(cfg)
    # No epoch finished, so no history line and no checkpoint was written.
    parent = Path(cfg.train.out) / "mvtec" / CATEGORY
    assert len(list(parent.glob("*/checkpoints"))) == 1
    assert not list(parent.glob("*/history.jsonl"))
    assert not list(parent.glob("*/checkpoints/*.pt"))


def test_evaluate_run_writes_metrics_and_maps(three_epochs: tuple[Config, Path]) -> None:
    _, run_dir = three_epochs
    result = evaluate_run(run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == result
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["n_test"] == 4 + 4 * 2
    assert saved["n_anomalous"] == 8
    assert saved["best_epoch"] == load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] + 1
    pngs = sorted((run_dir / "maps").glob("*.png"))
    assert pngs
    with Image.open(pngs[0]) as img:
        assert img.width > 0 and img.height > 0
    assert (run_dir / "calibration.json").is_file()


def test_an_outdated_calibration_is_recomputed(three_epochs: tuple[Config, Path]) -> None:
    from vtadl.scoring.scorer import Scorer

    _, run_dir = three_epochs
    path = run_dir / "calibration.json"
    fresh = Scorer(run_dir).calibration
    assert json.loads(path.read_text()) == fresh.to_dict()
    # The flat layout an earlier version wrote: read as missing, computed again, rewritten.
    path.write_text(json.dumps({"nll_mean": 1.0, "nll_std": 2.0, "image_threshold": 3.0}))
    assert Scorer(run_dir).calibration == fresh
    assert json.loads(path.read_text()) == fresh.to_dict()
    # Another scale is calibrated afresh and leaves the run's own calibration alone.
    linear = Scorer(run_dir, eval_overrides={"scale": "linear"}).calibration
    assert linear.scale == "linear" and linear != fresh
    assert json.loads(path.read_text()) == fresh.to_dict()


def test_predict_writes_scores_and_heatmaps(
    three_epochs: tuple[Config, Path], demo_root: Path, tmp_path: Path
) -> None:
    _, run_dir = three_epochs
    folder = demo_root / CATEGORY / "test" / "good"
    single = demo_root / CATEGORY / "test" / "stain" / "000.png"
    out = tmp_path / "pred"
    result = predict(run_dir, [folder, single], out)
    n_images = len(list(folder.glob("*.png"))) + 1
    assert n_images == 5
    saved = json.loads((out / "scores.json").read_text())
    assert saved == result and saved["failed"] == []
    rows = saved["images"]
    assert len(rows) == n_images
    assert rows[-1]["image"] == str(single) and rows[-1]["heatmap"] == "stain/000.png"
    assert rows[0]["heatmap"] == "good/000.png"
    for row in rows:
        assert math.isfinite(row["score"])
        assert (out / row["heatmap"]).is_file()
    assert len(list(out.rglob("*.png"))) == n_images


def test_grid_shifts_give_a_finer_map_and_are_recorded(make_config) -> None:
    from vtadl.evaluation import evaluate_run

    run = fit(make_config(epochs=1))
    plain = evaluate_run(run, eval_overrides={"grid_shifts": 1})
    shifted = evaluate_run(run)  # the default
    assert plain["grid_shifts"] == 1 and shifted["grid_shifts"] == 4
    assert json.loads((run / "metrics.json").read_text())["grid_shifts"] == 4
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0 <= shifted[key] <= 1
    assert shifted["pixel_auroc"] != plain["pixel_auroc"]  # other offsets were scored


def _strict_history(run_dir: Path) -> list[dict[str, Any]]:
    """history.jsonl read as strict JSON: a bare NaN or Infinity is an error."""
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []

    def refuse(constant: str) -> None:
        raise ValueError(f"history.jsonl holds {constant}")

    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln, parse_constant=refuse) for ln in lines]


def test_divergence_is_stopped_and_named(make_config) -> None:
    # lr 1e3 with the default gradient clipping: every loss stays finite, but the NLL grows
    # by many orders of magnitude; the run must not go on to report near-chance metrics.
    # (The mixture trained with the network, as published: a reconstruction loss alone is
    # bounded and cannot run away.)
    cfg = make_config(epochs=3, lr=1e3, mixture_fit="sgd").override(
        model={"mdn_condition": "token", "mdn_detach": False}
    )
    with pytest.raises(TrainingError) as excinfo:
        fit(cfg)
    message = str(excinfo.value)
    assert "diverged" in message and "learning rate" in message
    assert "epoch 1, step " in message
    (run_dir,) = (Path(cfg.train.out) / "mvtec" / CATEGORY).iterdir()
    assert _strict_history(run_dir) == []


def test_non_finite_validation_loss_is_named(make_config) -> None:
    # One batch per epoch (11 training images, batch 16): the only step's loss is finite,
    # and its update of about lr = 1e30 leaves weights that give no finite validation loss.
    cfg = make_config(epochs=2, lr=1e30, grad_clip=0.0, batch_size=16)
    with pytest.raises(TrainingError) as excinfo:
        fit(cfg)
    message = str(excinfo.value)
    assert "validation loss" in message and "epoch 1" in message and "step 1" in message
    assert "learning rate" in message
    (run_dir,) = (Path(cfg.train.out) / "mvtec" / CATEGORY).iterdir()
    assert _strict_history(run_dir) == []
    assert not (run_dir / "checkpoints" / "best.pt").exists()


def test_test_split_without_anomalies_fails_before_training(
    demo_copy: Path, config_for, tmp_path: Path
) -> None:
    import shutil

    category = demo_copy / CATEGORY
    for folder in [*(category / "test").iterdir(), category / "ground_truth"]:
        if folder.name != "good":
            shutil.rmtree(folder)
    cfg = config_for(demo_copy, tmp_path / "runs")
    with pytest.raises(DataError, match=r"test split .* no anomalous images") as excinfo:
        fit(cfg)
    assert str(category / "test") in str(excinfo.value)
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_mnist_test_split_has_its_anomalies(tmp_path: Path) -> None:
    # For MNIST the other digits are the anomalies: the split check must let it train.
    from sklearn.datasets import load_digits

    from vtadl.config import default_config
    from vtadl.data.mnist import MNIST_FILES, write_idx
    from vtadl.training import prepare_source

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    for key, values in [("train_images", images[:300]), ("train_labels", labels[:300])]:
        write_idx(tmp_path / MNIST_FILES[key], values)
    for key, values in [("test_images", images[300:400]), ("test_labels", labels[300:400])]:
        write_idx(tmp_path / MNIST_FILES[key], values)
    cfg = default_config("vtadl_tiny").override(
        data={"dataset": "mnist", "root": str(tmp_path), "category": "3", "pack": "none"},
        train={"out": str(tmp_path / "runs")},
    )
    labels_seen = [item.label for item in prepare_source(cfg).items("test")]
    assert 0 < sum(labels_seen) < len(labels_seen)


def test_token_noise_is_drawn_per_global_batch() -> None:
    # Worker r of w takes rows r, r+w, ... of the global batch's noise, as it takes those
    # images: together the workers use exactly the noise one process would.
    from vtadl.sampling import token_noise

    single = token_noise((5, 3), seed=1, epoch=2, step=7, batch=8, rank=0, world=1)
    assert single.shape == (8, 5, 3)
    for world in (2, 4):
        parts = [token_noise((5, 3), 1, 2, 7, 8, rank, world) for rank in range(world)]
        for rank, part in enumerate(parts):
            assert torch.equal(part, single[rank::world])
    other_step = token_noise((5, 3), seed=1, epoch=2, step=8, batch=8, rank=0, world=1)
    assert not torch.equal(other_step, single)
