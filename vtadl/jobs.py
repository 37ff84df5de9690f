"""What a queue worker runs: `run(request)`, one JSON request in, one JSON result out.

Each job runs in a fresh process forked by the worker (`vtadl.worker`); torch and Ray are
imported here, inside the job, never by the worker. The job calls the same entry points as
the CLI (`vtadl.runs.train_and_evaluate`), keeps its run folder in the job's meta before it
trains, so that a rerun after a lost worker, a retry or `vtadl retry` continues that run
from its last checkpoint, and reports progress (epoch of epochs, then the metrics) in the
job's meta and one log line per epoch in Redis (`vtadl logs`) and in the run's `job.log`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from vtadl.config import Config, validate
from vtadl.exceptions import ConfigError, JobError, VtadlError
from vtadl.job_contract import KINDS, RAY_ADDRESS_ENV, REQUEST_VERSION
from vtadl.queue import append_log

HEADLINE = ("image_auroc", "pixel_auroc", "au_pro", "n_test")


def parse_request(request: Any) -> tuple[str, Config, dict[str, Any]]:
    """The kind, config and options of a request; JobError if it is not one."""
    if not isinstance(request, dict):
        raise JobError("a job request must be a JSON object")
    if request.get("version") != REQUEST_VERSION:
        raise JobError(f"unsupported request version {request.get('version')!r}")
    kind = request.get("kind")
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; known kinds: {', '.join(KINDS)}")
    options = request.get("options") or {}
    if not isinstance(options, dict):
        raise JobError("a job's options must be a JSON object")
    try:
        config = validate(Config.from_dict(request.get("config")))
    except ConfigError as exc:
        raise JobError(f"invalid config in the job request: {exc}") from None
    return kind, config, options


class JobLog:
    """Lines of a job's log: to Redis (readable from any machine) and to the run's job.log.

    Warnings that the library logs while the job runs are added too.
    """

    def __init__(self, job) -> None:
        self.job = job
        self.file = None
        self.pending: list[str] = []
        self.handler = _Relay(self)
        logging.getLogger("vtadl").addHandler(self.handler)

    def line(self, text: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        append_log(self.job.connection, self.job.id, stamped)
        print(f"{self.job.id}: {text}", file=sys.stderr, flush=True)  # the worker's own log
        if self.file is None:
            self.pending.append(stamped)
        else:
            self.file.write(stamped + "\n")
            self.file.flush()

    def to_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()
        for stamped in self.pending:
            self.file.write(stamped + "\n")
        self.pending.clear()
        self.file.flush()

    def close(self) -> None:
        logging.getLogger("vtadl").removeHandler(self.handler)
        if self.file is not None:
            self.file.close()


class _Relay(logging.Handler):
    def __init__(self, joblog: JobLog) -> None:
        super().__init__(logging.WARNING)
        self.joblog = joblog

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.joblog.line(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a log line must never fail the job
            self.handleError(record)


class _Progress:
    """Training callbacks that publish progress in the job's meta and log."""

    reads_checkpoints = False  # the loop need not wait for checkpoint writes to call us

    def __init__(self, job, joblog: JobLog) -> None:
        self.job, self.joblog = job, joblog
        self.epochs = 0

    def on_train_start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None:
        self.epochs = epochs
        self.job.meta["epochs"] = epochs
        self.job.save_meta()

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        pass

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.job.meta["epoch"] = record["epoch"]
        self.job.save_meta()
        self.joblog.line(
            f"epoch {record['epoch']}/{self.epochs}  loss {record['loss']:.4f}  "
            f"val {record['val_loss']:.4f}  {record['wall_seconds']:.1f} s"
        )


