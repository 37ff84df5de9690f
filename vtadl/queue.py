"""The job queue, from the submitting side: requests, ids, submission, status and control.

A job is one JSON request, enqueued by dotted path (`vtadl.jobs.run`) with RQ's JSON
serializer:

    {"version": 1, "kind": "train", "config": Config.to_dict(), "options": {}}

`kind` selects what the worker does with the config (`train` today; `tune` adds a search,
its settings in `options`), so a new kind needs no new format. A job's id is derived from
the dataset, the category and a hash of the whole request: submitting the same request twice
finds the first job instead of training twice.

Nothing here imports torch or Ray; the CLI stays quick.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from vtadl.config import Config
from vtadl.exceptions import ConfigError, JobError
from vtadl.job_contract import (
    JOB_FUNCTION,
    KINDS,
    PRIORITIES,
    REQUEST_VERSION,
    VtadlJob,
    queue_name,
    recover_abandoned,
)

INDEX_KEY = "vtadl:jobs"  # sorted set: job id -> submission time
LOG_KEY = "vtadl:log:{}"
KEEP_SECONDS = 30 * 86400  # finished and failed jobs, and their logs
DEFAULT_TIMEOUT = 48 * 3600
MAX_LOG_LINES = 20_000
FINAL = ("finished", "failed", "cancelled")


def make_request(kind: str, config: Config, options: dict[str, Any] | None = None) -> dict:
    if kind not in KINDS:
        raise ConfigError(f"job kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return {
        "version": REQUEST_VERSION,
        "kind": kind,
        "config": config.to_dict(),
        "options": options or {},
    }


def base_job_id(request: dict) -> str:
    """`<dataset>-<category>-<hash>`: only letters, digits, `_` and `-`, as RQ requires."""
    data = request["config"]["data"]
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:10]
    safe = lambda text: re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "x"
    prefix = "" if request["kind"] == "train" else f"{request['kind']}-"
    return f"{prefix}{safe(data['dataset'])}-{safe(data['category'])}-{digest}"


def parse_duration(text: str | int | float) -> int:
    """Seconds from `3600`, `90m`, `12h`, `2d` (or `1h30m`)."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?[smhd]?\s*)+)", str(text))
        if not parts:
            raise ConfigError(f"invalid duration {text!r}: use e.g. 3600, 90m, 12h or 2d")
        seconds = sum(
            float(n) * units[u or "s"]
            for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", parts.group(1))
        )
    if not seconds > 0:
        raise ConfigError(f"a duration must be positive, got {text!r}")
    return int(seconds)


@dataclass
class Submission:
    job_id: str
    dataset: str
    category: str
    state: str
    new: bool  # False: the same request was already submitted; this is that job

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _serializer():
    from rq.serializers import JSONSerializer

    return JSONSerializer


def _queue(conn, priority: str = "normal"):
    from rq import Queue

    return Queue(
        queue_name(priority), connection=conn, serializer=_serializer(), job_class=VtadlJob
    )


def fetch(conn, job_id: str):
    from rq.exceptions import NoSuchJobError

    try:
        return VtadlJob.fetch(job_id, connection=conn, serializer=_serializer())
    except NoSuchJobError:
        raise JobError(f"no job {job_id!r} (vtadl status lists the jobs)") from None


def submit(
    conn,
    requests: list[dict],
    *,
    priority: str = "normal",
    timeout: int = DEFAULT_TIMEOUT,
    retries: int = 0,
    retry_backoff: int = 60,
    force: bool = False,
) -> list[Submission]:
    """Enqueue one job per request. A request submitted before is reported, not enqueued
    again (a failed or cancelled one is retried: it continues its run), unless `force`: then
    it gets a new id (`<id>-2`, `-3`, ...) and a new run."""
    from rq import Retry
    from rq.exceptions import DuplicateJobError

    if retries < 0:
        raise ConfigError(f"retries must not be negative, got {retries}")
    if retry_backoff < 0:
        raise ConfigError(f"the retry backoff must not be negative, got {retry_backoff}")
    queue = _queue(conn, priority)
    done = []
    for request in requests:
        data = request["config"]["data"]
        job_id = base_job_id(request)
        exists = VtadlJob.exists(job_id, connection=conn)
        if exists and force:
            n = 2
            while VtadlJob.exists(f"{job_id}-{n}", connection=conn):
                n += 1
            job_id, exists = f"{job_id}-{n}", False
        if exists:
            state = job_state(fetch(conn, job_id))
            if state in ("failed", "cancelled"):  # submitting it again means: try again
                state = f"{retry(conn, job_id)} again (was {state})"
            done.append(Submission(job_id, data["dataset"], data["category"], state, False))
            continue
        policy = None
        if retries:
            intervals = [retry_backoff * 2**i for i in range(retries)] if retry_backoff else 0
            policy = Retry(max=retries, interval=intervals)
        meta = {
            "kind": request["kind"],
            "dataset": data["dataset"],
            "category": data["category"],
            "submitted_at": time.time(),
            "priority": priority,
        }
        try:
            queue.enqueue_call(
                JOB_FUNCTION,
                args=(request,),
                job_id=job_id,
                timeout=timeout,
                result_ttl=KEEP_SECONDS,
                failure_ttl=KEEP_SECONDS,
                retry=policy,
                meta=meta,
                description=f"{request['kind']} {data['dataset']}/{data['category']}",
                unique=True,
            )
        except DuplicateJobError:  # submitted by someone else a moment ago
            state = job_state(fetch(conn, job_id))
            done.append(Submission(job_id, data["dataset"], data["category"], state, False))
            continue
        conn.zadd(INDEX_KEY, {job_id: meta["submitted_at"]})
        done.append(Submission(job_id, data["dataset"], data["category"], "queued", True))
    return done


