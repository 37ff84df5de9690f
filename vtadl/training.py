"""The training loop: one function of a config.

`fit(config)` builds data, model and optimiser, trains in this process, checkpoints every
epoch with the config inside, keeps the checkpoint with the lowest validation loss (held-out
normal training images, never the test split) and returns the run folder.
`fit(config, run_dir=...)` trains in that folder: it resumes from the folder's last checkpoint
if there is one and ends where an uninterrupted run would. The loop knows nothing of
launchers: `vtadl.runs.fit` picks this function or `vtadl.distributed.fit_distributed` by the
config's strategy.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from vtadl.config import Config, save_config, validate
from vtadl.data.prepare import to_float
from vtadl.data.source import category_source
from vtadl.exceptions import ConfigError, RunError, TrainingError
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


class EpochBatches(Sampler[list[int]]):
    """Global batches of a seeded permutation per epoch; each worker takes its slice.

    Worker r of w gets items r, r+w, ... of each global batch, so the workers of a
    distributed run see exactly the global batches a single process would see, whatever
    their number. Call `set_epoch` before iterating.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        # A last partial batch is dropped, unless it is the only one.
        self.n_batches = max(1, n // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen)
        return [
            perm[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.n_batches)
        ]

    def __iter__(self):
        for batch in self.batches():
            yield batch[self.rank :: self.world].tolist()

    def __len__(self) -> int:
        return self.n_batches


def _flips(seed: int, epoch: int, step: int, batch: int, rank: int, world: int) -> torch.Tensor:
    """Horizontal and vertical flip decisions (2, local batch) for one step, drawn for the
    global batch so that they do not depend on the number of workers."""
    gen = torch.Generator().manual_seed(seed * 100_019 + epoch * 10_007 + step)
    return (torch.rand(2, batch, generator=gen) < 0.5)[:, rank::world]


def _augment(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    flip_h, flip_v = (
        flips[0, : len(images), None, None, None],
        flips[1, : len(images), None, None, None],
    )
    images = torch.where(flip_h.to(images.device), images.flip(3), images)
    return torch.where(flip_v.to(images.device), images.flip(2), images)


def loss_terms(model: torch.nn.Module, images: torch.Tensor, config: Config, cast=None):
    """The configured loss of one batch; `cast` is the input dtype of an engine that keeps
    the model in it (DeepSpeed bf16), else autocast follows `train.precision`."""
    t = config.train
    with autocast(images.device, "fp32" if cast else t.precision):
        out = model(images.to(cast) if cast else images)
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
def validation_loss(
    model: VTADL, loader: DataLoader, config: Config, device: torch.device, cast=None
):
    model.eval()
    sums, n = np.zeros(4), 0
    for images in loader:
        images = to_float(images.to(device))
        sums += np.array([float(v) for v in loss_terms(model, images, config, cast)]) * len(images)
        n += len(images)
    return dict(zip(("val_loss", "val_mse", "val_ssim", "val_nll"), (sums / n).tolist()))


class Engine:
    """A model and its optimiser as the loop drives them; subclassed for DeepSpeed."""

    cast: torch.dtype | None = None  # input dtype when the engine keeps the model in it

    def __init__(self, model: VTADL, optimizer, grad_clip: float, wrapped=None) -> None:
        self.module, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.forward_module = wrapped or model

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()

    def state(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class Workers:
    """Where the loop runs. This base class is one process; `vtadl.distributed` subclasses
    it for Ray Train workers (DDP or DeepSpeed)."""

    rank, world = 0, 1

    def device(self, config: Config) -> torch.device:
        return pick_device(config.train.device)

    def engine(self, model: VTADL, config: Config) -> Engine:
        t = config.train
        optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        return Engine(model, optimizer, t.grad_clip)

    def checkpoint_to_resume(self, run_dir: Path) -> dict[str, Any] | None:
        path = run_dir / "checkpoints" / LAST
        return load_checkpoint(path) if path.exists() else None

    def restore(self, engine: Engine, state: dict[str, Any], run_dir: Path) -> None:
        engine.load(state)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def report(self, record: dict, state: dict, run_dir: Path, engine: Engine) -> None:
        """After each epoch, once rank 0 has written the run folder."""


def fit(
    config: Config, *, run_dir: str | Path | None = None, callbacks: Callbacks | None = None
) -> Path:
    """Train `config` in this process (strategy single); returns the run folder."""
    config = validate(config)
    if config.train.strategy != "single":
        raise ConfigError(
            f"strategy {config.train.strategy!r} runs on Ray Train: call vtadl.runs.fit"
        )
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    train_loop(config, run_dir, Workers(), callbacks or Callbacks())
    return run_dir


def train_loop(config: Config, run_dir: Path, workers: Workers, callbacks: Callbacks) -> None:
    """The loop itself, the same in one process and in every distributed worker."""
    t, rank, world = config.train, workers.rank, workers.world
    lead = rank == 0
    ckpt_dir = run_dir / "checkpoints"
    device = workers.device(config)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    source = category_source(config)
    train_set, val_set = source.dataset("train"), source.dataset("val")
    sampler = EpochBatches(len(train_set), t.batch_size, seed=t.seed, rank=rank, world=world)
    nw, pin = config.data.num_workers, device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=nw, persistent_workers=nw > 0, pin_memory=pin
    )
    val_loader = DataLoader(val_set, batch_size=t.batch_size, num_workers=nw, pin_memory=pin)
    engine = workers.engine(build_model(config.model).to(device), config)
    # Noise on the tokens is drawn per worker.
    torch.manual_seed(t.seed + rank)

    start, best = 0, math.inf
    state = workers.checkpoint_to_resume(run_dir)
    if state is not None:
        workers.restore(engine, state, run_dir)
        torch.set_rng_state(state["rng"])
        start, best = state["epoch"] + 1, state["best_val_loss"]
        log.info("resuming %s after epoch %d", run_dir, state["epoch"] + 1)
    if lead:
        # A restarted worker group may begin before epochs the history already shows.
        _truncate_history(run_dir / "history.jsonl", start)
        (run_dir / "calibration.json").unlink(missing_ok=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    writer = _tensorboard(run_dir) if lead else None

    callbacks.on_train_start(run_dir, t.epochs, len(train_loader))
    for epoch in range(start, t.epochs):
        engine.module.train()
        sampler.set_epoch(epoch)
        tic, sums = time.perf_counter(), np.zeros(5)
        for step, images in enumerate(train_loader):
            images = to_float(images.to(device, non_blocking=True))
            if config.data.augment:
                images = _augment(images, _flips(t.seed, epoch, step, t.batch_size, rank, world))
            terms = loss_terms(engine.forward_module, images, config, engine.cast)
            if not torch.isfinite(terms.total):
                raise TrainingError(
                    f"loss became {float(terms.total.detach())} at epoch {epoch + 1}, "
                    f"step {step + 1} (mse {float(terms.mse):.4g}, nll {float(terms.nll):.4g}); "
                    + (
                        f"the last good checkpoint is in {ckpt_dir}; "
                        if (ckpt_dir / LAST).exists()
                        else ""
                    )
                    + "try a lower learning rate"
                )
            engine.step(terms.total)
            sums += np.array([*(float(v.detach()) for v in terms), 1.0]) * len(images)
            callbacks.on_step(epoch, step, float(terms.total.detach()))
        sums = workers.all_sum(sums)
        record = {
            "epoch": epoch + 1,
            **dict(zip(("loss", "mse", "ssim", "nll"), (sums[:4] / sums[4]).tolist())),
        }
        record.update(validation_loss(engine.module, val_loader, config, device, engine.cast))
        record["seconds"] = round(time.perf_counter() - tic, 3)
        record["images_per_second"] = round(float(sums[4]) / record["seconds"], 3)
        record["global_batch_size"] = t.batch_size
        record["per_worker_batch_size"] = len(range(rank, min(t.batch_size, len(train_set)), world))
        record["workers"] = world
        is_best = record["val_loss"] < best
        best = min(best, record["val_loss"])
        record["best"] = is_best
        state = {
            "config": config.to_dict(),
            **engine.state(),
            "epoch": epoch,
            "rng": torch.get_rng_state(),
            "best_val_loss": best,
            "record": record,
        }
        if lead:
            save_checkpoint(ckpt_dir / LAST, **state)
            if is_best:
                save_checkpoint(ckpt_dir / BEST, **state)
            with open(run_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            for key in ("loss", "mse", "ssim", "nll", "val_loss", "val_nll", "images_per_second"):
                writer.add_scalar(key, record[key], epoch + 1)
            writer.flush()
        workers.report(record, state, run_dir, engine)
        log.info("epoch %d: %s", epoch + 1, record)
        callbacks.on_epoch_end(record)
    if writer is not None:
        writer.close()


def _truncate_history(path: Path, epochs_done: int) -> None:
    """Drop history lines of epochs after the checkpoint a resumed run starts from."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in kept))


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))
