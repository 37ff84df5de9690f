"""The queue worker: which jobs it accepts, how it runs them, and how it rides out faults.

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
  expires and any live worker requeues the job (`job_contract.recover_abandoned`); the rerun
  resumes from the run's last checkpoint.
- `SpawnWorker` was rejected: its child rebuilds a plain `rq.job.Job` (bypassing the checks
  of `VtadlJob`) and receives the Redis password on its command line, where `ps` shows it.

Faults:
- Redis away (restarted, crashed, out of reach): every Redis call of the worker, of its job's
  process and of its scheduler waits and reconnects to the same address, the pause between
  tries growing to `RECONNECT_CAP` seconds (`Patience`). The worker's log says once that Redis
  is away and once that it is back. A running job waits at its next progress write and goes
  on; nothing is lost.
- Lost jobs are found within about three heartbeats by any live worker: an idle one blocks on
  its queues for one heartbeat at a time and recovers lost jobs between reads (RQ: every
  405 s); a busy one recovers them at each heartbeat of its own job.
- A job whose heartbeat expired only because Redis was away longer than three heartbeats is
  not requeued: recovery waits until its worker has had one heartbeat TTL (and the reconnect
  cap) after Redis is back to renew it (`job_contract.in_restart_grace`); a busy worker
  renews it within the cap and one heartbeat.
- The job's process and the scheduler's process end with their worker (Linux).

Security: a worker reads jobs only through `vtadl.job_contract.VtadlJob` (JSON, the one job
function, no callbacks), its scheduler too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator

from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.retry import Retry
from rq import Worker, worker_registration
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.utils import now

from vtadl.job_contract import (
    RAY_ADDRESS_ENV,
    RECONNECT_CAP,
    SERIALIZER,
    VtadlJob,
    VtadlScheduler,
    clean_registries,
    queue_name,
    recover_abandoned,
    rq_queue,
)

log = logging.getLogger(__name__)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class Patience(Retry):
    """redis-py's retry policy without an end, for a worker's connection.

    A call that finds Redis away waits and tries again at the same address (0.5 s, 1 s, 2 s
    ... up to `RECONNECT_CAP`) until Redis answers; a refused password is not waited out.
    redis-py copies a policy into each connection: this one is shared instead, so the first
    call to fail says that Redis is away and the first to get through after failing that it
    is back, once per outage for the pubsub thread and the main loop together.
    """

    def __init__(self, where: str) -> None:
        super().__init__(
            ExponentialBackoff(cap=RECONNECT_CAP, base=0.25),
            retries=-1,
            is_retryable=lambda error: not isinstance(error, AuthenticationError),
        )
        self.where = where
        self.quiet = False
        self._lock = threading.Lock()
        self._away_since: float | None = None

    def __deepcopy__(self, memo: dict) -> Patience:
        return self

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        failures = []

        def failed(error: Exception, *count: int):
            if not isinstance(error, AuthenticationError):
                failures.append(error)
                self._away(error)
            return fail(error, *count)

        result = super().call_with_retry(do, failed, is_retryable, with_failure_count)
        if failures:  # only a call that failed and then got through shows Redis is back (a
            self._back()  # first try can succeed without Redis: a poll, a socket still open)
        return result

    def hush(self) -> None:
        """In a child process (the job, the scheduler): wait as patiently but say nothing (the
        worker says it), and never wait on a lock that another thread held at the fork."""
        self.quiet = True
        self._lock = threading.Lock()
        self._away_since = None

    def _away(self, error: Exception) -> None:
        with self._lock:
            if self._away_since is not None:
                return
            self._away_since = time.monotonic()
        if not self.quiet:
            log.warning(
                "Redis at %s does not answer (%s); waiting for it, trying again every %d s",
                self.where, _first_line(error), RECONNECT_CAP,
            )  # fmt: skip

    def _back(self) -> None:
        with self._lock:
            since, self._away_since = self._away_since, None
        if since is not None and not self.quiet:
            log.warning(
                "Redis at %s answers again after %.0f s", self.where, time.monotonic() - since
            )


def _address(conn) -> str:
    """Where a client connects, without its password."""
    kw = conn.connection_pool.connection_kwargs
    if kw.get("path"):
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _hush(conn) -> None:
    retry = conn.get_retry()
    if isinstance(retry, Patience):
        retry.hush()


def _die_with_parent(parent: int) -> None:
    """Make this process (a job, the scheduler) end when its worker dies (Linux): a job
    process runs in its own process group, and without this it trains on, orphaned, while
    its job is requeued and run again elsewhere; a scheduler would run until Redis stops."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before the call took effect
        os._exit(1)


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Log a failure of `what` instead of letting it stop the worker."""
    try:
        yield
    except Exception as exc:
        log.warning("%s failed: %s", what, _first_line(exc))


class _Scheduler(VtadlScheduler):
    """The worker's scheduler process (retries waiting out their backoff): it ends with its
    worker and leaves outages for the worker to report."""

    parent = 0

    def work(self) -> None:
        _die_with_parent(self.parent)
        _hush(self.connection)
        super().work()


class VtadlWorker(Worker):
    """RQ's forking worker with vtadl's job class, recovery of lost jobs and scheduler.

    A running job's heartbeat is renewed every `job_monitoring_interval` seconds (the
    heartbeat) and lasts three (RQ: the interval plus 60 s); maintenance, which recovers
    lost jobs, runs every heartbeat, idle or busy.
    """

    jobs_failed = 0

    @property
    def dequeue_timeout(self) -> int:
        """One blocking read of the queues lasts one heartbeat (RQ: its TTL less 15 s)."""
        return self.job_monitoring_interval

    def fork_work_horse(self, job: Job, queue) -> None:
        self._parent_pid = os.getpid()
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Job, queue) -> None:
        _die_with_parent(self._parent_pid)
        _hush(self.connection)
        super().main_work_horse(job, queue)

    def execute_job(self, job: Job, queue) -> None:
        super().execute_job(job, queue)
        with contextlib.suppress(InvalidJobOperation, ValueError):  # gone, or not RQ's status
            if job.get_status(refresh=True) == JobStatus.FAILED:
                self.jobs_failed += 1

    def get_heartbeat_ttl(self, job: Job) -> int:
        interval = self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            interval = min(interval, max(1, job.timeout - self.current_job_working_time))
        return int(interval + 2 * self.job_monitoring_interval)

    def maintain_heartbeats(self, job: Job) -> None:
        """Renew the running job's heartbeat, then requeue other workers' lost jobs: a busy
        worker finds them too."""
        super().maintain_heartbeats(job)
        names = self.queue_names()
        with _logged("recovering lost jobs"):
            recover_abandoned(self.connection, names)

    def run_maintenance_tasks(self) -> None:
        """RQ's, without its group registries (vtadl makes no groups)."""
        alive = self.scheduler and self.scheduler._process and self.scheduler._process.is_alive()
        if self.last_cleaned_at and self.scheduler and not alive:
            self.scheduler.acquire_locks(auto_start=True)
        self.clean_registries()

    def clean_registries(self) -> None:
        """Each queue's registries, lost jobs recovered atomically (`job_contract`), unless
        Redis has just come back; then RQ's cleaning of the worker registry and of jobs
        stuck between the queue and a worker, under RQ's maintenance lock."""
        with _logged("recovering lost jobs"):
            for queue in self.queues:
                clean_registries(queue)
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                try:
                    worker_registration.clean_worker_registry(queue)
                    queue.intermediate_queue.cleanup(self, queue)
                finally:
                    queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's, with `_Scheduler`: due jobs read as `VtadlJob`, the process ends with us."""
        self.scheduler = _Scheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.parent = os.getpid()
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:
            self.scheduler.register_birth()
            self.scheduler.enqueue_scheduled_jobs()
        finally:
            self.scheduler.release_locks()
            self.scheduler.register_death()


def run_worker(
    conn,
    queues: list[str],
    *,
    burst: bool = False,
    name: str | None = None,
    ray_address: str | None = None,
    heartbeat: int = 30,
) -> int:
    """Work on the queues (names as given: high, normal, low) until stopped, or until they
    are empty with `burst`, waiting out any outage of Redis. Returns how many of the jobs it
    ran failed (retried jobs count once, when they fail for good)."""
    if ray_address:
        os.environ[RAY_ADDRESS_ENV] = ray_address  # inherited by every job's process
    conn.set_retry(Patience(_address(conn)))
    worker = VtadlWorker(
        [rq_queue(conn, queue_name(q)) for q in queues],
        connection=conn,
        serializer=SERIALIZER,
        job_class=VtadlJob,
        name=name or f"vtadl-{socket.gethostname()}-{os.getpid()}",
        maintenance_interval=heartbeat,
        job_monitoring_interval=heartbeat,
    )
    try:
        worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
    except Exception:  # keep the reason in the worker's log, then let the CLI say it
        log.error("worker stopped: %s", traceback.format_exc())
        raise
    return worker.jobs_failed
