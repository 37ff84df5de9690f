"""The training loop: one function of a config.

`fit(config)` builds data, model and optimiser, trains in this process and returns the run
folder. It keeps the weights with the lowest validation loss (held-out normal training images,
never the test split) in best.pt and the state to resume from in last.pt, as often as
`vtadl.checkpoints.CheckpointPolicy` says (by default every epoch, written in the background).
`fit(config, run_dir=...)` trains in that folder: it resumes from the folder's last checkpoint
if there is one and ends where an uninterrupted run would. The loop knows nothing of
launchers: `vtadl.runs.fit` picks this function or `vtadl.distributed.fit_distributed` by the
config's strategy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vtadl.checkpoints import LAST, EpochCheckpoints, load_checkpoint
from vtadl.config import (
    FITTED_AFTER_TRAINING,
    Config,
    TrainConfig,
    absolute_paths,
    gaussians,
    save_config,
    validate,
)
from vtadl.data.prepare import to_float
from vtadl.data.source import Source, category_source
from vtadl.devices import autocast, pick_device, set_tf32, to_device
from vtadl.exceptions import ConfigError, DataError, TrainingError
from vtadl.losses import vtadl_loss
from vtadl.model import VTADL, build_model
from vtadl.run_folders import ensure_writable, new_run_dir, truncate_history
from vtadl.sampling import EpochBatches, augment, flips, token_noise

log = logging.getLogger(__name__)

# A training loss this many times larger in size than the run's first (or 1, if that is
# smaller) means training diverged: the loss terms are bounded below, and a healthy run's
# loss falls from its first value.
DIVERGENCE_FACTOR = 1e3
# On an accelerator the loop reads the step losses (a host synchronisation) about this often,
# not every step; a CPU has nothing to wait for, so it reads them every step.
HOST_SYNC_SECONDS = 1.0


class Callbacks:
    """Hooks for progress display or reporting; every method is optional.

    `on_step` comes for every step in order, but on an accelerator in bursts about once a
    second (the loop reads the losses from the device that rarely). Set `reads_checkpoints`
    False if `on_epoch_end` does not open the run's checkpoint files: the loop then does not
    wait for a new best.pt to be on disk before calling it.
    """

    reads_checkpoints = True

    def on_train_start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None: ...
    def on_step(self, epoch: int, step: int, loss: float) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


class NoCallbacks(Callbacks):
    reads_checkpoints = False


def adam(model: torch.nn.Module, t: TrainConfig, fused: bool = False) -> torch.optim.Adam:
    return torch.optim.Adam(
        model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused or None
    )


def loss_terms(model: torch.nn.Module, images: torch.Tensor, config: Config, cast=None, noise=None):
    """The configured loss of one batch; `cast` is the input dtype of an engine that keeps
    the model in it (DeepSpeed bf16), else autocast follows `train.precision`; `noise`
    (optional) is the standard normal noise for the tokens."""
    t = config.train
    with autocast(images.device, "fp32" if cast else t.precision):
        out = model(images.to(cast) if cast else images, noise=noise)
    return vtadl_loss(
        images,
        out.reconstruction,
        out.tokens,
        out.mixture,
        w_mse=t.w_mse,
        w_ssim=t.w_ssim,
        w_nll=0.0 if trains_without_mixture(config) else t.w_nll,
        mdn_loss=t.mdn_loss,
    )


def training_model(config: Config, device: torch.device) -> VTADL:
    """A new model of the config on `device`, ready to train: with the mixture fitted after
    training, its head is frozen, so that DDP and DeepSpeed do not wait for gradients that
    never come."""
    model = build_model(config.model, head_gaussians(config)).to(device)
    if trains_without_mixture(config):
        model.mdn.requires_grad_(False)
    return model


def head_gaussians(config: Config) -> int:
    """The size of the model's mixture head: K when the head is trained (sgd, or a fit after
    training whose head still shapes the encoder without mdn_detach), else one component:
    the head is then never trained nor scored (the fitted mixture is an object of its own,
    vtadl.scoring.mixtures), so that K does not change the network that is trained."""
    if trains_without_mixture(config):
        return 1
    k = gaussians(config)
    if not isinstance(k, int):
        raise ConfigError(
            f"n_gaussians {k} needs a mixture fitted after training with mdn_detach; a "
            "trained head needs a number"
        )
    return k


def trains_without_mixture(config: Config) -> bool:
    """Whether training leaves the mixture out: it is fitted afterwards and its
    gradient would not reach the encoder anyway (mdn_detach). The loss, validation loss
    included, is then the reconstruction's alone."""
    return config.train.mixture_fit in FITTED_AFTER_TRAINING and config.model.mdn_detach


