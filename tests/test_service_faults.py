"""The job service under faults: a private Redis that crashes or finds its port taken, a
Redis that accepts connections and never answers, and hostile or absurd input. Real parts
only: private redis-servers on free ports, a silent TCP server in a thread of the test."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import typer
from click.testing import Result
from typer.testing import CliRunner

from vtadl.cli.console import handle_errors
from vtadl.cli.main import app
from vtadl.config import default_config, load_config
from vtadl.exceptions import ConfigError
from vtadl.service import (
    COMMAND_TIMEOUT,
    PrivateServer,
    RedisServer,
    connect,
    free_port,
    redact,
)

PASSWORD = "s3cret-pw"
# A generous bound on a command facing a silent Redis (the timeouts are a few seconds):
# the outcome is checked, not the exact time.
PATIENCE = 30


def cli(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line(result: Result, *words: str) -> str:
    """The result is exit code 2 with exactly one line on stderr naming `words`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


class SilentServer:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state folder of the test's own; its private Redis is stopped at the end."""
    folder = tmp_path / "state"
    monkeypatch.setenv("VTADL_STATE_DIR", str(folder))
    monkeypatch.delenv("VTADL_REDIS_URL", raising=False)
    yield folder
    PrivateServer(folder / "redis").stop()


# -- the private Redis keeps its port ------------------------------------------------------


def test_private_redis_keeps_its_port_and_data_after_a_crash(state: Path):
    private = PrivateServer()
    first = private.ensure()
    connect(first.url).set("kept", "yes")
    first.kill()  # SIGKILL, as a crash would end it
    assert private.running() is None
    again = private.ensure()
    assert (again.port, again.password) == (first.port, first.password)
    assert connect(again.url).get("kept") == b"yes"
    said = cli("service", "status")
    assert said.exit_code == 0 and f"port {first.port}" in said.stdout
    assert first.password not in said.output


def test_a_taken_port_is_one_line_naming_it_and_how_to_move(state: Path, silent: SilentServer):
    private = PrivateServer()
    first = private.ensure()
    first.kill()
    # something else takes the port while the private Redis is down
    record = json.loads(private.record.read_text())
    private.record.write_text(json.dumps({**record, "port": silent.port}))
    taken = (f"port {silent.port}", "vtadl service stop, then vtadl service start --port")
    for command in (["service", "start"], ["service", "status"], ["status"]):
        tic = time.monotonic()
        one_line(cli(*command), *taken)
        assert time.monotonic() - tic < PATIENCE
    moved = free_port()
    assert cli("service", "start", "--port", moved).exit_code == 0
    assert private.running().port == moved
    assert cli("service", "start").exit_code == 0  # the new port is kept
    assert json.loads(private.record.read_text())["port"] == moved


# -- files are private -----------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_folder_and_server_files_are_private(state: Path):
    folder = state / "redis"
    folder.mkdir(parents=True)
    state.chmod(0o755)
    folder.chmod(0o755)
    (folder / "redis.log").write_text("from an earlier version\n")
    (folder / "redis.log").chmod(0o644)
    old = os.umask(0o022)
    try:
        server = PrivateServer().ensure()
    finally:
        os.umask(old)
    connect(server.url).set("request", "a job's whole request")  # the AOF now holds it
    assert _mode(state) == 0o700 and _mode(folder) == 0o700
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"redis.conf", "server.json", "redis.log"} <= {p.name for p in files}
    assert any("appendonly" in p.name for p in files)
    for path in files:
        assert _mode(path) == 0o600, path
    for path in (p for p in folder.rglob("*") if p.is_dir()):
        assert _mode(path) == 0o700, path


# -- a Redis that never answers ----------------------------------------------------------------

# Each command that talks to Redis, with what it needs besides the URL.
COMMANDS = {
    "status": ["status"],
    "results": ["results"],
    "retry": ["retry", "some-job"],
    "cancel": ["cancel", "some-job"],
    "logs": ["logs", "some-job"],
    "worker --burst": ["worker", "--burst"],
}


