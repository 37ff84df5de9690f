"""The training loop: one function of a config.

`fit(config)` builds data, model and optimiser, trains, checkpoints every epoch with the
config inside, keeps the checkpoint with the lowest validation loss (held-out normal training
images, never the test split) and returns the run folder. `fit(config, run_dir=...)` resumes
from that folder's last checkpoint and ends where an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vtadl.config import Config, save_config, validate
from vtadl.data.source import category_source
from vtadl.exceptions import RunError, TrainingError
from vtadl.losses import vtadl_loss
from vtadl.model import VTADL, build_model

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


class Callbacks:
    """Hooks for progress display or reporting; every method is optional."""

    def on_train_start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None: ...
    def on_step(self, epoch: int, step: int, loss: float) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def new_run_dir(config: Config) -> Path:
    d = config.data
    parent = Path(config.train.out) / d.dataset / d.category
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir, n = parent / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{stamp}-{n}"
    return run_dir


def latest_run(out: str | Path, dataset: str, category: str) -> Path:
    """The newest run folder of a category that has a checkpoint to resume from."""
    parent = Path(out) / dataset / category
    runs = sorted(p.parent.parent for p in parent.glob(f"*/checkpoints/{LAST}"))
    if not runs:
        raise RunError(f"no run with a checkpoint to resume under {parent}")
    return runs[-1]


def save_checkpoint(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise RunError(f"checkpoint {path} cannot be read: {exc}") from None


def model_from_checkpoint(path: str | Path) -> tuple[Config, VTADL, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with, from the config inside it."""
    state = load_checkpoint(path)
    config = Config.from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    return config, model.eval(), state


@dataclass
class _Batches:
    train: DataLoader
    val: DataLoader


def _loaders(config: Config) -> _Batches:
    t, workers = config.train, config.data.num_workers
    source = category_source(config)
    train, val = source.dataset("train"), source.dataset("val")
    # Shuffling draws from the sampler's generator, reseeded each epoch in `fit`.
    gen = torch.Generator()
    return _Batches(
        train=DataLoader(
            train,
            batch_size=t.batch_size,
            shuffle=True,
            generator=gen,
            drop_last=len(train) > t.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
        ),
        val=DataLoader(val, batch_size=t.batch_size, num_workers=workers),
    )


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, drawn from `gen` so a resumed run repeats them."""
    flip_h, flip_v = torch.rand(2, images.shape[0], generator=gen) < 0.5
    images = torch.where(flip_h[:, None, None, None], images.flip(3), images)
    return torch.where(flip_v[:, None, None, None], images.flip(2), images)


def _loss(model: VTADL, images: torch.Tensor, config: Config):
    t = config.train
    with autocast(images.device, t.precision):
        out = model(images)
    return vtadl_loss(
        images,
        out.reconstruction,
        out.tokens,
        out.mixture,
        w_mse=t.w_mse,
        w_ssim=t.w_ssim,
        w_nll=t.w_nll,
        mdn_loss=t.mdn_loss,
    )


@torch.no_grad()
def validation_loss(model: VTADL, loader: DataLoader, config: Config, device: torch.device):
    model.eval()
    sums, n = np.zeros(4), 0
    for images in loader:
        images = images.to(device)
        sums += np.array([float(v) for v in _loss(model, images, config)]) * len(images)
        n += len(images)
    return dict(zip(("val_loss", "val_mse", "val_ssim", "val_nll"), (sums / n).tolist()))


def fit(
    config: Config, *, run_dir: str | Path | None = None, callbacks: Callbacks | None = None
) -> Path:
    """Train `config` in this process; with `run_dir`, resume that run. Returns the run folder."""
    config = validate(config)
    callbacks = callbacks or Callbacks()
    t = config.train
    device = pick_device(t.device)
    resume = run_dir is not None
    run_dir = Path(run_dir) if resume else new_run_dir(config)
    ckpt_dir = run_dir / "checkpoints"

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    batches = _loaders(config)
    model = build_model(config.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    start, best = 0, math.inf
    if resume:
        state = load_checkpoint(ckpt_dir / LAST)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, best = state["epoch"] + 1, state["best_val_loss"]
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])
        if start >= t.epochs:
            log.info("run %s already finished %d epochs", run_dir, t.epochs)
        _truncate_history(run_dir / "history.jsonl", start)
        (run_dir / "calibration.json").unlink(missing_ok=True)
    else:
        ckpt_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    writer = _tensorboard(run_dir)

    callbacks.on_train_start(run_dir, t.epochs, len(batches.train))
    aug_gen = torch.Generator()
    for epoch in range(start, t.epochs):
        model.train()
        batches.train.generator.manual_seed(t.seed * 100_003 + epoch)
        aug_gen.manual_seed(t.seed * 100_019 + epoch)
        tic, sums, n = time.perf_counter(), np.zeros(4), 0
        for step, images in enumerate(batches.train):
            images = images.to(device, non_blocking=True)
            if config.data.augment:
                images = _augment(images, aug_gen)
            terms = _loss(model, images, config)
            if not torch.isfinite(terms.total):
                raise TrainingError(
                    f"loss became {float(terms.total)} at epoch {epoch + 1}, step {step + 1} "
                    f"(mse {float(terms.mse):.4g}, nll {float(terms.nll):.4g}); "
                    + (
                        f"the last good checkpoint is in {ckpt_dir}; "
                        if (ckpt_dir / LAST).exists()
                        else ""
                    )
                    + "try a lower learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            sums += np.array([float(v.detach()) for v in terms]) * len(images)
            n += len(images)
            callbacks.on_step(epoch, step, float(terms.total.detach()))
        record = {
            "epoch": epoch + 1,
            **dict(zip(("loss", "mse", "ssim", "nll"), (sums / n).tolist())),
        }
        record.update(validation_loss(model, batches.val, config, device))
        record["seconds"] = round(time.perf_counter() - tic, 3)
        record["images_per_second"] = round(n / record["seconds"], 3)
        is_best = record["val_loss"] < best
        best = min(best, record["val_loss"])
        record["best"] = is_best
        state = {
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "rng": torch.get_rng_state(),
            "best_val_loss": best,
            "record": record,
        }
        save_checkpoint(ckpt_dir / LAST, **state)
        if is_best:
            save_checkpoint(ckpt_dir / BEST, **state)
        with open(run_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("loss", "mse", "ssim", "nll", "val_loss", "val_nll", "images_per_second"):
            writer.add_scalar(key, record[key], epoch + 1)
        writer.flush()
        log.info("epoch %d: %s", epoch + 1, record)
        callbacks.on_epoch_end(record)
    writer.close()
    return run_dir


def _truncate_history(path: Path, epochs_done: int) -> None:
    """Drop history lines of epochs after the checkpoint a resumed run starts from."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in kept))


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))