@torch.no_grad()
def validation_loss(
    model: VTADL, loader: DataLoader, config: Config, device: torch.device, cast=None
):
    model.eval()
    sums, n = torch.zeros(4, device=device), 0
    for images in loader:
        images = to_float(images.to(device, non_blocking=True))
        terms = loss_terms(model, images, config, cast)
        sums += torch.stack([v.detach().float() for v in terms]) * len(images)
        n += len(images)
    means = (sums / n).tolist()  # the validation's one host synchronisation
    return dict(zip(("val_loss", "val_mse", "val_ssim", "val_nll"), means))


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
        self.module.load_state_dict(own_frozen_head(self.module, state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])


def own_frozen_head(model: torch.nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    """`weights` with the model's own mixture head where that head is frozen and the stored
    one has another size: a run of an earlier version, whose unused head had K components,
    resumes with today's one-component placeholder (`head_gaussians`)."""
    head = getattr(model, "mdn", None)
    if head is None or any(p.requires_grad for p in head.parameters()):
        return weights
    own = {f"mdn.{k}": v for k, v in head.state_dict().items()}
    if all(k in weights and weights[k].shape == v.shape for k, v in own.items()):
        return weights
    return {**{k: v for k, v in weights.items() if not k.startswith("mdn.")}, **own}


class Workers:
    """Where the loop runs. This base class is one process; `vtadl.distributed` subclasses
    it for Ray Train workers (DDP or DeepSpeed)."""

    rank, world = 0, 1
    keeps_checkpoints = False  # whether `report` keeps the resumable state itself

    def device(self, config: Config) -> torch.device:
        return pick_device(config.train.device)

    def engine(self, model: VTADL, config: Config) -> Engine:
        t = config.train
        engine = Engine(model, adam(model, t, t.fused_adam), t.grad_clip)
        if t.compile:
            engine.forward_module = torch.compile(model)
        return engine

    def checkpoint_to_resume(self, run_dir: Path) -> dict[str, Any] | None:
        path = run_dir / "checkpoints" / LAST
        return load_checkpoint(path) if path.exists() else None

    def restore(self, engine: Engine, state: dict[str, Any], run_dir: Path) -> None:
        engine.load(state)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def report(self, record: dict, state: dict | None, run_dir: Path, engine: Engine) -> None:
        """After each epoch, once rank 0 has written the run folder; `state` is the resumable
        state when a checkpoint is due, else None."""


def fit(
    config: Config, *, run_dir: str | Path | None = None, callbacks: Callbacks | None = None
) -> Path:
    """Train `config` in this process (strategy single); returns the run folder."""
    config = absolute_paths(validate(config))
    if config.train.strategy != "single":
        raise ConfigError(
            f"strategy {config.train.strategy!r} runs on Ray Train: call vtadl.runs.fit"
        )
    pick_device(config.train.device)
    ensure_writable(Path(config.train.out))
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    train_loop(config, run_dir, Workers(), callbacks or NoCallbacks())
    return run_dir


def prepare_source(config: Config) -> Source:
    """The category's images (packed first if the config says so), refused when its test
    split cannot be evaluated: the metrics need normal and anomalous test images."""
    source = category_source(config)
    labels = [item.label for item in source.items("test")]
    anomalous = sum(1 for label in labels if label)
    if 0 < anomalous < len(labels):
        return source
    d = config.data
    missing = "images" if not labels else "anomalous images" if not anomalous else "normal images"
    where = Path(d.root) / d.category / "test" if d.dataset != "mnist" else Path(d.root)
    raise DataError(
        f"the test split of {d.dataset}/{d.category} has no {missing} ({len(labels)} in "
        f"{where}); the metrics need normal and anomalous test images"
    )


def train_loop(config: Config, run_dir: Path, workers: Workers, callbacks: Callbacks) -> None:
    """The loop itself, the same in one process and in every distributed worker."""
    t, lead = config.train, workers.rank == 0
    device = workers.device(config)
    set_tf32(device, t.tf32)
    _seed_everything(t.seed)
    source = prepare_source(config)
    sampler, train_loader, val_loader = _loaders(config, source, workers, device)
    engine = workers.engine(training_model(config, device), config)
    start, best, first_loss = _resume(workers, engine, run_dir)
    if lead:
        _prepare_folder(run_dir, config, start)
    writer = _tensorboard(run_dir) if lead else None
    checkpoints = EpochCheckpoints(
        config,
        run_dir / "checkpoints",
        lead=lead,
        start=start,
        best=best,
        keeps_checkpoints=workers.keeps_checkpoints,
        wait_for_best=getattr(callbacks, "reads_checkpoints", True),
    )
    steps = _Steps(config, workers, callbacks, device, checkpoints.folder, first_loss)
    callbacks.on_train_start(run_dir, t.epochs, len(train_loader))
    wall = time.perf_counter()
    try:
        for epoch in range(start, t.epochs):
            engine.module.train()
            sampler.set_epoch(epoch)
            tic = time.perf_counter()
            sums = steps.epoch(engine, train_loader, epoch)
            train_seconds = time.perf_counter() - tic
            sums = workers.all_sum(np.append(sums, float(checkpoints.due(epoch + 1))))
            losses = (sums[:4] / sums[4]).tolist()
            record = {"epoch": epoch + 1, **dict(zip(("loss", "mse", "ssim", "nll"), losses))}
            tic = time.perf_counter()
            record.update(validation_loss(engine.module, val_loader, config, device, engine.cast))
            _check_validation(record, len(train_loader), checkpoints.folder, t.lr)
            record.update(_epoch_figures(config, workers, sums[4], tic, train_seconds, sampler.n))
            tic = time.perf_counter()
            extra = {"rng": torch.get_rng_state(), "first_loss": steps.first_loss}
            resumable = checkpoints.keep(epoch, record, engine.state, extra, due=bool(sums[5]))
            workers.report(record, resumable, run_dir, engine)
            checkpoints.settle()
            record["checkpoint_seconds"] = round(time.perf_counter() - tic, 3)
            wall = _clock_epoch(record, sums[4], wall)
            if lead:
                _log_epoch(run_dir, writer, record)
            log.info("epoch %d: %s", epoch + 1, record)
            callbacks.on_epoch_end(record)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the first error; finish what is written
            checkpoints.close()
        raise
    finally:
        if writer is not None:
            writer.close()
    checkpoints.close()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _loaders(config: Config, source: Source, workers: Workers, device: torch.device):
    """The epoch sampler and the training and validation loaders of this worker."""
    t, nw, pin = config.train, config.data.num_workers, device.type == "cuda"
    train_set, val_set = source.dataset("train"), source.dataset("val")
    sampler = EpochBatches(
        len(train_set), t.batch_size, seed=t.seed, rank=workers.rank, world=workers.world
    )
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=nw, persistent_workers=nw > 0, pin_memory=pin
    )
    # Persistent loader processes are forked once, before the checkpoint thread starts.
    val_loader = DataLoader(
        val_set, batch_size=t.batch_size, num_workers=nw, persistent_workers=nw > 0, pin_memory=pin
    )
    return sampler, train_loader, val_loader


