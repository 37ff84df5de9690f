"""The contract between the queue and its workers: the one job function a worker runs, the
request it takes, the queues, and the job class that refuses anything else.

Every way a job is read from Redis goes through `VtadlJob`, with the JSON serializer: queues
(`rq_queue`), registries (`registry`), the scheduler (`VtadlScheduler`) and `fetch_job`.
`VtadlJob` refuses, before anything runs, a payload that is not JSON, a function other than
`JOB_FUNCTION`, and any callback, dependency or webhook (RQ would import a callback by name,
which is code execution for anyone who can write to Redis); it never keeps one to call.

A state change that must happen once runs in `atomically`: a Redis transaction that WATCHes
the job's hash, re-reads the state and acts only if nobody changed it meanwhile. A job whose
worker is lost is requeued by `recover_abandoned` that way, so two processes that find the
same lost job cannot both requeue it; workers run it (`clean_registries`) and `vtadl status`
runs it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import (
    BaseRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, utcparse

from vtadl.exceptions import ConfigError, JobError

if TYPE_CHECKING:
    from redis.client import Pipeline

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
# seconds: the longest pause between a worker's tries to reach Redis again
RECONNECT_CAP = 5
GRACE_CAP = 3600  # seconds: the longest a restart of Redis holds back the recovery of a job
SERIALIZER = JSONSerializer
ATTEMPTS = 100  # of a transaction whose job keeps changing under it

T = TypeVar("T")


def queue_name(priority: str) -> str:
    """The RQ queue of a priority (high, normal, low)."""
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return f"vtadl-{priority}"


class JobRefused(DeserializationError):
    """A job this worker will not run."""


class VtadlJob(Job):
    """An RQ job that can only run `ALLOWED_FUNCTIONS` with one JSON request.

    `meta_unreadable` is True when the stored meta is not a JSON object; `meta` is then empty.
    """

    _refused: str | None = None
    meta_unreadable = False

    def restore(self, raw_data) -> Any:
        result = super().restore(raw_data)
        refused = []
        named = (self._success_callback_name, self._failure_callback_name)
        callbacks = [c for c in (*named, self._stopped_callback_name) if c]
        if callbacks:
            refused.append(f"job callbacks are not allowed: {callbacks}")
        if self._dependency_ids:
            refused.append("job dependencies are not allowed")
        if self.webhooks:
            refused.append("job webhooks are not allowed")
        self._success_callback_name = None
        self._failure_callback_name = None
        self._stopped_callback_name = None
        self._dependency_ids = []
        self.webhooks = []
        self._refused = "; ".join(refused) or None
        self.meta_unreadable = not isinstance(self.meta, dict) or isinstance(
            self.meta.get("unserialized"), bytes
        )
        if self.meta_unreadable:
            self.meta = {}
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


def rq_queue(conn, name: str) -> Queue:
    """The RQ queue `name` (e.g. `vtadl-normal`), reading its jobs as `VtadlJob` from JSON."""
    return Queue(name, connection=conn, serializer=SERIALIZER, job_class=VtadlJob)


def registry(kind: type[BaseRegistry], conn, name: str) -> BaseRegistry:
    """One of RQ's registries (`StartedJobRegistry`, ...) of the queue `name`, reading its
    jobs as `VtadlJob` from JSON; RQ's default would read them as plain `rq.job.Job`."""
    return kind(name, connection=conn, job_class=VtadlJob, serializer=SERIALIZER)


def fetch_job(conn, job_id: str) -> VtadlJob:
    """The job `job_id` as a `VtadlJob`; NoSuchJobError if there is none."""
    return VtadlJob.fetch(job_id, connection=conn, serializer=SERIALIZER)


