"""The checkpoint policy, weights-only best.pt, resume after a crash, honest history figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import vtadl.training as training
from vtadl.checkpoints import (
    CheckpointPolicy,
    CheckpointWriter,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from vtadl.exceptions import TrainingError
from vtadl.run_folders import latest_run
from vtadl.runs import train_and_evaluate
from vtadl.training import Callbacks, fit


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines()]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_policy_is_due_by_epochs_by_minutes_and_at_the_end() -> None:
    clock = _Clock()
    by_epochs = CheckpointPolicy(3, 0, 10, clock=clock)
    assert [by_epochs.due(e) for e in (1, 2, 3)] == [False, False, True]
    by_epochs.saved(3)
    clock.now = 1e6  # time alone never makes it due when minutes are off
    assert not by_epochs.due(5) and by_epochs.due(6) and by_epochs.due(10)

    clock.now = 0.0
    by_time = CheckpointPolicy(0, 2, 100, clock=clock)
    clock.now = 119.0
    assert not by_time.due(50)
    clock.now = 120.0
    assert by_time.due(51)
    by_time.saved(51)
    clock.now = 200.0
    assert not by_time.due(52) and by_time.due(100)

    either = CheckpointPolicy(5, 1, 100, start=10, clock=clock)  # resumed after epoch 10
    assert not either.due(11)
    clock.now += 60
    assert either.due(11)
    either.saved(11)
    assert either.due(16)


def test_a_write_interrupted_midway_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, epoch=1)

    def crash(obj, f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    writer = CheckpointWriter(background=True)
    writer.submit(path, {"epoch": 2})
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}


def test_best_is_weights_only_and_loads_for_evaluation(make_config) -> None:
    run = fit(make_config(epochs=2))
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert "optimizer" not in best and "rng" not in best
    assert {"optimizer", "rng", "model", "config"} <= set(last)
    assert best["best_val_loss"] == min(r["val_loss"] for r in _history(run))
    config, model, _ = model_from_checkpoint(run / "checkpoints" / "best.pt")
    assert config.to_dict() == best["config"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best["model"][key])


class _CrashAfter(Callbacks):
    """Stands in for a killed process: fails once the given epoch has been recorded."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resume_loses_at_most_one_interval(make_config) -> None:
    # Written at once, so that no due checkpoint waits for a slow write (the bound is then
    # one interval; with background writes, one interval and one write).
    config = make_config(
        epochs=6, checkpoint_every_epochs=2, checkpoint_every_minutes=0, checkpoint_background=False
    )
    with pytest.raises(KeyboardInterrupt):
        fit(config, callbacks=_CrashAfter(5))
    run = latest_run(config.train.out, "mvtec", "brick")
    before = _history(run)
    assert [r["checkpoint"] for r in before] == [False, True, False, True, False]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] + 1 == 4
    fit(config, run_dir=run)
    after = _history(run)
    assert [r["epoch"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert after[:4] == before[:4]  # only epoch 5, less than one interval, was trained again
    assert after[4]["val_loss"] == pytest.approx(before[4]["val_loss"], rel=1e-5)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 5


def test_losses_read_rarely_still_name_the_failing_step(make_config, monkeypatch) -> None:
    # As on a GPU, but rarer still: the losses are read once, at the end of the epoch.
    monkeypatch.setattr(training, "host_sync_seconds", lambda device: math.inf)
    steps: list[tuple[int, int]] = []

    class Steps(Callbacks):
        def on_step(self, epoch: int, step: int, loss: float) -> None:
            steps.append((epoch, step))

    fit(make_config(epochs=2), callbacks=Steps())
    assert steps == [(e, s) for e in (0, 1) for s in (0, 1)]  # 11 images, batch 4
    with pytest.raises(TrainingError, match=r"epoch 1, step 2\b"):
        fit(make_config(epochs=2, lr=1e30, grad_clip=0.0))


def test_history_and_timing_are_honest_about_wall_time(make_config) -> None:
    run, result = train_and_evaluate(make_config(epochs=2))
    history = _history(run)
    for r in history:
        assert r["images"] == 8
        assert r["wall_seconds"] >= r["train_seconds"] + r["val_seconds"]
        assert r["wall_images_per_second"] <= r["images_per_second"]
        assert r["seconds"] == r["wall_seconds"]
    timing = json.loads((run / "timing.json").read_text())
    assert timing == result["timing"]
    assert timing["epochs"] == 2 and timing["images"] == 16
    epochs_wall = sum(r["wall_seconds"] for r in history)
    assert timing["wall_seconds"] >= timing["fit_seconds"] >= epochs_wall
    assert timing["wall_images_per_second"] <= timing["images_per_second"]