def _resume(workers: Workers, engine: Engine, run_dir: Path) -> tuple[int, float, float | None]:
    """The first epoch to train, the best validation loss so far and the run's first loss:
    from the run folder's checkpoint when there is one to resume from."""
    state = workers.checkpoint_to_resume(run_dir)
    if state is None:
        return 0, math.inf, None
    workers.restore(engine, state, run_dir)
    torch.set_rng_state(state["rng"])
    log.info("resuming %s after epoch %d", run_dir, state["epoch"] + 1)
    return state["epoch"] + 1, state["best_val_loss"], state.get("first_loss")


def _prepare_folder(run_dir: Path, config: Config, start: int) -> None:
    # A restarted worker group may begin before epochs the history already shows.
    truncate_history(run_dir / "history.jsonl", start)
    (run_dir / "calibration.json").unlink(missing_ok=True)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")


def _epoch_figures(
    config: Config, workers: Workers, images: float, val_tic: float, train_seconds: float, n: int
) -> dict[str, Any]:
    """An epoch's record after its losses: throughput and batch sizes."""
    t = config.train
    return {
        "images": int(images),
        "val_seconds": round(time.perf_counter() - val_tic, 3),
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(float(images) / train_seconds, 3),
        "global_batch_size": t.batch_size,
        "per_worker_batch_size": len(range(workers.rank, min(t.batch_size, n), workers.world)),
        "workers": workers.world,
    }


def _clock_epoch(record: dict[str, Any], images: float, wall: float) -> float:
    """The epoch's wall clock: training, validation, checkpoints and the previous epoch's
    reporting; `seconds` is the same figure under its older name. Returns the new mark."""
    now = time.perf_counter()
    record["wall_seconds"] = record["seconds"] = round(now - wall, 3)
    record["wall_images_per_second"] = round(float(images) / (now - wall), 3)
    record["finished_at"] = round(time.time(), 3)
    return now


