"""The queue worker: which jobs it accepts and how it runs them.

Worker class: RQ's forking `Worker`, deliberately.
- Its own process only waits on Redis: it imports rq, redis and this module, never torch, CUDA
  or Ray. Each job runs in a fresh child process (the "work horse") that imports those itself,
  so no CUDA context or Ray connection is ever inherited across a fork, and whatever a job
  leaks ends with its process.
- The parent sends the job's heartbeat while the child trains, for hours if need be.
  `SimpleWorker` runs the job in its own process and sends no heartbeat meanwhile: a long
  training would be declared abandoned and run twice.
- A killed job is detectable both ways: the parent sees its child die (an out-of-memory kill
  fails the job), and when the whole worker dies (SIGKILL, a lost machine) its heartbeat
  expires, another worker's maintenance finds the job abandoned, and `_requeue_abandoned`
  puts it back in the queue; the rerun resumes from the run's last checkpoint.
- `SpawnWorker` was rejected: its child rebuilds a plain `rq.job.Job` (bypassing the checks
  of `VtadlJob`) and receives the Redis password on its command line, where `ps` shows it.

Security: a worker never unpickles anything from Redis. Jobs are read with the JSON
serializer, and `VtadlJob` refuses, before anything runs, a payload that is not JSON, a
function other than the job module's entry point, and any callback (RQ would import a
callback by name, which is code execution for anyone who can write to Redis).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback
from typing import Any

from rq import Worker
from rq.exceptions import AbandonedJobError, DeserializationError
from rq.job import Job
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

ALLOWED_FUNCTIONS = ("vtadl.jobs.run",)
MAX_ABANDONED = 3  # requeues after lost workers before the job is failed for good
RAY_ADDRESS_ENV = "VTADL_WORKER_RAY_ADDRESS"


class JobRefused(DeserializationError):
    """A job this worker will not run."""


class VtadlJob(Job):
    """An RQ job that can only run `ALLOWED_FUNCTIONS` with one JSON request."""

    _refused: str | None = None

    def restore(self, raw_data) -> Any:
        result = super().restore(raw_data)
        callbacks = (
            self._success_callback_name,
            self._failure_callback_name,
            self._stopped_callback_name,
        )
        if any(callbacks):
            self._refused = f"job callbacks are not allowed: {[c for c in callbacks if c]}"
            self._success_callback_name = None
            self._failure_callback_name = None
            self._stopped_callback_name = None
        return result

    def _deserialize_data(self) -> None:
        if self._refused:
            raise JobRefused(self._refused)
        try:
            super()._deserialize_data()
        except DeserializationError:
            raise JobRefused("the job's payload is not valid JSON") from None
        if self._func_name not in ALLOWED_FUNCTIONS:
            raise JobRefused(f"function {self._func_name!r} is not a vtadl job")
        if self._instance is not None or self._kwargs or len(self._args or ()) != 1:
            raise JobRefused("a vtadl job takes exactly one request")
        if not isinstance(self._args[0], dict):
            raise JobRefused("a vtadl job's request must be a JSON object")


def _requeue_abandoned(job: Job, exc_type, exc_value, tb) -> bool:
    """Exception handler: give a job whose worker was lost another attempt.

    RQ's cleanup calls this for an abandoned job and then retries the job if it has retries
    left; adding one here makes the loss of a machine cost a rerun (which resumes from the
    last checkpoint) instead of the job, up to `MAX_ABANDONED` times.
    """
    if not issubclass(exc_type, AbandonedJobError):
        return True
    lost = job.meta.get("abandoned", 0) + 1
    job.meta["abandoned"] = lost
    if lost <= MAX_ABANDONED:
        job.retries_left = (job.retries_left or 0) + 1
        job.meta["error"] = None
        log.warning("job %s lost its worker; requeued (%d of %d)", job.id, lost, MAX_ABANDONED)
    else:
        job.meta["error"] = f"its worker was lost {lost} times; not requeued again"
    job.save_meta()
    return False


def _die_with_parent(parent: int) -> None:
    """Make this job process end when its worker dies (Linux): RQ's job process runs in its
    own process group, and without this it trains on, orphaned, while its job is requeued
    and run again elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before the call took effect
        os._exit(1)


def recover_abandoned(conn, queues) -> None:
    """Requeue (or fail) the jobs of these RQ queues whose worker stopped sending heartbeats.

    Workers do this between jobs; `vtadl status` does it too, so a lost job is noticed even
    while every other worker is busy with a long training.
    """
    from rq.registry import StartedJobRegistry

    for queue in queues:
        StartedJobRegistry(queue=queue).cleanup(exception_handlers=[_requeue_abandoned])


class VtadlWorker(Worker):
    """RQ's forking worker with vtadl's job class and the abandoned-job handler.

    A running job's heartbeat is renewed every `job_monitoring_interval` seconds and lasts
    three intervals (RQ: the interval plus 60 s), so a lost worker's job is requeued within
    about three heartbeats of its loss plus the time until another worker's maintenance.
    """

    def fork_work_horse(self, job: Job, queue) -> None:
        self._parent_pid = os.getpid()
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Job, queue) -> None:
        _die_with_parent(self._parent_pid)
        super().main_work_horse(job, queue)

    def get_heartbeat_ttl(self, job: Job) -> int:
        interval = self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            interval = min(interval, max(1, job.timeout - self.current_job_working_time))
        return int(interval + 2 * self.job_monitoring_interval)


def run_worker(
    conn,
    queues: list[str],
    *,
    burst: bool = False,
    name: str | None = None,
    ray_address: str | None = None,
    heartbeat: int = 30,
) -> bool:
    """Work on the queues (names as given: high, normal, low) until stopped, or until they
    are empty with `burst`. Returns False if a job failed in burst mode."""
    from rq import Queue

    from vtadl.queue import queue_name

    if ray_address:
        os.environ[RAY_ADDRESS_ENV] = ray_address  # inherited by every job's process
    rq_queues = [
        Queue(queue_name(q), connection=conn, serializer=JSONSerializer, job_class=VtadlJob)
        for q in queues
    ]
    worker = VtadlWorker(
        rq_queues,
        connection=conn,
        serializer=JSONSerializer,
        job_class=VtadlJob,
        name=name or f"vtadl-{socket.gethostname()}-{os.getpid()}",
        exception_handlers=[_requeue_abandoned],
        maintenance_interval=60,
        job_monitoring_interval=heartbeat,
    )
    try:
        return worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
    except Exception:  # keep the reason in the worker's log, then let the CLI say it
        log.error("worker stopped: %s", traceback.format_exc())
        raise
