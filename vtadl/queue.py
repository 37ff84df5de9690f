"""The job queue, from the submitting side: requests, ids, submission, status and control.

A job is one JSON request, enqueued by dotted path (`vtadl.jobs.run`) with RQ's JSON
serializer:

    {"version": 1, "kind": "train", "config": Config.to_dict(), "options": {}}

`kind` selects what the worker does with the config (`train` today; `tune` adds a search,
its settings in `options`), so a new kind needs no new format. A job's id is derived from
the dataset, the category and a hash of the whole request: submitting the same request twice
finds the first job instead of training twice. Retry and cancel are atomic on the job's
state (`job_contract.atomically`): of several at once, one acts.

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
    SERIALIZER,
    VtadlJob,
    atomically,
    fetch_job,
    queue_name,
    recover_abandoned,
    registry,
    rq_queue,
)

INDEX_KEY = "vtadl:jobs"  # sorted set: job id -> submission time
LOG_KEY = "vtadl:log:{}"
KEEP_SECONDS = 30 * 86400  # finished and failed jobs, and their logs
DEFAULT_TIMEOUT = 48 * 3600
MAX_DURATION = 365 * 86400  # a job's timeout: a longer one is a typo
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
    if seconds > MAX_DURATION:
        raise ConfigError(f"a duration must be at most 365d, got {text!r}")
    return int(seconds)


# Reruns of a failed job wait retry_backoff * 2**i seconds: past these the waits are years.
MAX_RETRIES = 20
MAX_RETRY_BACKOFF = 86_400


def check_retries(retries: int, retry_backoff: int) -> None:
    """A ConfigError unless `retries` reruns with a first wait of `retry_backoff` seconds
    make sense."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ConfigError(f"retries must be between 0 and {MAX_RETRIES}, got {retries}")
    if not 0 <= retry_backoff <= MAX_RETRY_BACKOFF:
        raise ConfigError(
            f"the retry backoff must be between 0 and {MAX_RETRY_BACKOFF} s, got {retry_backoff}"
        )


@dataclass
class Submission:
    job_id: str
    dataset: str
    category: str
    state: str
    new: bool  # False: the same request was already submitted; this is that job

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _queue(conn, priority: str = "normal"):
    return rq_queue(conn, queue_name(priority))


class UnreadableJob(JobError):
    """A job whose hash in Redis is not one RQ wrote (RQ cannot even parse it)."""


def fetch(conn, job_id: str) -> VtadlJob:
    """The job, read as a `VtadlJob`: JobError if there is none, UnreadableJob if its hash
    cannot be parsed."""
    from rq.exceptions import NoSuchJobError
    from rq.job import JOB_ID_PATTERN

    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise JobError(f"no job {job_id!r}: a job id has only letters, digits, _ and -")
    try:
        return fetch_job(conn, job_id)
    except NoSuchJobError:
        raise JobError(f"no job {job_id!r} (vtadl status lists the jobs)") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UnreadableJob(f"job {job_id!r} cannot be read: {exc}") from None


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

    check_retries(retries, retry_backoff)
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
            state = _submit_again(conn, job_id)
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


def _submit_again(conn, job_id: str) -> str:
    """The state of a job submitted again; a failed or cancelled one is retried (unless
    another process retried it a moment ago)."""
    state = job_state(fetch(conn, job_id))
    if state not in ("failed", "cancelled"):
        return state
    try:
        return f"{retry(conn, job_id)} again (was {state})"
    except JobError:
        return job_state(fetch(conn, job_id))


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
    """What `vtadl status` shows of one job. Meta of the wrong type (written by something
    other than vtadl) shows as missing."""
    job.refresh()
    meta = job.meta
    state = job_state(job)
    text, number = (str,), (int, float)
    info = {
        "job_id": job.id,
        "kind": _typed(meta.get("kind", "train"), text),
        "dataset": _typed(meta.get("dataset"), text),
        "category": _typed(meta.get("category"), text),
        "state": state,
        "epoch": _typed(meta.get("epoch"), number),
        "epochs": _typed(meta.get("epochs"), number),
        "submitted_at": _typed(meta.get("submitted_at"), number),
        "started_at": job.started_at.timestamp() if job.started_at else None,
        "ended_at": job.ended_at.timestamp() if job.ended_at and state in FINAL else None,
        "run_dir": _typed(meta.get("run_dir"), text),
        "best_config": _typed(meta.get("best_config"), text),  # a search's winner
        "metrics": _typed(meta.get("metrics"), (dict,)),
        "error": None,
        "attempts": _typed(meta.get("attempts"), number) or 0,
    }
    error = _typed(meta.get("error"), text)
    if job.meta_unreadable:
        info["error"] = error = "its meta is not a JSON object"
    if state in ("failed", "waiting to retry", "queued") and (
        error or job.get_status() in ("failed", "scheduled")
    ):
        info["error"] = error or _last_error_line(job)
    if state == "cancelled":
        info["error"] = "cancelled"
    return info