def atomically(conn, job_id: str, act: Callable[[Pipeline], T]) -> T:
    """Run `act(pipe)` as one transaction on the job's state.

    The job's hash is watched before `act` runs: `act` reads what it needs (the job, fetched
    after the watch began), then calls `pipe.multi()` and queues its writes on `pipe`. If
    anybody changed the job's hash in between, the writes are dropped and `act` runs again on
    the new state, so of several processes acting on the same state only one acts. `act`
    raises WatchError itself where it sees the change first.
    """
    from redis.exceptions import WatchError

    with conn.pipeline() as pipe:
        for _ in range(ATTEMPTS):
            try:
                pipe.watch(VtadlJob.key_for(job_id))
                result = act(pipe)
                pipe.execute()
                return result
            except WatchError:
                pipe.reset()
    raise JobError(f"job {job_id} kept changing; try again")


def count_loss(job: Job) -> bool:
    """Count one lost worker in the job's meta; True if the job gets another attempt (it
    resumes from its last checkpoint), False if it has been lost `MAX_ABANDONED` times or was
    cancelled meanwhile."""
    lost = job.meta.get("abandoned")
    lost = (lost if isinstance(lost, int) else 0) + 1
    job.meta["abandoned"] = lost
    if job.meta.get("cancelled_at"):
        job.meta["error"] = "cancelled while its worker was lost"
        return False
    if lost > MAX_ABANDONED:
        job.meta["error"] = f"its worker was lost {lost} times; not requeued again"
        return False
    job.meta["error"] = None
    return True


def _requeued(job: Job) -> None:
    lost = job.meta["abandoned"]
    log.warning("job %s lost its worker; requeued (%d of %d)", job.id, lost, MAX_ABANDONED)


def _still_running(conn, started: BaseRegistry, job_id: str) -> bool:
    """Whether another execution of the job is in the started registry and alive."""
    alive = conn.zrangebyscore(started.key, f"({current_timestamp()}", "+inf")
    return any(e.decode().partition(":")[0] == job_id for e in alive)


def _recover(conn, name: str, entry: str) -> Job | None:
    """Requeue or fail the job of one expired entry of a started registry, in one transaction
    with the entry's removal; the job if it was requeued."""
    started = registry(StartedJobRegistry, conn, name)
    job_id = entry.partition(":")[0]

    def act(pipe: Pipeline) -> Job | None:
        score = conn.zscore(started.key, entry)
        if score is None or score > current_timestamp():  # recovered, or alive again
            return None
        try:
            job = fetch_job(conn, job_id)
        except (NoSuchJobError, ValueError, TypeError, KeyError) as exc:
            log.warning("lost job %s cannot be read (%s); forgotten", job_id, exc)
            job = None
        pipe.multi()
        pipe.zrem(started.key, entry)
        if job is None or job.get_status() != JobStatus.STARTED:
            return None
        if _still_running(conn, started, job_id):
            return None
        if count_loss(job):
            job.started_at = job.ended_at = None
            rq_queue(conn, name).enqueue_job(job, pipeline=pipe)  # saves the meta too
            return job
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job._handle_failure(f"AbandonedJobError: {job.meta['error']}", pipe)
        pipe.hset(job.key, "meta", SERIALIZER.dumps(job.meta))
        return None

    try:
        return atomically(conn, job_id, act)
    except JobError as exc:  # it keeps changing: its worker is alive after all
        log.warning("%s; left for the next recovery", exc)
        return None


def recover_abandoned(conn, names: Iterable[str]) -> list[str]:
    """Requeue (or fail) the jobs of these RQ queues (e.g. `vtadl-normal`) whose worker
    stopped sending heartbeats; returns the ids requeued.

    Each lost job is handled in one transaction: of several processes that find it at once,
    one requeues it and the others see it gone. A job whose heartbeat expired while Redis was
    away waits until its worker has had the time to renew it (`in_restart_grace`). Workers
    run this between jobs and at every heartbeat of their own (`clean_registries`);
    `vtadl status` runs it too.
    """
    requeued, up_for = [], None
    for name in names:
        key = registry(StartedJobRegistry, conn, name).key
        for entry, expiry in conn.zrangebyscore(key, 0, current_timestamp(), withscores=True):
            up_for = _uptime(conn) if up_for is None else up_for
            if _held_back(conn, entry, expiry, up_for):
                continue
            if job := _recover(conn, name, entry.decode()):
                _requeued(job)
                requeued.append(job.id)
    return requeued


