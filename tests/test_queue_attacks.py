"""The queue side of the job service under attack: nothing read from Redis runs, and what
must happen once happens once. A private redis-server per module (never 6379); the hostile
client writes straight into Redis what RQ would import or unpickle (`planted.mark`)."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import planted
import pytest
import test_queue
from rq import Queue
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer
from test_queue import cli, drain, submit

from vtadl.job_contract import (
    JOB_FUNCTION,
    SERIALIZER,
    JobRefused,
    VtadlJob,
    VtadlScheduler,
    clean_registries,
    recover_abandoned,
    registry,
    rq_queue,
)
from vtadl.queue import INDEX_KEY, cancel, fetch, job_state, read_log

# The private Redis (one per module) and the demo data of tests/test_queue.py.
server, conn, data = test_queue.server, test_queue.conn, test_queue.data

QUEUE = "vtadl-normal"
QUEUE_KEY = f"rq:queue:{QUEUE}"
STARTED_KEY = f"rq:wip:{QUEUE}"  # RQ 2.12's StartedJobRegistry
CALLBACKS = ("success_callback_name", "failure_callback_name", "stopped_callback_name")
# The concurrency hammer: processes acting on one job at once, calls (threads) each, rounds.
PROCESSES, CALLS, ROUNDS = 6, 3, 5


@pytest.fixture
def marker(tmp_path: Path, monkeypatch) -> Path:
    """The file `planted.mark` writes if anything calls it (in this process or a child)."""
    path = tmp_path / "planted-ran"
    monkeypatch.setenv(planted.MARKER_ENV, str(path))
    return path


def enqueue(conn, job_id: str, func: str = JOB_FUNCTION, **meta) -> str:
    """A job in vtadl's queue and index, written by plain RQ as any client can."""
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    meta = {"kind": "train", "dataset": "mvtec", "category": "brick", "priority": "normal", **meta}
    queue.enqueue_call(func, args=({},), job_id=job_id, meta=meta)
    conn.zadd(INDEX_KEY, {job_id: time.time()})
    return job_id


def arm(conn, job_id: str, name: str = planted.MARK) -> None:
    """Name a callback of every kind in the job's hash."""
    conn.hset(f"rq:job:{job_id}", mapping=dict.fromkeys(CALLBACKS, name))


def lose(conn, job_id: str, execution: str = "dead") -> None:
    """Make a queued job look started by a worker that died long ago (an expired entry)."""
    conn.lrem(QUEUE_KEY, 0, job_id)
    conn.hset(f"rq:job:{job_id}", "status", "started")
    conn.zadd(STARTED_KEY, {f"{job_id}:{execution}": 1})


def copies(conn, job_id: str) -> int:
    return [i.decode() for i in conn.lrange(QUEUE_KEY, 0, -1)].count(job_id)


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(w in result.stderr for w in words), result.stderr


# -- nothing read from Redis runs ------------------------------------------------------------


@pytest.mark.parametrize("callback", [planted.MARK, "os.system", "builtins.print"])
def test_status_recovers_a_lost_job_without_running_its_callbacks(conn, marker, callback):
    enqueue(conn, "lost")
    arm(conn, "lost", callback)
    lose(conn, "lost")
    enqueue(conn, "foreign", func=planted.MARK)  # a job whose function is not vtadl's
    shown = cli("status")
    assert shown.exit_code == 0, shown.output
    assert "AbandonedJobError" not in shown.output and "Traceback" not in shown.output
    assert not marker.exists()
    assert job_state(fetch(conn, "lost")) == "queued" and copies(conn, "lost") == 1
    assert fetch(conn, "lost").meta["abandoned"] == 1
    assert conn.zcard(STARTED_KEY) == 0
    again = cli("status", "--json")
    assert again.exit_code == 0 and not marker.exists()
    assert {r["job_id"] for r in json.loads(again.stdout)} == {"lost", "foreign"}