def _typed(value: Any, types: tuple[type, ...]) -> Any:
    return value if isinstance(value, types) and not isinstance(value, bool) else None


def _unreadable(job_id: str, error: str) -> dict[str, Any]:
    """The row of a job that cannot be read: its id, state `unreadable`, the reason."""
    row = {"job_id": job_id, "state": "unreadable", "error": error, "attempts": 0}
    missing = "kind dataset category epoch epochs submitted_at started_at ended_at run_dir metrics"
    return {**dict.fromkeys(missing.split()), **row}


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
    """Every job (or these), after requeueing the jobs whose worker was lost. A job that
    cannot be read is listed as `unreadable` with the reason."""
    recover_abandoned(conn, [queue_name(p) for p in PRIORITIES])
    rows = []
    for job_id in ids or job_ids(conn):
        try:
            rows.append(describe(fetch(conn, job_id)))
        except UnreadableJob as exc:
            rows.append(_unreadable(job_id, str(exc)))
    return rows


def _writable(job, job_id: str) -> None:
    if job.meta_unreadable:
        message = "its meta is not a JSON object (not written by vtadl); left as it is"
        raise JobError(f"job {job_id}: {message}")


def cancel(conn, job_id: str) -> str:
    """Cancel a queued job or stop a running one; returns what was done. Atomic: of several
    concurrent cancels, one cancels and the others find the job cancelled. A running job
    whose worker is lost is failed, not requeued, when its loss is found."""
    from redis.exceptions import WatchError
    from rq.command import send_command
    from rq.exceptions import InvalidJobOperation

    worker = None

    def act(pipe) -> str:
        nonlocal worker
        job = fetch(conn, job_id)
        state = job_state(job)
        if state in FINAL:
            raise JobError(f"job {job_id} is {state}; there is nothing to cancel")
        _writable(job, job_id)
        job.meta["cancelled_at"] = time.time()
        pipe.multi()
        pipe.hset(job.key, "meta", SERIALIZER.dumps(job.meta))
        if state == "running":
            worker = job.worker_name
            return "stopping"
        try:
            job.cancel(pipeline=pipe)
        except InvalidJobOperation:  # cancelled by another process since it was read
            raise WatchError from None
        return "cancelled"

    done = atomically(conn, job_id, act)
    if worker:  # what rq.command.send_stop_job_command sends, without reading the job again
        send_command(conn, worker, "stop-job", job_id=job_id)
    return done


def retry(conn, job_id: str) -> str:
    """Queue a failed or cancelled job again; it resumes from its run's last checkpoint.
    Atomic: of several concurrent retries, one queues the job and the others find it queued."""
    from rq.registry import CanceledJobRegistry, FailedJobRegistry

    def act(pipe) -> str:
        job = fetch(conn, job_id)
        state = job_state(job)
        if state not in ("failed", "cancelled"):
            raise JobError(f"job {job_id} is {state}; only failed or cancelled jobs can be retried")
        _writable(job, job_id)
        queue = _queue(conn, job.meta.get("priority", "normal"))
        for key in ("cancelled_at", "error"):
            job.meta.pop(key, None)
        pipe.multi()
        for kind in (FailedJobRegistry, CanceledJobRegistry):
            registry(kind, conn, job.origin).remove(job, pipeline=pipe)
        queue.enqueue_job(job, pipeline=pipe)  # saves the meta with the job
        return "queued"

    return atomically(conn, job_id, act)


def results(conn) -> list[dict[str, Any]]:
    """The finished jobs with their headline metrics, newest job per category."""
    rows: dict[tuple[str, str], dict] = {}
    for info in status(conn):
        if info["state"] == "finished" and info["metrics"] and info["dataset"] and info["category"]:
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