def in_restart_grace(conn, names: Iterable[str]) -> bool:
    """Whether Redis came back too recently for some lost-looking job of these queues to be
    recovered yet.

    A started job is lost when its heartbeat expires. A Redis away for longer than the
    heartbeat's TTL (three heartbeats) comes back with the heartbeats of jobs that are still
    running expired; requeueing them would run them twice. So a job with an expired
    heartbeat is held back while Redis has been up for less than that heartbeat's TTL plus
    `RECONNECT_CAP` (its worker reconnecting). The TTL is the job's own: its expiry less its
    last heartbeat, at most `GRACE_CAP` (a planted heartbeat from long ago cannot hold
    recovery back for longer); a job that never sent one is not held back.
    """
    expired = []
    for name in names:
        key = registry(StartedJobRegistry, conn, name).key
        expired += conn.zrangebyscore(key, 0, current_timestamp(), withscores=True)
    if not expired:
        return False
    up_for = _uptime(conn)
    return any(_held_back(conn, entry, expiry, up_for) for entry, expiry in expired)


def _uptime(conn) -> int:
    return int(conn.info("server")["uptime_in_seconds"])


def _held_back(conn, entry: bytes, expiry: float, up_for: int) -> bool:
    ttl = _heartbeat_ttl(conn, entry, expiry)
    return ttl is not None and up_for < ttl + RECONNECT_CAP


def _heartbeat_ttl(conn, entry: bytes, expiry: float) -> float | None:
    """The TTL of the heartbeat behind a started-registry entry, or None without one."""
    job_id = entry.decode(errors="replace").partition(":")[0]  # <job id>:<execution id>
    raw = conn.hget(VtadlJob.key_for(job_id), "last_heartbeat")
    try:
        return min(GRACE_CAP, max(0.0, expiry - utcparse(raw.decode()).timestamp()))
    except (AttributeError, ValueError):  # no heartbeat yet, or not one RQ wrote
        return None


def clean_registries(queue: Queue) -> None:
    """RQ's registry maintenance of one queue (`rq.registry.clean_registries`), with lost jobs
    recovered by `recover_abandoned` instead of RQ's cleanup, which reads the jobs it
    requeues without a transaction."""
    for kind in (FinishedJobRegistry, FailedJobRegistry):
        registry(kind, queue.connection, queue.name).cleanup()
    recover_abandoned(queue.connection, [queue.name])


def _enqueue_due(conn, name: str, job_id: str) -> None:
    """Move one due job of a scheduled registry to its queue, in one transaction."""
    scheduled = registry(ScheduledJobRegistry, conn, name)

    def act(pipe: Pipeline) -> None:
        score = conn.zscore(scheduled.key, job_id)
        if score is None or score > current_timestamp():
            return
        try:
            job = fetch_job(conn, job_id)
        except (NoSuchJobError, ValueError, TypeError, KeyError):
            job = None
        pipe.multi()
        pipe.zrem(scheduled.key, job_id)
        if job is not None and job.get_status() == JobStatus.SCHEDULED:
            rq_queue(conn, name).enqueue_job(job, pipeline=pipe)

    try:
        atomically(conn, job_id, act)
    except JobError as exc:
        log.warning("%s; left for the next round", exc)


class VtadlScheduler(RQScheduler):
    """RQ's scheduler, moving due jobs (retries waiting out their backoff) to their queues
    as `VtadlJob`s, each in one transaction: a job cancelled or retried at the same moment
    is not queued twice."""

    def enqueue_scheduled_jobs(self) -> None:
        self._status = self.Status.WORKING
        if not self._scheduled_job_registries and self._acquired_locks:
            self.prepare_registries()
        for scheduled in self._scheduled_job_registries:
            for job_id in scheduled.get_jobs_to_schedule(current_timestamp()):
                _enqueue_due(self.connection, scheduled.name, job_id)
        self._status = self.Status.STARTED