def run(request: dict[str, Any]) -> dict[str, Any]:
    """The queue's only job function (`vtadl.job_contract.JOB_FUNCTION`)."""
    from rq import get_current_job

    job = get_current_job()
    joblog = JobLog(job)
    job.meta["attempts"] = job.meta.get("attempts", 0) + 1
    job.meta["began_at"] = time.time()
    job.meta["worker_host"] = socket.gethostname()
    job.meta["error"] = None
    job.save_meta()
    try:
        kind, config, options = parse_request(request)
        if kind == "train":
            return _train(job, config, joblog)
        return _tune(job, config, options, joblog)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        line = message[0] if isinstance(exc, VtadlError) and message else _one_line(exc)
        job.meta["error"] = line
        job.save_meta()
        joblog.line(f"failed: {line}")
        raise
    finally:
        joblog.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def _with_worker_ray(config: Config) -> Config:
    """A distributed job without its own Ray address uses the worker's (`--ray-address`)."""
    address = os.environ.get(RAY_ADDRESS_ENV)
    if address and config.train.strategy != "single" and not config.train.ray_address:
        return config.override(train={"ray_address": address})
    return config


def _train(job, config: Config, joblog: JobLog) -> dict[str, Any]:
    from vtadl.checkpoints import LAST
    from vtadl.run_folders import new_run_dir
    from vtadl.runs import train_and_evaluate

    config = _with_worker_ray(config)
    d = config.data
    if job.meta.get("run_dir"):
        run_dir = Path(job.meta["run_dir"])
        if (run_dir / "checkpoints" / LAST).exists():
            joblog.line(f"resuming {run_dir} from its last checkpoint")
    else:
        run_dir = new_run_dir(config).resolve()
        job.meta["run_dir"] = str(run_dir)
        job.save_meta()
    joblog.to_file(run_dir / "job.log")
    joblog.line(
        f"train {d.dataset}/{d.category}: {config.variant}, {config.train.epochs} epochs, "
        f"strategy {config.train.strategy}, attempt {job.meta['attempts']}, "
        f"on {job.meta['worker_host']}; run folder {run_dir}"
    )
    run_dir, metrics = train_and_evaluate(config, run_dir=run_dir, callbacks=_Progress(job, joblog))
    return _finished(job, joblog, "train", config, run_dir, metrics, "finished")


def _finished(job, joblog: JobLog, kind: str, config: Config, run_dir, metrics: dict,
              said: str, **extra: str) -> dict[str, Any]:  # fmt: skip
    """Publish a job's headline metrics (meta, log) and build its JSON result."""
    headline = {k: metrics.get(k) for k in HEADLINE}
    job.meta.update(run_dir=str(run_dir), metrics=headline, **extra)
    job.save_meta()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in headline.items() if isinstance(v, float))
    joblog.line(f"{said}: {shown}")
    d = config.data
    return {"kind": kind, "dataset": d.dataset, "category": d.category, "run_dir": str(run_dir),
            "metrics": headline, **extra}  # fmt: skip


def _tune(job, config: Config, options: dict[str, Any], joblog: JobLog) -> dict[str, Any]:
    """A search named after its job: a rerun (lost worker, retry) resumes that experiment,
    keeping its finished trials."""
    from ray.tune import Tuner

    from vtadl.tune.driver import tune

    config = _with_worker_ray(config)
    d = config.data
    experiment = Path(config.train.out) / "tune" / d.dataset / d.category / job.id
    resume = Tuner.can_restore(str(experiment))
    if experiment.exists() and not resume:  # lost before Tune saved any state: start again
        shutil.rmtree(experiment)
    joblog.to_file(experiment.with_name(f"{job.id}.job.log"))
    joblog.line(
        f"tune {d.dataset}/{d.category}: {'resuming' if resume else 'new'} experiment "
        f"{experiment}, attempt {job.meta['attempts']}, on {job.meta['worker_host']}"
    )
    summary = tune(config, {**options, "name": job.id, "resume": resume})
    said = f"finished: best trial {summary['best']['trial_id']}"
    return _finished(job, joblog, "tune", config, summary["best_run"], summary["test_metrics"],
                     said, experiment=str(experiment),
                     best_config=summary["best_config"])  # fmt: skip
