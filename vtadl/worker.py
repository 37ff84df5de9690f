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
  expires, another worker's maintenance finds the job abandoned, and `requeue_abandoned`
  puts it back in the queue; the rerun resumes from the run's last checkpoint.
- `SpawnWorker` was rejected: its child rebuilds a plain `rq.job.Job` (bypassing the checks
  of `VtadlJob`) and receives the Redis password on its command line, where `ps` shows it.

Security: a worker reads jobs only through `vtadl.job_contract.VtadlJob` (JSON, the one job
function, no callbacks).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback

from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from vtadl.job_contract import RAY_ADDRESS_ENV, VtadlJob, queue_name, requeue_abandoned

log = logging.getLogger(__name__)


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
        exception_handlers=[requeue_abandoned],
        maintenance_interval=60,
        job_monitoring_interval=heartbeat,
    )
    try:
        return worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
    except Exception:  # keep the reason in the worker's log, then let the CLI say it
        log.error("worker stopped: %s", traceback.format_exc())
        raise