def test_every_command_gives_one_line_for_a_silent_redis(
    silent: SilentServer, demo_root: Path, tmp_path: Path
):
    url = f"redis://:{PASSWORD}@127.0.0.1:{silent.port}/0"
    submit = ["submit", "--root", demo_root, "--category", "brick", "--variant", "vtadl_tiny",
              "--out", tmp_path / "runs"]  # fmt: skip
    commands = {**COMMANDS, "submit": submit}
    env = {**os.environ, "VTADL_REDIS_URL": url}
    started = {
        name: (
            time.monotonic(),
            subprocess.Popen(
                [sys.executable, "-m", "vtadl", *map(str, args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for name, args in commands.items()
    }
    took = {}
    try:
        for name, (tic, proc) in started.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(0, PATIENCE + tic - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not give up on a silent Redis within {PATIENCE} s")
            took[name] = round(time.monotonic() - tic, 1)
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            assert proc.returncode == 2, (name, stdout, stderr)
            assert len(lines) == 1 and redact(url) in lines[0], (name, stderr)
            assert "does not answer" in lines[0] and PASSWORD not in stdout + stderr, (name, stderr)
    finally:
        for _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    print("seconds to the one-line error, all at once:", took)


def test_a_worker_connection_outlasts_its_blocking_read(tmp_path: Path):
    server = RedisServer(tmp_path, free_port(), PASSWORD).start()
    try:
        block = COMMAND_TIMEOUT + 1  # longer than a plain command may take
        worker = connect(server.url, for_worker=True, block_seconds=block)
        assert worker.blpop(["nothing"], timeout=block) is None  # not a TimeoutError
        with pytest.raises(redis.TimeoutError):
            connect(server.url).blpop(["nothing"], timeout=block)
    finally:
        server.stop()


def test_concurrent_starts_make_one_private_redis(state: Path):
    found: list[tuple[int, int | None]] = []

    def start() -> None:
        server = PrivateServer().ensure()
        found.append((server.port, server.pid()))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 3 and len(set(found)) == 1, found


def test_a_redis_error_after_connecting_is_one_line(capsys: pytest.CaptureFixture[str]):
    dead = redis.Redis(port=free_port(), retry=None)  # a real refused connection

    with pytest.raises(typer.Exit) as caught:
        handle_errors(dead.ping)()
    assert caught.value.exit_code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Redis failed during the command" in lines[0], lines


def test_redact_hides_every_password_and_never_raises():
    assert redact("redis://:pw@127.0.0.1:99999/0") == "redis://:***@127.0.0.1:99999/0"
    assert redact("redis://user:pw@[::1]:6379/0") == "redis://user:***@[::1]:6379/0"
    assert redact("redis://h:1/0?password=pw&db=2") == "redis://h:1/0?password=***&db=2"
    assert redact("redis://user@h:1/0") == "redis://user@h:1/0"


# -- smaller ones ------------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["../data/brick", "/tmp/brick", "..", ".", "a/b", "a\\b"])
def test_a_category_must_be_a_plain_name(category: str, demo_root: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="plain name"):
        default_config("vtadl_tiny").override(data={"category": category})
    dead = f"redis://127.0.0.1:{free_port()}/0"  # refused before any connection
    for command in ("train", "submit", "tune"):
        args = [command, "--root", demo_root, "--category", category, "--variant", "vtadl_tiny",
                "--image-size", "32", "--epochs", "1", "--out", tmp_path / "runs"]  # fmt: skip
        if command == "submit":
            args += ["--redis-url", dead]
        one_line(cli(*args), "plain name")
    assert not (tmp_path / "runs").exists() and not (demo_root / "mvtec").exists()


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("train", "epochs", "1e300"),
        ("train", "epochs", 10**6),
        ("train", "batch_size", 10**9),
        ("train", "num_workers", 10**9),
        ("train", "seed", 2**70),
        ("data", "num_workers", 10**6),
        ("model", "n_gaussians", 10**12),
        ("model", "num_heads", 0),
        ("eval", "n_maps", 10**12),
    ],
)
def test_absurd_counts_are_refused(section: str, field: str, value: object, tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(f"variant: vtadl_tiny\n{section}:\n  {field}: {value}\n")
    with pytest.raises(ConfigError, match=field):
        load_config(config)
    one_line(cli("train", "--config", config, "--root", tmp_path, "--category", "x"), field)


def test_absurd_retries_are_refused_before_connecting(demo_root: Path, tmp_path: Path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = ["submit", "--root", demo_root, "--category", "brick", "--redis-url", dead]
    one_line(cli(*base, "--retries", 10**6), "retries")
    one_line(cli(*base, "--retries", 2, "--retry-backoff", 10**9), "backoff")
    one_line(cli(*base, "--timeout", "1e300"), "duration")
    one_line(cli(*base, "--timeout", "400d"), "at most 365d")


@pytest.mark.parametrize("port", ["99999", "-1", "abc"])
def test_a_redis_url_with_a_bad_port_is_one_line(port: str):
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    for command in (["status"], ["results"], ["worker", "--burst"], ["logs", "x"]):
        line = one_line(cli(*command, "--redis-url", url), "invalid Redis URL", "***")
        assert PASSWORD not in line


def test_a_yaml_python_tag_is_one_line(tmp_path: Path):
    config = tmp_path / "evil.yaml"
    config.write_text('train:\n  epochs: !!python/object/apply:os.system ["echo hi"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "\n" not in str(caught.value)
    result = cli("train", "--config", config, "--root", tmp_path, "--category", "brick")
    one_line(result, str(config), "python/object/apply:os.system", "line 2")
