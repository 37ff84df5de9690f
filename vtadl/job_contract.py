"""The contract between the queue and its workers: the one job function a worker runs, the
request it takes, the queues, and the job class that refuses anything else.

Every way a job is read from Redis goes through `VtadlJob`: a worker never unpickles
anything from Redis. Jobs are read with the JSON serializer, and `VtadlJob` refuses, before
anything runs, a payload that is not JSON, a function other than `JOB_FUNCTION`, and any
callback (RQ would import a callback by name, which is code execution for anyone who can
write to Redis). A job whose worker is lost is requeued by `recover_abandoned`, which
workers run between jobs and `vtadl status` runs too.
"""

from __future__ import annotations

import logging
from typing import Any

from rq.exceptions import AbandonedJobError, DeserializationError
from rq.job import Job

from vtadl.exceptions import ConfigError

log = logging.getLogger(__name__)

# The job's dotted path: queued jobs store it, so it never changes.
JOB_FUNCTION = "vtadl.jobs.run"
ALLOWED_FUNCTIONS = (JOB_FUNCTION,)
REQUEST_VERSION = 1
KINDS = ("train", "tune")
PRIORITIES = ("high", "normal", "low")
MAX_ABANDONED = 3  # requeues after lost workers before the job is failed for good
# A worker's --ray-address, handed to the jobs it runs (their processes inherit it).
RAY_ADDRESS_ENV = "VTADL_WORKER_RAY_ADDRESS"


def queue_name(priority: str) -> str:
    """The RQ queue of a priority (high, normal, low)."""
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return f"vtadl-{priority}"


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


def requeue_abandoned(job: Job, exc_type, exc_value, tb) -> bool:
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


def recover_abandoned(conn, queues) -> None:
    """Requeue (or fail) the jobs of these RQ queues whose worker stopped sending heartbeats.

    Workers do this between jobs; `vtadl status` does it too, so a lost job is noticed even
    while every other worker is busy with a long training.
    """
    from rq.registry import StartedJobRegistry

    for queue in queues:
        StartedJobRegistry(queue=queue).cleanup(exception_handlers=[requeue_abandoned])