def test_results_reads_finished_and_lost_jobs_without_running_anything(conn, marker):
    enqueue(conn, "done", metrics={"image_auroc": 1.0, "pixel_auroc": 0.9, "au_pro": 0.8})
    conn.hset("rq:job:done", "status", "finished")
    arm(conn, "done")
    enqueue(conn, "lost", category="grass")
    arm(conn, "lost", "os.system")
    lose(conn, "lost")
    shown = cli("results", "--json")
    assert shown.exit_code == 0, shown.output
    assert [r["job_id"] for r in json.loads(shown.stdout)] == ["done"]
    assert not marker.exists()


def test_retry_runs_no_callback_and_disarms_the_job(conn, marker):
    enqueue(conn, "hooked")
    assert cancel(conn, "hooked") == "cancelled"
    arm(conn, "hooked")
    done = cli("retry", "hooked")
    assert done.exit_code == 0 and done.stdout.strip() == "hooked: queued", done.output
    assert not marker.exists() and copies(conn, "hooked") == 1
    assert all(conn.hget("rq:job:hooked", c) in (None, b"") for c in CALLBACKS)


def test_cancel_runs_no_callback_of_a_queued_or_a_running_job(conn, marker):
    enqueue(conn, "queued")
    arm(conn, "queued")
    done = cli("cancel", "queued")
    assert done.exit_code == 0 and done.stdout.strip() == "queued: cancelled", done.output
    assert job_state(fetch(conn, "queued")) == "cancelled" and copies(conn, "queued") == 0
    enqueue(conn, "running")
    lose(conn, "running")
    conn.zadd(STARTED_KEY, {"running:dead": time.time() + 600})  # alive, as far as we know
    arm(conn, "running", "os.system")
    done = cli("cancel", "running")
    assert done.exit_code == 0 and done.stdout.strip() == "running: stopping", done.output
    assert not marker.exists()


def test_pickled_meta_is_never_unpickled(conn, marker):
    enqueue(conn, "pickled")
    conn.hset("rq:job:pickled", "meta", planted.PICKLED)
    (row,) = json.loads(cli("status", "pickled", "--json").stdout)
    assert row["state"] == "queued" and "not a JSON object" in row["error"]
    one_line_error(cli("cancel", "pickled"), "pickled", "not a JSON object")
    conn.hset("rq:job:pickled", "status", "canceled")
    one_line_error(cli("retry", "pickled"), "pickled", "not a JSON object")
    assert not marker.exists()


def test_a_job_keeps_no_callback_dependency_or_webhook_to_act_on(conn):
    enqueue(conn, "planted")
    arm(conn, "planted")
    hook = {"url": "http://127.0.0.1:9/", "job_status": "failed", "method": "GET",
            "headers": None, "timeout": 1}  # fmt: skip
    conn.hset("rq:job:planted", mapping={"webhooks": json.dumps([hook]),
                                         "dependency_ids": json.dumps(["other"])})  # fmt: skip
    job = fetch(conn, "planted")
    assert (job.success_callback, job.failure_callback, job.stopped_callback) == (None,) * 3
    assert job.webhooks == [] and job.dependency_ids == []
    with pytest.raises(JobRefused, match="callbacks.*dependencies.*webhooks"):
        _ = job.func_name


