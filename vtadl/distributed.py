"""The training loop on Ray Train workers, with PyTorch DDP or DeepSpeed.

`fit_distributed(config)` runs `vtadl.training.train_loop` in `train.num_workers` Ray Train
workers (Ray Train V2 API). Each worker takes its slice of every global batch; rank 0 writes
the run folder exactly as a single-process run does, so everything downstream (evaluation,
heat maps, reports) does not care which strategy trained the model.

Fault tolerance: every epoch ends with `ray.train.report(metrics)`, with a checkpoint attached
when the run's checkpoint policy says one is due (by default every epoch; see
`vtadl.checkpoints.CheckpointPolicy`). When a worker dies, Ray Train restarts the worker group
(`FailureConfig(max_failures)`) and the loop resumes from the last reported checkpoint.
Ray's storage for a run is `<run_dir>/ray` under a fixed name, so calling `fit_distributed`
again on the same run folder resumes it on purpose, and a new run folder never resumes by
accident.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtadl.checkpoints import LAST, load_checkpoint
from vtadl.config import Config, absolute_paths
from vtadl.exceptions import ConfigError, TrainingError
from vtadl.model import VTADL
from vtadl.ray_session import check_address, session
from vtadl.run_folders import ensure_writable, new_run_dir
from vtadl.training import (
    Callbacks,
    Engine,
    NoCallbacks,
    Workers,
    adam,
    prepare_source,
    train_loop,
)

log = logging.getLogger(__name__)

RAY_RUN_NAME = "ray_train"
STATE_FILE = "state.pt"
DS_TAG = "deepspeed"


def deepspeed_config(config: Config) -> dict[str, Any]:
    """The DeepSpeed config of a run: generated from the project config, or the expert's
    JSON file (`train.deepspeed_config`) with the batch sizes made consistent with the run."""
    t = config.train
    per_worker = t.batch_size // t.num_workers
    if t.deepspeed_config:
        try:
            ds = json.loads(Path(t.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read DeepSpeed config {t.deepspeed_config}: {exc}") from None
    else:
        ds = {
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": t.precision == "bf16"},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        }
    ds.update(
        train_batch_size=t.batch_size,
        train_micro_batch_size_per_gpu=per_worker,
        gradient_accumulation_steps=1,
    )
    return ds


class DeepSpeedEngine(Engine):
    def __init__(self, model: VTADL, config: Config) -> None:
        import deepspeed

        t = config.train
        ds_config = deepspeed_config(config)
        self.ds, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=adam(model, t), config=ds_config
        )
        super().__init__(self.ds.module, optimizer, grad_clip=0.0, wrapped=self.ds)
        if ds_config.get("bf16", {}).get("enabled"):
            self.cast = torch.bfloat16

    def step(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # DeepSpeed clips (gradient_clipping) and zeroes gradients
        self.ds.step()

    def state(self) -> dict[str, Any]:
        # The portable checkpoint holds fp32 weights only; the (possibly sharded) optimiser
        # state lives in DeepSpeed's own checkpoint, reported to Ray when one is due.
        return {"model": {k: v.float() for k, v in self.module.state_dict().items()}}


class RayWorkers(Workers):
    """One Ray Train worker: its rank, device, engine, collectives and checkpoints."""

    keeps_checkpoints = True

    def __init__(self, config: Config, run_dir: Path) -> None:
        import ray
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.strategy = config.train.strategy
        # Where each worker runs, for operators (and for the fault-tolerance test).
        pids = run_dir / "workers"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / f"rank{self.rank}.pid").write_text(str(os.getpid()))
        started = {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "time": time.time(),
        }
        with open(pids / "started.jsonl", "a") as f:  # every (re)start of every worker
            f.write(json.dumps(started) + "\n")

    def device(self, config: Config) -> torch.device:
        from ray.train.torch import get_device

        return get_device()

    def engine(self, model: VTADL, config: Config) -> Engine:
        if self.strategy == "deepspeed":
            return DeepSpeedEngine(model, config)
        from ray.train.torch import prepare_model

        engine = super().engine(model, config)
        engine.forward_module = prepare_model(model)  # DDP when there are several workers
        if config.train.compile:
            engine.forward_module = torch.compile(engine.forward_module)
        return engine

    def checkpoint_to_resume(self, run_dir: Path) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # a fresh run
            return None
        local = Path(tempfile.mkdtemp(prefix="vtadl-resume-"))
        checkpoint.to_directory(str(local))
        state = load_checkpoint(local / STATE_FILE)
        state["_dir"] = local
        return state

    def restore(self, engine: Engine, state: dict[str, Any], run_dir: Path) -> None:
        local = state.pop("_dir")
        if isinstance(engine, DeepSpeedEngine):
            engine.ds.load_checkpoint(str(local), tag=DS_TAG)
        else:
            engine.load(state)
        shutil.rmtree(local, ignore_errors=True)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        if self.world == 1:
            return values
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.as_tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def report(self, record: dict, state: dict | None, run_dir: Path, engine: Engine) -> None:
        import ray.train
        import torch.distributed as dist

        metrics = {k: v for k, v in record.items() if isinstance(v, int | float | bool)}
        if state is None:  # no checkpoint due: metrics only (every rank agrees on this)
            ray.train.report(metrics)
            return
        name = f"epoch_{record['epoch']:04d}"
        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(engine, DeepSpeedEngine):
                engine.ds.save_checkpoint(tmp, tag=DS_TAG)  # a collective: every rank saves
                if self.rank == 0:
                    torch.save(state, Path(tmp) / STATE_FILE)
                if self.world > 1:
                    dist.barrier()
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=name,
                )
                return
            checkpoint = None
            if self.rank == 0:
                torch.save(state, Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    config = Config.from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    callbacks = NoCallbacks()
    # The driver's callbacks see the epochs rank 0 writes to history.jsonl; if they open
    # best.pt, it must be on disk by then.
    callbacks.reads_checkpoints = loop_config["reads_checkpoints"]
    train_loop(config, run_dir, RayWorkers(config, run_dir), callbacks)


class _HistoryWatcher(threading.Thread):
    """Relays the epochs rank 0 writes to history.jsonl to the driver's callbacks."""

    def __init__(self, path: Path, callbacks: Callbacks) -> None:
        super().__init__(daemon=True)
        self.path, self.callbacks = path, callbacks
        self.seen, self.stopped = 0, threading.Event()

    def poll(self) -> None:
        if self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            for line in lines[self.seen :]:
                self.callbacks.on_epoch_end(json.loads(line))
            self.seen = max(self.seen, len(lines))

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.poll()


