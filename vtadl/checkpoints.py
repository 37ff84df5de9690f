"""Checkpoints: what a run keeps, when it writes it, and how without stalling training.

`last.pt` holds everything a run resumes from (config, weights, optimiser state, epoch, RNG
state, best validation loss); it is written when `CheckpointPolicy` says one is due.
`best.pt` holds the config and the weights of the epoch with the lowest validation loss so
far, without optimiser state, and is written on every new best. Every file is written whole
to a temporary name, flushed to disk and then renamed over the old one, so a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vtadl.config import Config, upgrade_stored
from vtadl.exceptions import RunError
from vtadl.model import VTADL, build_model

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
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
    """Rebuild the model a checkpoint (last.pt or best.pt) was trained with, from the config
    inside it."""
    state = load_checkpoint(path)
    config = Config.from_dict(upgrade_stored(state["config"]))
    model = build_model(config.model, stored_head_size(state["model"]))
    model.load_state_dict(state["model"])
    return config, model.eval(), state


def stored_head_size(weights: dict[str, Any]) -> int:
    """The number of components of a stored model's mixture head, from its weights (a
    global head's logits, or the token head's mixing layer)."""
    for name in ("mdn.logits", "mdn.pi.bias"):
        if name in weights:
            return int(weights[name].shape[0])
    raise RunError("the checkpoint holds no mixture head")


class CheckpointPolicy:
    """When a resumable checkpoint is due: after every `every_epochs` epochs or once
    `every_minutes` have passed since the last one (0 turns either rule off), and always
    after the last epoch. `clock` is injectable for tests."""

    def __init__(
        self,
        every_epochs: int,
        every_minutes: float,
        epochs: int,
        *,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_epochs, self.every_seconds = every_epochs, every_minutes * 60
        self.epochs, self.clock = epochs, clock
        self.saved_epoch, self.saved_at = start, clock()

    def due(self, epochs_done: int) -> bool:
        if epochs_done >= self.epochs:
            return True
        if self.every_epochs and epochs_done - self.saved_epoch >= self.every_epochs:
            return True
        return bool(self.every_seconds) and self.clock() - self.saved_at >= self.every_seconds

    def saved(self, epochs_done: int) -> None:
        self.saved_epoch, self.saved_at = epochs_done, self.clock()


def cpu_copy(value: Any) -> Any:
    """A copy of a (nested) state with every tensor copied to host memory, so that training
    can go on changing the originals while the copy is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoint files in order, on one background thread or (background=False) at
    once. A write's error is raised by the next `submit` or `wait`."""

    def __init__(self, background: bool) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if background else None
        self.pending: dict[str, Future] = {}

    def snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        """What `submit` may be given: for a background writer a host copy that training
        does not change, else the state itself."""
        return state if self.pool is None else cpu_copy(state)

    def busy(self, name: str) -> bool:
        """Whether the last write of this file name has not finished yet."""
        future = self.pending.get(name)
        return future is not None and not future.done()

    def submit(self, path: Path, state: dict[str, Any]) -> None:
        """Write `state` (from `snapshot`; its dicts are copied here) to `path`."""
        if self.pool is None:
            save_checkpoint(path, **state)
            return
        self._check()
        state = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
        self.pending[path.name] = self.pool.submit(save_checkpoint, path, **state)

    def wait(self, name: str | None = None) -> None:
        """Until the writes of `name` (or of every file) are on disk."""
        for key, future in list(self.pending.items()):
            if name in (None, key):
                future.result()
        self._check()

    def close(self) -> None:
        """Finish every write and stop the thread (a run that fails still gets its last
        good checkpoint written)."""
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def _check(self) -> None:
        for key, future in list(self.pending.items()):
            if future.done():
                del self.pending[key]
                future.result()


class EpochCheckpoints:
    """What the training loop keeps after an epoch: best.pt on every new best validation
    loss (rank 0), and the resumable state when `CheckpointPolicy` says one is due.

    Rank 0 decides whether one is due (the clock differs between workers; the loop shares
    its decision). The last epoch's last.pt is always written; an earlier one is skipped
    while the previous one is still being written, unless the workers keep checkpoints
    themselves (Ray Train).
    """

    def __init__(
        self,
        config: Config,
        folder: Path,
        *,
        lead: bool,
        start: int,
        best: float,
        keeps_checkpoints: bool = False,
        wait_for_best: bool = True,
    ) -> None:
        t = config.train
        self.config, self.folder, self.lead, self.best = config, folder, lead, best
        self.keeps_checkpoints, self.wait_for_best = keeps_checkpoints, wait_for_best
        self.policy = CheckpointPolicy(
            t.checkpoint_every_epochs, t.checkpoint_every_minutes, t.epochs, start=start
        )
        self.files = CheckpointWriter(background=lead and t.checkpoint_background)
        self._new_best = False

    def due(self, epochs_done: int) -> bool:
        """Rank 0's decision whether a resumable checkpoint is due after this epoch."""
        return self.lead and self.policy.due(epochs_done)

    def keep(
        self, epoch: int, record: dict[str, Any], state: Callable[[], dict], extra: dict, due: bool
    ) -> dict[str, Any] | None:
        """Mark the epoch's record `best` and `checkpoint`, and write what is due. `state`
        gives the engine's state (model and optimiser), `extra` what a resume needs besides
        (RNG, first loss). Returns the resumable state when one is due, else None."""
        is_best = record["val_loss"] < self.best
        self.best = min(self.best, record["val_loss"])
        record["best"], record["checkpoint"] = is_best, due
        self._new_best = self.lead and is_best
        kept = {"config": self.config.to_dict(), "epoch": epoch, "best_val_loss": self.best}
        weights = self.files.snapshot(state()) if due or self._new_best else {}
        if self._new_best:
            self.files.submit(
                self.folder / BEST, {**kept, "model": weights["model"], "record": record}
            )
        if not due:
            return None
        resumable = {**kept, **weights, **extra, "record": dict(record)}
        written = self.lead and (epoch + 1 == self.policy.epochs or not self.files.busy(LAST))
        if written:
            self.files.submit(self.folder / LAST, resumable)
        if written or self.keeps_checkpoints:
            self.policy.saved(epoch + 1)
        else:
            record["checkpoint"] = False
        return resumable

    def settle(self) -> None:
        """After the epoch is reported: a new best.pt is on disk before callbacks that read
        checkpoints hear of it."""
        if self._new_best and self.wait_for_best:
            self.files.wait(BEST)

    def close(self) -> None:
        self.files.close()