def test_every_registry_reads_jobs_as_vtadl_jobs(conn, marker):
    kinds = (StartedJobRegistry, FailedJobRegistry, CanceledJobRegistry, FinishedJobRegistry,
             DeferredJobRegistry, ScheduledJobRegistry)  # fmt: skip
    for kind in kinds:
        built = registry(kind, conn, QUEUE)
        assert built.job_class is VtadlJob and built.serializer is SERIALIZER
        assert built.key == kind(QUEUE, connection=conn).key
    assert rq_queue(conn, QUEUE).job_class is VtadlJob

    enqueue(conn, "failed")  # RQ's own requeue of a failed job, through the built registry
    conn.lrem(QUEUE_KEY, 0, "failed")
    conn.hset("rq:job:failed", "status", "failed")
    conn.zadd(f"rq:failed:{QUEUE}", {"failed": time.time() + 600})
    arm(conn, "failed")
    job = registry(FailedJobRegistry, conn, QUEUE).requeue("failed")
    assert isinstance(job, VtadlJob) and job.failure_callback is None
    assert copies(conn, "failed") == 1

    enqueue(conn, "lost")  # RQ's own cleanup of lost jobs, through the built registry
    arm(conn, "lost")
    lose(conn, "lost")
    registry(StartedJobRegistry, conn, QUEUE).cleanup()
    enqueue(conn, "lost-too")  # and the workers' maintenance: clean_registries
    arm(conn, "lost-too")
    lose(conn, "lost-too")
    clean_registries(rq_queue(conn, QUEUE))
    assert copies(conn, "lost-too") == 1 and conn.zcard(STARTED_KEY) == 0

    enqueue(conn, "due")  # the scheduler: a retry whose backoff is over
    conn.lrem(QUEUE_KEY, 0, "due")
    conn.hset("rq:job:due", "status", "scheduled")
    conn.zadd(f"rq:scheduled:{QUEUE}", {"due": 1})
    arm(conn, "due")
    scheduler = VtadlScheduler([QUEUE], connection=conn, serializer=SERIALIZER)
    scheduler.prepare_registries([QUEUE])
    scheduler.enqueue_scheduled_jobs()
    assert copies(conn, "due") == 1 and conn.zcard(f"rq:scheduled:{QUEUE}") == 0
    assert not marker.exists()


def test_unreadable_jobs_are_one_line_or_one_row(conn):
    enqueue(conn, "garbled")
    conn.hset("rq:job:garbled", "status", "no-such-status")
    (row,) = json.loads(cli("status", "--json").stdout)
    assert row["job_id"] == "garbled" and row["state"] == "unreadable"
    shown = cli("status")
    assert shown.exit_code == 0 and "Traceback" not in shown.output
    one_line_error(cli("retry", "garbled"), "garbled", "cannot be read")
    one_line_error(cli("status", "bad id!"), "bad id!")


# -- smaller ones ----------------------------------------------------------------------------


def test_retry_of_a_job_whose_meta_is_not_json_is_one_line(conn):
    enqueue(conn, "odd")
    assert cancel(conn, "odd") == "cancelled"
    conn.hset("rq:job:odd", "meta", b"\x80\x04not json")
    one_line_error(cli("retry", "odd"), "odd", "not a JSON object")
    assert job_state(fetch(conn, "odd")) == "cancelled"