def _log_epoch(run_dir: Path, writer, record: dict[str, Any]) -> None:
    """The epoch's line in history.jsonl and its scalars in TensorBoard (rank 0)."""
    with open(run_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    for key in ("loss", "mse", "ssim", "nll", "val_loss", "val_nll"):
        writer.add_scalar(key, record[key], record["epoch"])
    for key in ("images_per_second", "wall_images_per_second"):
        writer.add_scalar(key, record[key], record["epoch"])
    writer.flush()


def host_sync_seconds(device: torch.device) -> float:
    return 0.0 if device.type == "cpu" else HOST_SYNC_SECONDS


class _Steps:
    """The training steps of an epoch. The step losses stay on the device and are read
    (one host synchronisation for many steps) every `HOST_SYNC_SECONDS` on an accelerator
    and every step on a CPU, then checked, summed and passed to `on_step` in order."""

    def __init__(self, config, workers, callbacks, device, ckpt_dir, first_loss) -> None:
        self.config, self.workers, self.callbacks = config, workers, callbacks
        self.device, self.ckpt_dir, self.first_loss = device, ckpt_dir, first_loss
        self.every = host_sync_seconds(device)
        m = config.model
        self.token_shape = ((m.img_size // m.patch_size) ** 2, m.embed_dim)

    def epoch(self, engine: Engine, loader: DataLoader, epoch: int) -> np.ndarray:
        """Train one epoch; returns the sums of (loss, mse, ssim, nll) over images, and the
        number of images."""
        t, device = self.config.train, self.device
        rank, world = self.workers.rank, self.workers.world
        sums, pending, read_at = np.zeros(5), [], time.perf_counter()
        for step, images in enumerate(loader):
            images = to_float(images.to(device, non_blocking=True))
            if self.config.data.augment:
                images = augment(images, flips(t.seed, epoch, step, t.batch_size, rank, world))
            noise = None
            if self.config.model.noise_std > 0:
                noise = token_noise(
                    self.token_shape, t.seed, epoch, step, t.batch_size, rank, world
                )
                noise = to_device(noise[: len(images)], device)
            terms = loss_terms(engine.forward_module, images, self.config, engine.cast, noise)
            pending.append((step, torch.stack([v.detach().float() for v in terms]), len(images)))
            if time.perf_counter() - read_at >= self.every:
                sums += self._read(pending, epoch)
                read_at = time.perf_counter()
            engine.step(terms.total)
        return sums + self._read(pending, epoch)

    def _read(self, pending: list, epoch: int) -> np.ndarray:
        sums = np.zeros(5)
        if not pending:
            return sums
        values = torch.stack([v for _, v, _ in pending]).tolist()  # the host synchronisation
        for (step, _, n), row in zip(pending, values, strict=True):
            self.first_loss = row[0] if self.first_loss is None else self.first_loss
            _check_step(row, self.first_loss, epoch, step, self.ckpt_dir, self.config.train.lr)
            sums += np.array([*row, 1.0]) * n
            self.callbacks.on_step(epoch, step, row[0])
        pending.clear()
        return sums


def _last_good(ckpt_dir: Path) -> str:
    return f"the last good checkpoint is in {ckpt_dir}; " if (ckpt_dir / LAST).exists() else ""


def _check_step(
    values: list[float], first: float, epoch: int, step: int, ckpt_dir: Path, lr: float
) -> None:
    """Stop on a non-finite training loss, or one `DIVERGENCE_FACTOR` times the run's first."""
    loss, mse, _, nll = values
    where = f"at epoch {epoch + 1}, step {step + 1} (mse {mse:.4g}, nll {nll:.4g})"
    if not math.isfinite(loss):
        problem = f"loss became {loss} {where}"
    elif abs(loss) > DIVERGENCE_FACTOR * max(abs(first), 1.0):
        problem = f"training diverged {where}: loss {loss:.4g}, first step {first:.4g}"
    else:
        return
    raise TrainingError(
        f"{problem}; {_last_good(ckpt_dir)}the learning rate {lr:g} is likely too high"
    )


def _check_validation(record: dict[str, Any], steps: int, ckpt_dir: Path, lr: float) -> None:
    if not math.isfinite(record["val_loss"]):
        raise TrainingError(
            f"validation loss became {record['val_loss']} after epoch {record['epoch']} "
            f"(its last training step was step {steps}; the weights are no longer finite); "
            f"{_last_good(ckpt_dir)}the learning rate {lr:g} is likely too high"
        )


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))
