"""Cluster files as `ray up` reads them, the vtadl commands they run, and local pack copies."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from vtadl.cli.main import app
from vtadl.config import default_config
from vtadl.data.stage import local_copy, sha256
from vtadl.exceptions import DataError
from vtadl.queue import fetch, job_state, make_request, submit
from vtadl.service import RedisServer, connect, free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [REPO / "ray_cluster.yaml", *sorted((REPO / "cluster").glob("*.yaml"))]


def _commands(config: dict) -> list[str]:
    found = []
    for key, value in config.items():
        if key.endswith("_commands"):
            found += list(value)
    for node_type in (config.get("available_node_types") or {}).values():
        for key, value in node_type.items():
            if key.endswith("_commands"):
                found += list(value)
    return found


def vtadl_invocations(command: str) -> list[tuple[list[str], list[str]]]:
    """(sub-command path, --options) of every `vtadl ...` call in a shell command."""
    calls = []
    for segment in re.split(r"&&|;|\|\||>>|\s&\s|\s&$", command):
        match = re.search(r"(?<![\w/.~-])vtadl((?:\s+[a-z][a-z-]*)+)(.*)", segment)
        if match:
            path = match.group(1).split()
            calls.append((path, re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", match.group(2))))
    return calls


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_own_validation(path: Path) -> None:
    # The two steps `ray up` takes before it touches a cloud. They are Ray's private API
    # (ray.autoscaler._private.util), so pyproject.toml pins Ray's minor version.
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["cluster_name"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_vtadl_command_in_cluster_files_exists(path: Path) -> None:
    root = typer.main.get_command(app)
    calls = [
        c for cmd in _commands(yaml.safe_load(path.read_text())) for c in vtadl_invocations(cmd)
    ]
    assert any(p == ["worker"] for p, _ in calls) and any(
        p[:2] == ["service", "start"] for p, _ in calls
    )
    for sub_path, options in calls:
        command = root
        for name in sub_path:
            assert name in getattr(command, "commands", {}), (sub_path, path)
            command = command.commands[name]
        known = {opt for param in command.params for opt in param.opts}
        assert set(options) <= known, (sub_path, sorted(set(options) - known))


def test_the_command_parser_sees_options_and_ignores_paths() -> None:
    cmd = ". ~/.vtadl/env && vtadl service start --dir ~/redis --port 6380 ; ls ~/vtadl/x"
    assert vtadl_invocations(cmd) == [(["service", "start"], ["--dir", "--port"])]
    assert vtadl_invocations("nohup vtadl worker --ray-adress a >> log 2>&1 &") == [
        (["worker"], ["--ray-adress"])
    ]


def test_local_copy_matches_its_source_and_replaces_a_stale_one(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "mvtec_brick.h5"
    shared.parent.mkdir()
    shared.write_bytes(os.urandom(3 * 2**20 + 17))
    node = tmp_path / "node"
    copy1 = local_copy(shared, node)
    assert copy1.parent == node and sha256(copy1) == sha256(shared)
    assert local_copy(shared, node) == copy1  # reused, not copied again
    first_inode = copy1.stat().st_ino

    shared.write_bytes(os.urandom(2**20))  # repacked: other content and time
    copy2 = local_copy(shared, node)
    assert copy2 == copy1 and sha256(copy2) == sha256(shared)
    assert copy2.stat().st_ino != first_inode

    copy2.write_bytes(b"truncated")  # a damaged copy of another size is replaced too
    assert sha256(local_copy(shared, node)) == sha256(shared)
    assert not list(node.glob(".*.tmp"))

    with pytest.raises(DataError, match="not found"):
        local_copy(tmp_path / "missing.h5", node)


# --- two Ray nodes on loopback, a DDP job through the queue ----------------------------------

RAY = str(Path(sys.executable).parent / "ray")
TOKEN = "vtadl-test-token-0123456789abcdef0123456789"


def _ray_nodes(address: str, env: dict) -> list[dict]:
    """Alive nodes of a cluster, asked from a separate driver process."""
    probe = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', "
        "log_to_driver=False); print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A Ray head (2 CPUs) and a second node (1 CPU), token authentication on, each `ray start
    --block` in its own process group so that either can be killed like a lost machine."""
    logs = tmp_path_factory.mktemp("ray_nodes")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", '--resources={"vt_head": 1}',
         "--include-dashboard=false", *common],
        env=env, start_new_session=True, stdout=open(logs / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    _wait_for(lambda: _port_open(port), "the Ray head", 60)
    second = subprocess.Popen(
        [RAY, "start", f"--address={address}", "--num-cpus=1", '--resources={"vt_second": 1}',
         *common],
        env=env, start_new_session=True, stdout=open(logs / "second.log", "w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    _wait_for(lambda: len(_ray_nodes(address, env)) == 2, "two Ray nodes", 90)
    nodes = {
        ("second" if "vt_second" in n["Resources"] else "head"): n["NodeID"]
        for n in _ray_nodes(address, env)
    }
    yield {"address": address, "env": env, "nodes": nodes, "second": second}
    for proc in (second, head):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def queue_redis(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("cluster_redis"), free_port(), "pw").start()
    yield srv
    srv.stop()


def _started(run: Path) -> list[dict]:
    path = run / "workers" / "started.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_ddp_job_spans_two_nodes_and_survives_losing_one(two_nodes, queue_redis, demo_root,
                                                         tmp_path):  # fmt: skip
    env = {**two_nodes["env"], "VTADL_REDIS_URL": queue_redis.url}
    epochs = 12
    submitted = CliRunner().invoke(
        app,
        ["submit", "--root", str(demo_root), "--category", "brick", "--variant", "vtadl_tiny",
         "--image-size", "32", "--batch-size", "4", "--epochs", str(epochs), "--strategy", "ddp",
         "--num-workers", "2", "--placement", "spread", "--out", str(tmp_path / "runs"),
         "--redis-url", queue_redis.url, "--json"],
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    job_id = json.loads(submitted.stdout.strip().splitlines()[-1])[0]["job_id"]
    conn = connect(queue_redis.url)
    worker = subprocess.Popen(
        [sys.executable, "-m", "vtadl", "worker", "--burst", "--ray-address",
         two_nodes["address"]],
        env=env, start_new_session=True, stdout=open(tmp_path / "worker.log", "w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for(lambda: fetch(conn, job_id).meta.get("run_dir"), "the job to start", 120)
        run = Path(fetch(conn, job_id).meta["run_dir"])
        history = run / "history.jsonl"
        _wait_for(
            lambda: history.exists() and len(history.read_text().splitlines()) >= 3,
            "three epochs",
            240,
        )
        before = _started(run)
        assert {s["node_id"] for s in before} == set(two_nodes["nodes"].values())
        kept = history.read_text().splitlines()[:2]  # epochs checkpointed before the loss
        os.killpg(two_nodes["second"].pid, signal.SIGKILL)  # the second machine is lost
        killed_at = time.time()
        worker.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
    job = fetch(conn, job_id)
    assert job_state(job) == "finished", (tmp_path / "worker.log").read_text()[-3000:]
    assert job.meta["attempts"] == 1  # Ray Train recovered inside the job
    lines = history.read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == list(range(1, epochs + 1))
    assert lines[:2] == kept  # resumed from a checkpoint: earlier epochs not trained again
    restarted = [s for s in _started(run) if s["time"] > killed_at]
    assert len(restarted) == 2
    assert {s["node_id"] for s in restarted} == {two_nodes["nodes"]["head"]}
    assert json.loads((run / "metrics.json").read_text())["pixel_auroc"] > 0


@pytest.mark.slow
def test_a_worker_without_the_ray_token_is_refused(two_nodes, queue_redis, demo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["VTADL_REDIS_URL"] = queue_redis.url
    conn = connect(queue_redis.url)
    conn.flushdb()
    config = default_config("vtadl_tiny").override(
        data={"root": str(demo_root), "category": "brick"},
        train={"epochs": 1, "batch_size": 4, "strategy": "ddp", "num_workers": 2,
               "out": str(tmp_path / "runs"), "ray_address": two_nodes["address"]},
    )  # fmt: skip
    (job,) = submit(conn, [make_request("train", config)])
    done = subprocess.run(
        [sys.executable, "-m", "vtadl", "worker", "--burst"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 1 and "1 job failed" in done.stderr, done.stderr[-2000:]
    refused = fetch(conn, job.job_id)
    assert job_state(refused) == "failed"
    assert "token" in refused.meta["error"] and two_nodes["address"] in refused.meta["error"]


def test_training_reads_the_node_local_copy_of_its_pack(make_config, tmp_path: Path) -> None:
    from vtadl.runs import fit

    node = tmp_path / "node-local"
    config = make_config(epochs=1).override(data={"local_copy": str(node)})
    run = fit(config)
    (shared,) = (tmp_path / "runs" / "packs").glob("*.h5")
    (copied,) = node.glob("*.h5")
    assert sha256(copied) == sha256(shared)
    assert json.loads(copied.with_suffix(".json").read_text())["sha256"] == sha256(shared)
    assert (run / "checkpoints" / "last.pt").exists()