def test_status_shows_a_perfect_score_as_one(conn, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    enqueue(conn, "perfect", metrics={"image_auroc": 1.0, "pixel_auroc": 0.98765})
    conn.hset("rq:job:perfect", "status", "finished")
    shown = cli("status")
    assert shown.exit_code == 0, shown.output
    assert "img 1.000 pix .9877 pro n/a" in shown.stdout, shown.stdout


# -- what must happen once happens once ------------------------------------------------------


def hammer(
    url: str, job_id: str, action: str, prepare: Callable[[int], None], check: Callable
) -> list[list[str]]:
    """ROUNDS rounds of PROCESSES processes calling `action` on one job at the same moment,
    CALLS times each (in threads); `prepare(round)` sets the job up before each round and
    `check(outcomes)` judges it after. Returns every round's outcomes."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    gate = ctx.Barrier(PROCESSES + 1)
    start = ctx.Value("d", 0.0)
    outcomes = ctx.Queue()
    args = (action, url, job_id, ROUNDS, CALLS, gate, start, outcomes)
    workers = [ctx.Process(target=planted.hammer, args=args) for _ in range(PROCESSES)]
    for w in workers:
        w.start()
    rounds = []
    try:
        for r in range(ROUNDS):
            prepare(r)
            start.value = time.time() + 0.2
            gate.wait(timeout=120)  # go at `start`
            gate.wait(timeout=120)  # every call returned
            got = [o for _ in workers for o in outcomes.get(timeout=30)]
            assert not [o for o in got if o.startswith("crashed")], got
            check(got)
            rounds.append(got)
    finally:
        gate.abort()  # a failed round releases the processes waiting for the next one
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    return rounds


def test_concurrent_retries_queue_a_cancelled_job_once_and_it_runs_once(
    conn, server, data, tmp_path
):
    (job,) = submit(data, tmp_path / "runs", "--category", "brick", "--epochs", "1")
    job_id = job["job_id"]

    def prepare(r: int) -> None:
        assert cancel(conn, job_id) == "cancelled" and copies(conn, job_id) == 0

    def check(got: list[str]) -> None:
        assert got.count("queued") == 1, got
        assert all(o == "queued" or "only failed or cancelled" in o for o in got), got
        assert copies(conn, job_id) == 1 and job_state(fetch(conn, job_id)) == "queued"

    hammer(server.url, job_id, "retry", prepare, check)
    drain(server.url)
    job = fetch(conn, job_id)
    assert job_state(job) == "finished" and job.meta["attempts"] == 1
    trained = [line for line in read_log(conn, job_id) if " train mvtec/brick:" in line]
    assert len(trained) == 1, trained
    assert len(list((tmp_path / "runs" / "mvtec" / "brick").iterdir())) == 1


def test_concurrent_recoveries_requeue_a_lost_job_once(conn, server, marker):
    enqueue(conn, "lost")
    arm(conn, "lost")

    def prepare(r: int) -> None:
        conn.hset("rq:job:lost", "meta", SERIALIZER.dumps({"priority": "normal"}))
        lose(conn, "lost", f"dead{r}")

    def check(got: list[str]) -> None:
        assert copies(conn, "lost") == 1 and job_state(fetch(conn, "lost")) == "queued"
        assert fetch(conn, "lost").meta["abandoned"] == 1
        assert conn.zcard(STARTED_KEY) == 0

    hammer(server.url, "lost", "status", prepare, check)
    assert not marker.exists()
    lose(conn, "lost", "last")  # and the function itself, in this process: one requeue
    assert recover_abandoned(conn, [QUEUE]) == ["lost"] and recover_abandoned(conn, [QUEUE]) == []


def test_a_lost_job_is_failed_after_its_last_loss_or_a_cancel(conn):
    enqueue(conn, "unlucky", abandoned=3)
    lose(conn, "unlucky")
    enqueue(conn, "stopped")
    lose(conn, "stopped")
    conn.zadd(STARTED_KEY, {"stopped:dead": time.time() + 600})
    assert cancel(conn, "stopped") == "stopping"  # its worker never answers
    conn.zadd(STARTED_KEY, {"stopped:dead": 1})
    assert recover_abandoned(conn, [QUEUE]) == []
    rows = {r["job_id"]: r for r in json.loads(cli("status", "--json").stdout)}
    assert rows["unlucky"]["state"] == "failed" and "lost 4 times" in rows["unlucky"]["error"]
    assert rows["stopped"]["state"] == "cancelled"
    assert copies(conn, "unlucky") == copies(conn, "stopped") == 0


def test_concurrent_cancels_cancel_a_queued_job_once(conn, server):
    enqueue(conn, "queued")

    def prepare(r: int) -> None:
        if r:
            assert cli("retry", "queued").exit_code == 0 and copies(conn, "queued") == 1

    def check(got: list[str]) -> None:
        assert got.count("cancelled") == 1, got
        assert all(o == "cancelled" or "nothing to cancel" in o for o in got), got
        assert copies(conn, "queued") == 0 and job_state(fetch(conn, "queued")) == "cancelled"
        assert conn.zscore(f"rq:canceled:{QUEUE}", "queued") is not None

    hammer(server.url, "queued", "cancel", prepare, check)


def test_concurrent_schedulers_queue_a_due_retry_once(conn, server):
    enqueue(conn, "due")

    def prepare(r: int) -> None:
        conn.lrem(QUEUE_KEY, 0, "due")
        conn.hset("rq:job:due", "status", "scheduled")
        conn.zadd(f"rq:scheduled:{QUEUE}", {"due": 1})

    def check(got: list[str]) -> None:
        assert copies(conn, "due") == 1 and job_state(fetch(conn, "due")) == "queued"
        assert conn.zcard(f"rq:scheduled:{QUEUE}") == 0

    hammer(server.url, "due", "schedule", prepare, check)
