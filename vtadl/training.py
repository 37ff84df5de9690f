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
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from vtadl.config import Config, absolute_paths, save_config, validate
from vtadl.data.prepare import to_float
from vtadl.data.source import Source, category_source
from vtadl.exceptions import ConfigError, DataError, RunError, TrainingError
from vtadl.losses import vtadl_loss
from vtadl.model import VTADL, build_model

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
# A training loss this many times larger in size than the run's first (or 1, if that is
# smaller) means training diverged: the loss terms are bounded below, and a healthy run's
# loss falls from its first value.
DIVERGENCE_FACTOR = 1e3


class Callbacks:
    """Hooks for progress display or reporting; every method is optional."""

    def on_train_start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None: ...
    def on_step(self, epoch: int, step: int, loss: float) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


def pick_device(name: str = "auto") -> torch.device:
    """The torch device of a `--device` value; a ConfigError if it is unknown or absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if not torch.version.cuda else "no GPU found"
            raise ConfigError(f"device {name!r} is not available: {why}; use --device cpu")
        if (device.index or 0) >= count:
            raise ConfigError(f"device {name!r} does not exist: {count} GPU(s) found")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} is not available on this machine")
    return device


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


def _step_generator(seed: int, epoch: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_019 + epoch * 10_007 + step + (stream << 40))


def _flips(seed: int, epoch: int, step: int, batch: int, rank: int, world: int) -> torch.Tensor:
    """Horizontal and vertical flip decisions (2, local batch) for one step, drawn for the
    global batch so that they do not depend on the number of workers."""
    gen = _step_generator(seed, epoch, step, stream=0)
    return (torch.rand(2, batch, generator=gen) < 0.5)[:, rank::world]


def token_noise(
    shape: tuple[int, int], seed: int, epoch: int, step: int, batch: int, rank: int, world: int
) -> torch.Tensor:
    """Standard normal noise (local batch, tokens, dim) for the tokens of one step, drawn for
    the global batch like the flips: worker r of w takes rows r, r+w, ..."""
    gen = _step_generator(seed, epoch, step, stream=1)
    return torch.randn(batch, *shape, generator=gen)[rank::world]


def _augment(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    flip_h, flip_v = (
        flips[0, : len(images), None, None, None],
        flips[1, : len(images), None, None, None],
    )
    images = torch.where(flip_h.to(images.device), images.flip(3), images)
    return torch.where(flip_v.to(images.device), images.flip(2), images)


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
    config = absolute_paths(validate(config))
    if config.train.strategy != "single":
        raise ConfigError(
            f"strategy {config.train.strategy!r} runs on Ray Train: call vtadl.runs.fit"
        )
    pick_device(config.train.device)
    ensure_writable(Path(config.train.out))
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    train_loop(config, run_dir, Workers(), callbacks or Callbacks())
    return run_dir


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure files can be written in it: a ConfigError
    naming the folder, before any work, instead of a failure after packing or training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the runs folder {folder}: {exc.strerror or exc}"
        ) from None


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
    t, rank, world = config.train, workers.rank, workers.world
    lead = rank == 0
    ckpt_dir = run_dir / "checkpoints"
    device = workers.device(config)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    source = prepare_source(config)
    train_set, val_set = source.dataset("train"), source.dataset("val")
    sampler = EpochBatches(len(train_set), t.batch_size, seed=t.seed, rank=rank, world=world)
    nw, pin = config.data.num_workers, device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=nw, persistent_workers=nw > 0, pin_memory=pin
    )
    val_loader = DataLoader(val_set, batch_size=t.batch_size, num_workers=nw, pin_memory=pin)
    engine = workers.engine(build_model(config.model).to(device), config)
    m = config.model
    token_shape = ((m.img_size // m.patch_size) ** 2, m.embed_dim)

    start, best, first_loss = 0, math.inf, None
    state = workers.checkpoint_to_resume(run_dir)
    if state is not None:
        workers.restore(engine, state, run_dir)
        torch.set_rng_state(state["rng"])
        start, best = state["epoch"] + 1, state["best_val_loss"]
        first_loss = state.get("first_loss")
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
            noise = None
            if m.noise_std > 0:
                noise = token_noise(token_shape, t.seed, epoch, step, t.batch_size, rank, world)
                noise = noise[: len(images)].to(device, non_blocking=True)
            terms = loss_terms(engine.forward_module, images, config, engine.cast, noise)
            # The step's one host synchronisation: every term at once.
            values = torch.stack([v.detach().float() for v in terms]).tolist()
            first_loss = values[0] if first_loss is None else first_loss
            _check_step(values, first_loss, epoch, step, ckpt_dir, t.lr)
            engine.step(terms.total)
            sums += np.array([*values, 1.0]) * len(images)
            callbacks.on_step(epoch, step, values[0])
        sums = workers.all_sum(sums)
        record = {
            "epoch": epoch + 1,
            **dict(zip(("loss", "mse", "ssim", "nll"), (sums[:4] / sums[4]).tolist())),
        }
        record.update(validation_loss(engine.module, val_loader, config, device, engine.cast))
        _check_validation(record, len(train_loader), ckpt_dir, t.lr)
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
            "first_loss": first_loss,
            "record": record,
        }
        if lead:
            save_checkpoint(ckpt_dir / LAST, **state)
            if is_best:
                save_checkpoint(ckpt_dir / BEST, **state)
            with open(run_dir / "history.jsonl", "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            for key in ("loss", "mse", "ssim", "nll", "val_loss", "val_nll", "images_per_second"):
                writer.add_scalar(key, record[key], epoch + 1)
            writer.flush()
        workers.report(record, state, run_dir, engine)
        log.info("epoch %d: %s", epoch + 1, record)
        callbacks.on_epoch_end(record)
    if writer is not None:
        writer.close()


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


def _truncate_history(path: Path, epochs_done: int) -> None:
    """Drop history lines of epochs after the checkpoint a resumed run starts from."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in kept))


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))