_STATES = {
    "queued": "queued",
    "started": "running",
    "finished": "finished",
    "failed": "failed",
    "stopped": "cancelled",
    "canceled": "cancelled",
    "scheduled": "waiting to retry",
    "deferred": "deferred",
    "created": "queued",
}


def job_state(job) -> str:
    status = job.get_status(refresh=True)
    status = getattr(status, "value", status)
    if status == "failed" and job.meta.get("cancelled_at"):
        return "cancelled"
    return _STATES.get(status, str(status))


def describe(job) -> dict[str, Any]:
    """What `vtadl status` shows of one job."""
    job.refresh()
    meta = job.meta
    state = job_state(job)
    info = {
        "job_id": job.id,
        "kind": meta.get("kind", "train"),
        "dataset": meta.get("dataset"),
        "category": meta.get("category"),
        "state": state,
        "epoch": meta.get("epoch"),
        "epochs": meta.get("epochs"),
        "submitted_at": meta.get("submitted_at"),
        "started_at": job.started_at.timestamp() if job.started_at else None,
        "ended_at": job.ended_at.timestamp() if job.ended_at and state in FINAL else None,
        "run_dir": meta.get("run_dir"),
        "metrics": meta.get("metrics"),
        "error": None,
        "attempts": meta.get("attempts", 0),
    }
    if state in ("failed", "waiting to retry", "queued") and (
        meta.get("error") or job.get_status() in ("failed", "scheduled")
    ):
        info["error"] = meta.get("error") or _last_error_line(job)
    if state == "cancelled":
        info["error"] = "cancelled"
    return info


def _last_error_line(job) -> str | None:
    result = job.latest_result()
    text = getattr(result, "exc_string", None) or ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


def job_ids(conn) -> list[str]:
    """Every job vtadl knows, oldest first; ids whose job has expired are forgotten."""
    ids = [i.decode() for i in conn.zrange(INDEX_KEY, 0, -1)]
    gone = [i for i in ids if not VtadlJob.exists(i, connection=conn)]
    if gone:
        conn.zrem(INDEX_KEY, *gone)
    return [i for i in ids if i not in gone]


def status(conn, ids: list[str] | None = None) -> list[dict[str, Any]]:
    recover_abandoned(conn, [_queue(conn, p) for p in PRIORITIES])
    return [describe(fetch(conn, i)) for i in (ids or job_ids(conn))]


def cancel(conn, job_id: str) -> str:
    """Cancel a queued job or stop a running one; returns what was done."""
    from rq.command import send_stop_job_command

    job = fetch(conn, job_id)
    state = job_state(job)
    if state in FINAL:
        raise JobError(f"job {job_id} is {state}; there is nothing to cancel")
    job.meta["cancelled_at"] = time.time()
    job.save_meta()
    if state == "running":
        send_stop_job_command(conn, job_id, serializer=_serializer())
        return "stopping"
    job.cancel()
    return "cancelled"


def retry(conn, job_id: str) -> str:
    """Queue a failed or cancelled job again; it resumes from its run's last checkpoint."""
    from rq.registry import CanceledJobRegistry, FailedJobRegistry

    job = fetch(conn, job_id)
    state = job_state(job)
    if state not in ("failed", "cancelled"):
        raise JobError(f"job {job_id} is {state}; only failed or cancelled jobs can be retried")
    for key in ("cancelled_at", "error"):
        job.meta.pop(key, None)
    job.save_meta()
    queue = _queue(conn, job.meta.get("priority", "normal"))
    for registry in (FailedJobRegistry(queue=queue), CanceledJobRegistry(queue=queue)):
        registry.remove(job)
    queue.enqueue_job(job)
    return "queued"


def results(conn) -> list[dict[str, Any]]:
    """The finished jobs with their headline metrics, newest job per category."""
    rows: dict[tuple[str, str], dict] = {}
    for info in status(conn):
        if info["state"] == "finished" and info["metrics"]:
            rows[(info["dataset"], info["category"])] = info
    return sorted(rows.values(), key=lambda r: (r["dataset"], r["category"]))


def append_log(conn, job_id: str, line: str) -> None:
    key = LOG_KEY.format(job_id)
    with conn.pipeline() as pipe:
        pipe.rpush(key, line)
        pipe.ltrim(key, -MAX_LOG_LINES, -1)
        pipe.expire(key, KEEP_SECONDS)
        pipe.execute()


def read_log(conn, job_id: str, start: int = 0) -> list[str]:
    return [line.decode() for line in conn.lrange(LOG_KEY.format(job_id), start, -1)]
