"""Workers under faults, against a real redis-server and real `vtadl worker` processes: Redis
restarted under idle and busy workers, a Redis away longer than three heartbeats, workers
killed mid-job, a killed worker's scheduler, and the exit code of a burst with failed jobs.

The seconds from a SIGKILL to the job running again are printed (pytest -s shows them)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_queue import PASSWORD, submit

from vtadl.job_contract import RECONNECT_CAP, in_restart_grace
from vtadl.queue import cancel, fetch, job_state, read_log
from vtadl.service import RedisServer, connect, free_port

HEARTBEAT = "1"
AWAY = "does not answer"  # the worker's line when Redis goes away
BACK = "answers again"  # and when it is back


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> RedisServer:
    srv = RedisServer(tmp_path_factory.mktemp("redis"), free_port(), PASSWORD).start()
    yield srv
    if srv.alive():
        srv.stop()


@pytest.fixture
def conn(server: RedisServer, monkeypatch):
    if not server.alive():  # a test that failed with Redis stopped
        server.start()
    monkeypatch.setenv("VTADL_REDIS_URL", server.url)
    c = connect(server.url)
    c.flushdb()
    return c


@contextlib.contextmanager
def workers(server: RedisServer, folder: Path):
    """`start(name, *args)` starts `vtadl worker --name name --heartbeat 1 ...` in its own
    process group, its output in folder/name.log; every one is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "VTADL_REDIS_URL": server.url}
        command = ["worker", "--name", name, "--heartbeat", HEARTBEAT, *args]
        with open(folder / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "vtadl", *command],
                env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            kill(process)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL a worker and its scheduler (its process group), as a lost machine; its job's
    process dies with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 240) -> float:
    """Seconds until `condition()` holds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def state_of(conn, name: str) -> str | None:
    """The worker's state in RQ's worker registry (idle, busy), None before it starts."""
    state = conn.hget(f"rq:worker:{name}", "state")
    return state.decode() if state else None


def meta(conn, job: dict) -> dict:
    return fetch(conn, job["job_id"]).meta


def epochs_trained(conn, job: dict) -> list[int]:
    history = Path(meta(conn, job)["run_dir"]) / "history.jsonl"
    return [json.loads(line)["epoch"] for line in history.read_text().splitlines()]


def finished(conn, *jobs: dict) -> bool:
    return all(job_state(fetch(conn, j["job_id"])) == "finished" for j in jobs)


def ran_once(conn, job: dict, epochs: int) -> None:
    """Finished, started once (the job's log in Redis only grows: each run says `attempt n`
    when it starts) and trained each epoch once."""
    assert finished(conn, job)
    log = read_log(conn, job["job_id"])
    assert [line for line in log if "attempt" in line][0].count("attempt 1,") == 1
    assert sum("attempt" in line for line in log) == 1, log
    assert meta(conn, job)["attempts"] == 1 and "abandoned" not in meta(conn, job)
    assert epochs_trained(conn, job) == list(range(1, epochs + 1))


def job(conn, data: Path, out: Path, epochs: int) -> dict:
    (submitted,) = submit(data, out, "--category", "brick", "--epochs", str(epochs))
    return submitted


def test_a_worker_waits_out_redis_restarts_idle_and_busy(server, conn, demo_root, tmp_path):
    runs = tmp_path / "runs"
    with workers(server, tmp_path) as start:
        start("w1")
        wait_for(lambda: state_of(conn, "w1") == "idle", "the worker")
        server.stop()  # under the idle worker: same port, same folder, its append-only file
        time.sleep(2)
        server.start()
        first = job(conn, demo_root, runs, epochs=6)  # submitted after the restart
        wait_for(lambda: (meta(conn, first).get("epoch") or 0) >= 2, "two epochs")
        server.stop()  # under the busy worker, its job training
        time.sleep(2)
        server.start()
        second = job(conn, demo_root, runs, epochs=1)
        wait_for(lambda: finished(conn, first, second), "both jobs")
    ran_once(conn, first, 6)
    ran_once(conn, second, 1)
    log = (tmp_path / "w1.log").read_text()
    assert log.count(AWAY) == 2 and log.count(BACK) == 2, log  # once per restart
    assert f"127.0.0.1:{server.port}" in log and PASSWORD not in log


def test_redis_away_longer_than_three_heartbeats_does_not_rerun_the_job(
    server, conn, demo_root, tmp_path
):
    """The job's heartbeat (TTL 9 s) expires while Redis is away for 11 s. A worker started as
    Redis comes back runs its recovery at once and every heartbeat; the job's own worker is
    the last to reconnect (held with SIGSTOP until then): the job must not be requeued."""
    with workers(server, tmp_path) as start:
        running = job(conn, demo_root, tmp_path / "runs", epochs=6)
        busy = start("busy", "--heartbeat", "3")
        wait_for(lambda: (meta(conn, running).get("epoch") or 0) >= 2, "two epochs")
        os.kill(busy.pid, signal.SIGSTOP)  # the worker, not its job's process
        server.stop()
        time.sleep(3 * 3 + 2)
        server.start()
        restarted = time.monotonic()
        start("other", "--heartbeat", "3")
        wait_for(lambda: state_of(conn, "other") == "idle", "the other worker")
        late = time.monotonic() - restarted
        assert late < 9, f"the other worker took {late:.0f} s to start: past the TTL"
        os.kill(busy.pid, signal.SIGCONT)
        wait_for(lambda: finished(conn, running), "the job")
        time.sleep(2 * 3)  # a second run would have begun by now
    ran_once(conn, running, 6)
    assert fetch(conn, running["job_id"]).worker_name == "busy"
    assert "requeued" not in (tmp_path / "other.log").read_text()
    busy_log = (tmp_path / "busy.log").read_text()
    assert busy_log.count(AWAY) == busy_log.count(BACK) == 1, busy_log


def test_recovery_waits_one_heartbeat_ttl_after_redis_comes_back(server, conn):
    """A started job whose heartbeat (TTL 3 s) expired while Redis was away: recovery waits
    until Redis has been up for that TTL and the reconnect cap."""
    from datetime import timedelta

    from rq.utils import current_timestamp, utcformat
    from rq.utils import now as utcnow

    ttl, beat = 3, utcnow() - timedelta(seconds=10)
    conn.hset("rq:job:x", mapping={"status": "started", "last_heartbeat": utcformat(beat)})
    conn.zadd("rq:wip:vtadl-normal", {"x:execution": int(beat.timestamp()) + ttl})
    server.stop()
    server.start()
    revived = connect(server.url)
    assert in_restart_grace(revived, ["vtadl-high", "vtadl-normal"])
    assert not in_restart_grace(revived, ["vtadl-low"])  # nothing expired there
    waited = wait_for(lambda: not in_restart_grace(revived, ["vtadl-normal"]), "the grace", 30)
    assert ttl + RECONNECT_CAP - 2 <= waited <= ttl + RECONNECT_CAP + 2
    assert current_timestamp() > int(beat.timestamp()) + ttl  # expired all along


@pytest.mark.parametrize("other", ["idle", "busy"])
def test_a_killed_workers_job_runs_again_within_a_few_heartbeats(
    other, server, conn, demo_root, tmp_path
):
    runs = tmp_path / "runs"
    with workers(server, tmp_path) as start:
        lost = job(conn, demo_root, runs, epochs=300)
        doomed = start("doomed")
        wait_for(lambda: (meta(conn, lost).get("epoch") or 0) >= 1, "the first epoch")
        if other == "busy":
            long = job(conn, demo_root, runs, epochs=301)
            start("other")
            wait_for(lambda: (meta(conn, long).get("epoch") or 0) >= 1, "the other's epoch")
        else:
            start("other")
            wait_for(lambda: state_of(conn, "other") == "idle", "the other worker")
        kill(doomed)
        killed = time.monotonic()
        requeued = wait_for(lambda: meta(conn, lost).get("abandoned") == 1, "the requeue", 30)
        if other == "busy":  # found by the busy worker; it runs the job once it is free
            assert state_of(conn, "other") == "busy"
            assert cancel(conn, long["job_id"]) == "stopping"
        wait_for(lambda: meta(conn, lost).get("attempts") == 2, "the second run", 60)
        again = time.monotonic() - killed
        assert fetch(conn, lost["job_id"]).worker_name == "other"
    print(f"\n{other} worker: SIGKILL to requeued {requeued:.1f} s, to running again {again:.1f} s")
    assert requeued < 30


def test_a_killed_workers_scheduler_dies_with_it(server, conn, tmp_path):
    with workers(server, tmp_path) as start:
        worker = start("w1")
        wait_for(lambda: conn.hget("rq:scheduler:" + _scheduler(conn), "pid"), "the scheduler")
        scheduler = int(conn.hget("rq:scheduler:" + _scheduler(conn), "pid"))
        assert scheduler != worker.pid and _alive(scheduler)
        os.kill(worker.pid, signal.SIGKILL)  # the worker alone
        worker.wait()
        wait_for(lambda: not _alive(scheduler), "the scheduler to end", 10)


def _scheduler(conn) -> str:
    keys = [k.decode() for k in conn.scan_iter("rq:scheduler:*")]
    names = [k.removeprefix("rq:scheduler:") for k in keys if k.count(":") == 2]
    return names[0] if names else "none"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def test_a_burst_exits_1_with_one_line_when_a_job_failed(server, conn, tmp_path):
    from rq import Queue

    from vtadl.job_contract import SERIALIZER

    env = {**os.environ, "VTADL_REDIS_URL": server.url}
    burst = [sys.executable, "-m", "vtadl", "worker", "--burst"]
    empty = subprocess.run(burst, env=env, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 0, empty.stderr
    queue = Queue("vtadl-normal", connection=conn, serializer=SERIALIZER)
    for n in range(2):  # refused: not the vtadl job
        queue.enqueue_call("os.getcwd", job_id=f"foreign-{n}")
    failed = subprocess.run(burst, env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == "error: 2 jobs failed (vtadl status says why)"