def fit_distributed(
    config: Config, *, run_dir: str | Path | None = None, callbacks: Callbacks | None = None
) -> Path:
    """Train with Ray Train (strategy ddp or deepspeed); with `run_dir`, resume that run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = absolute_paths(config)
    t = config.train
    callbacks = callbacks or NoCallbacks()
    # Everything a user can get wrong fails here, in seconds, before Ray starts: the Ray
    # address, the runs folder, the DeepSpeed file, the data (packed once, here).
    check_address(t.ray_address)
    ensure_writable(Path(t.out))
    if t.strategy == "deepspeed":
        deepspeed_config(config)
    prepare_source(config)
    run_dir = (Path(run_dir) if run_dir is not None else new_run_dir(config)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": t.cpus_per_worker} | (
        {"GPU": t.gpus_per_worker} if t.gpus_per_worker else {}
    )
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config.to_dict(),
            "run_dir": str(run_dir),
            "reads_checkpoints": getattr(callbacks, "reads_checkpoints", True),
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=t.placement.upper(),
        ),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    watcher = _HistoryWatcher(run_dir / "history.jsonl", callbacks)
    with session(
        t.ray_address,
        cpus=t.num_workers * t.cpus_per_worker,
        gpus=t.num_workers * t.gpus_per_worker,
    ):
        callbacks.on_train_start(run_dir, t.epochs, 0)
        watcher.start()
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps the worker's error; show its own line
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise TrainingError(f"distributed training failed: {_first_line(cause)}") from None
        finally:
            watcher.stopped.set()
            watcher.join()
            watcher.poll()
    if not (run_dir / "checkpoints" / LAST).exists():
        raise TrainingError(f"distributed training wrote no checkpoint in {run_dir}")
    return run_dir


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
