"""The job service against a real redis-server (a private one per module, never 6379)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtadl.checkpoints import load_checkpoint
from vtadl.cli.main import app
from vtadl.data.demo import make_demo_dataset
from vtadl.queue import INDEX_KEY, fetch, job_state, read_log
from vtadl.service import RedisServer, bundled_binary, connect, free_port, redact

CATEGORIES = ["brick", "grass"]
PASSWORD = "s3cret-pw"
TINY = [
    "--variant", "vtadl_tiny", "--image-size", "32", "--batch-size", "4", "--loader-workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> RedisServer:
    srv = RedisServer(tmp_path_factory.mktemp("redis"), free_port(), PASSWORD).start()
    yield srv
    srv.stop()


@pytest.fixture
def conn(server: RedisServer, monkeypatch):
    monkeypatch.setenv("VTADL_REDIS_URL", server.url)
    c = connect(server.url)
    c.flushdb()  # our own private server
    return c


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("queue_data")
    make_demo_dataset(root, categories=CATEGORIES, image_size=32, n_train=12, n_test_good=4,
                      n_test_defect=2)  # fmt: skip
    return root


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def submit(root: Path, out: Path, *args: str):
    result = cli("submit", "--root", root, "--out", out, *TINY, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_worker(url: str, *args: str) -> subprocess.Popen:
    """`vtadl worker` as its own process group, as it runs on a machine."""
    env = {**os.environ, "VTADL_REDIS_URL": url}
    return subprocess.Popen(
        [sys.executable, "-m", "vtadl", "worker", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def drain(url: str, *args: str, timeout: float = 240, failed: int = 0) -> str:
    """Run a burst worker until the queues are empty: exit code 0, or 1 when `failed` jobs
    failed (and a line says how many)."""
    worker = start_worker(url, "--burst", *args)
    output, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == (1 if failed else 0), output
    if failed:
        assert f"{failed} job" in output, output
    return output


def status(*ids: str) -> list[dict]:
    result = cli("status", *ids, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_submit_all_categories_and_drain_the_queue(conn, server, data: Path, tmp_path: Path):
    jobs = submit(data, tmp_path / "runs", "--all-categories", "--epochs", "2")
    assert [j["category"] for j in jobs] == CATEGORIES
    assert all(j["new"] and j["state"] == "queued" for j in jobs)
    assert all(j["job_id"].startswith(f"mvtec-{j['category']}-") for j in jobs)
    output = drain(server.url)
    assert PASSWORD not in output

    rows = {r["category"]: r for r in status()}
    for name in CATEGORIES:
        r = rows[name]
        assert r["state"] == "finished" and (r["epoch"], r["epochs"]) == (2, 2)
        run = Path(r["run_dir"])
        assert run.parent == tmp_path / "runs" / "mvtec" / name
        stored = json.loads((run / "metrics.json").read_text())
        assert r["metrics"]["pixel_auroc"] == pytest.approx(stored["pixel_auroc"])
        log = read_log(conn, r["job_id"])
        assert [ln.split()[3] for ln in log if " epoch " in ln] == ["1/2", "2/2"]
        assert (run / "job.log").read_text().splitlines() == log
        assert r["started_at"] <= r["ended_at"]

    table = cli("results", "--json")
    assert table.exit_code == 0, table.output
    assert [r["category"] for r in json.loads(table.stdout)] == CATEGORIES
    shown = cli("results").stdout
    assert "mean" in shown and "brick" in shown and "pixel AUROC" in shown
    logs = cli("logs", rows["brick"]["job_id"])
    assert logs.exit_code == 0 and "epoch 2/2" in logs.stdout and "finished:" in logs.stdout


def test_same_request_is_not_queued_twice_unless_forced(conn, data: Path, tmp_path: Path):
    first = submit(data, tmp_path, "--category", "brick", "--epochs", "1")
    again = submit(data, tmp_path, "--category", "brick", "--epochs", "1")
    assert again[0]["job_id"] == first[0]["job_id"] and not again[0]["new"]
    forced = submit(data, tmp_path, "--category", "brick", "--epochs", "1", "--force")
    assert forced[0]["new"] and forced[0]["job_id"] == first[0]["job_id"] + "-2"
    other = submit(data, tmp_path, "--category", "brick", "--epochs", "2")
    assert other[0]["new"] and other[0]["job_id"] != first[0]["job_id"]
    assert conn.zcard(INDEX_KEY) == 3
    assert len(conn.lrange("rq:queue:vtadl-normal", 0, -1)) == 3


def test_failing_job_is_retried_then_failed_with_its_error(conn, server, data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    (job,) = submit(root, tmp_path / "runs", "--category", "grass", "--epochs", "1",
                    "--retries", "1", "--retry-backoff", "0")  # fmt: skip
    shutil.rmtree(root / "grass" / "train")  # the data disappears before a worker runs
    drain(server.url, failed=1)
    (row,) = status(job["job_id"])
    assert row["state"] == "failed"
    assert "grass" in row["error"] and "train" in row["error"]
    assert "\n" not in row["error"]
    assert fetch(conn, job["job_id"]).meta["attempts"] == 2  # the first run and one retry
    shown = cli("status")
    assert "failed" in shown.stdout and "Traceback" not in shown.stdout


def test_cancel_a_queued_job_then_retry_it(conn, server, data, tmp_path):
    (job,) = submit(data, tmp_path / "runs", "--category", "brick", "--epochs", "1")
    done = cli("cancel", job["job_id"])
    assert done.exit_code == 0 and "cancelled" in done.stdout
    drain(server.url)  # nothing to run
    (row,) = status(job["job_id"])
    assert row["state"] == "cancelled" and row["run_dir"] is None
    again = cli("cancel", job["job_id"])
    assert again.exit_code == 2 and "nothing to cancel" in again.stderr

    (again,) = submit(data, tmp_path / "runs", "--category", "brick", "--epochs", "1")
    assert again["job_id"] == job["job_id"] and again["state"] == "queued again (was cancelled)"
    assert cli("cancel", job["job_id"]).exit_code == 0
    assert cli("retry", job["job_id"]).exit_code == 0
    assert status(job["job_id"])[0]["state"] == "queued"
    drain(server.url)
    assert status(job["job_id"])[0]["state"] == "finished"
    assert cli("retry", job["job_id"]).exit_code == 2  # finished jobs are not retried


def test_cancel_a_running_job(conn, server, data, tmp_path):
    (job,) = submit(data, tmp_path / "runs", "--category", "brick", "--epochs", "200")
    worker = start_worker(server.url, "--burst")
    try:
        _wait(lambda: (status(job["job_id"])[0]["epoch"] or 0) >= 1, "the first epoch")
        assert cli("cancel", job["job_id"]).stdout.strip().endswith("stopping")
        worker.communicate(timeout=60)
    finally:
        worker.kill()
    (row,) = status(job["job_id"])
    assert row["state"] == "cancelled"
    assert load_checkpoint(Path(row["run_dir"]) / "checkpoints" / "last.pt")["epoch"] < 199


def _wait(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_worker_job_is_requeued_and_resumes(conn, server, data, tmp_path):
    epochs = 12
    (job,) = submit(data, tmp_path / "runs", "--category", "brick", "--epochs", str(epochs))
    worker = start_worker(server.url, "--heartbeat", "1")
    try:
        _wait(lambda: (fetch(conn, job["job_id"]).meta.get("epoch") or 0) >= 3, "3 epochs")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its job: a lost machine
        worker.wait()
    run = Path(fetch(conn, job["job_id"]).meta["run_dir"])
    done_before = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] + 1
    assert done_before < epochs
    assert job_state(fetch(conn, job["job_id"])) == "running"  # nobody knows yet
    time.sleep(4)  # three heartbeats of 1 s: the job is now abandoned

    drain(server.url, "--heartbeat", "1")  # its maintenance finds and requeues the job
    (row,) = status(job["job_id"])
    assert row["state"] == "finished" and row["run_dir"] == str(run)
    meta = fetch(conn, job["job_id"]).meta
    assert meta["attempts"] == 2 and meta["abandoned"] == 1
    history = _history(run)
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    log = read_log(conn, job["job_id"])
    assert any("resuming" in line for line in log)
    second = log[next(i for i, ln in enumerate(log) if "resuming" in ln) :]
    trained_again = [int(ln.split()[3].split("/")[0]) for ln in second if " epoch " in ln]
    assert trained_again == list(range(done_before + 1, epochs + 1))


def test_jobs_survive_a_redis_crash(conn, server, data, tmp_path):
    jobs = submit(data, tmp_path / "runs", "--all-categories", "--epochs", "1")
    server.kill()  # SIGKILL right after the submission returned
    server.start()
    revived = connect(server.url)
    assert [job_state(fetch(revived, j["job_id"])) for j in jobs] == ["queued", "queued"]
    drain(server.url)
    assert [r["state"] for r in status()] == ["finished", "finished"]


def test_worker_refuses_foreign_functions_and_non_json_payloads(conn, server, tmp_path):
    from rq import Queue
    from rq.serializers import JSONSerializer

    marker = tmp_path / "pwned"
    queue = Queue("vtadl-normal", connection=conn, serializer=JSONSerializer)
    foreign = queue.enqueue_call("os.system", args=(f"touch {marker}",), job_id="foreign")
    garbled = queue.enqueue_call("vtadl.jobs.run", args=({},), job_id="garbled")
    conn.hset("rq:job:garbled", "data", b"\x80\x04\x95cos\nsystem\n")  # a pickle, not JSON
    hooked = queue.enqueue_call("vtadl.jobs.run", args=({},), job_id="hooked")
    conn.hset("rq:job:hooked", "failure_callback_name", "os.system")
    drain(server.url, failed=3)
    assert not marker.exists()
    for job, reason in [
        (foreign, "not a vtadl job"),
        (garbled, "not valid JSON"),
        (hooked, "callbacks are not allowed"),
    ]:
        job = fetch(conn, job.id)
        assert job_state(job) == "failed"
        assert reason in job.latest_result().exc_string
        assert "attempts" not in job.meta  # the job function never started


def test_bad_submissions_are_one_line_and_enqueue_nothing(conn, server, data, tmp_path):
    cases = [
        (["--dataset", "imagenet", "--root", data, "--all-categories"], "dataset"),
        (["--root", data, "--category", "bottle"], "bottle"),
        (["--root", tmp_path / "missing", "--all-categories"], "missing"),
        (["--root", data, "--category", "brick", "--lr", "-1"], "learning rate"),
        (["--root", data, "--category", "brick", "--priority", "urgent"], "priority"),
        (["--root", data, "--category", "brick", "--timeout", "soon"], "duration"),
        (["--root", data, "--category", "brick", "--category", "bottle"], "bottle"),
        (["--root", data], "--all-categories"),
        (["--root", data, "--category", "brick", "--tune", "--gaussians", "0,4"], "at least 1"),
        (["--root", data, "--category", "brick", "--tune", "--scheduler", "pbt"], "scheduler"),
        (["--root", data, "--category", "brick", "--gaussians", "4,8"], "--tune"),
    ]
    for args, word in cases:
        result = cli("submit", *args, "--out", tmp_path)
        assert result.exit_code == 2, (args, result.output)
        assert word in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert conn.zcard(INDEX_KEY) == 0 and conn.llen("rq:queue:vtadl-normal") == 0

    dead = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    result = cli("submit", "--root", data, "--category", "brick", "--redis-url", dead)
    assert result.exit_code == 2 and "does not answer" in result.stderr
    assert PASSWORD not in result.output and redact(dead) in result.stderr
    for command in (["status"], ["results"], ["worker", "--burst"], ["logs", "x"]):
        result = cli(*command, "--redis-url", dead)
        assert result.exit_code == 2 and "does not answer" in result.stderr, command
    assert cli("status", "no-such-job").exit_code == 2


def test_private_server_uses_the_bundled_binary(tmp_path: Path):
    srv = RedisServer(tmp_path, free_port(), "pw", binary=bundled_binary()).start()
    try:
        c = connect(srv.url)
        assert c.info("server")["redis_version"].startswith("6.2")
        assert c.config_get("appendonly")["appendonly"] == "yes"
    finally:
        srv.stop()
    assert not srv.alive()


def test_service_commands_start_reuse_and_stop_the_private_server(tmp_path, monkeypatch):
    monkeypatch.setenv("VTADL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("VTADL_REDIS_URL", raising=False)
    first = cli("service", "start")
    assert first.exit_code == 0 and "***" in first.stdout
    record = json.loads((tmp_path / "redis" / "server.json").read_text())
    assert record["password"] not in first.stdout
    assert (tmp_path / "redis" / "server.json").stat().st_mode & 0o777 == 0o600
    assert cli("status", "--json").exit_code == 0  # uses it without starting another
    assert json.loads((tmp_path / "redis" / "server.json").read_text()) == record
    assert cli("service", "stop").exit_code == 0
    assert cli("service", "status").exit_code == 1


@pytest.mark.slow
def test_a_tune_job_runs_through_the_queue(conn, server, data, tmp_path):
    (job,) = submit(data, tmp_path / "runs", "--category", "grass", "--epochs", "2", "--tune",
                    "--gaussians", "2,4", "--noise", "0.1", "--scheduler", "fifo")  # fmt: skip
    assert job["job_id"].startswith("tune-mvtec-grass-")
    drain(server.url)
    (row,) = status(job["job_id"])
    assert row["state"] == "finished", row
    assert isinstance(row["metrics"]["pixel_auroc"], float)
    experiment = tmp_path / "runs" / "tune" / "mvtec" / "grass" / job["job_id"]
    rows = (experiment / "tune_results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # a header and the two trials
    assert Path(row["run_dir"]).is_dir()
