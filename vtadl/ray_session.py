"""Starting or joining Ray: one address rule for Ray Train (`vtadl.distributed`) and Ray Tune
(`vtadl.tune.driver`) alike.

`train.ray_address`:

- "" or "local": start a private local Ray instance, even where another runs on this machine,
  with its dashboard (see `start_local`);
- "auto": join the cluster `ray.init` would find (RAY_ADDRESS, then the cluster of the last
  `ray start` on this machine);
- "host:port" or "ray://host:port" (Ray Client): join that cluster.

An address to join is tried first (`check_address`): if nothing answers there within
`CONNECT_TIMEOUT_S` seconds, a ConfigError names it in one line, before anything runs. Where
Ray already runs in this process (a test, a notebook), that instance is used whatever the
address, and left running.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vtadl.exceptions import ConfigError

log = logging.getLogger(__name__)

# How long a Ray address may take to accept a connection before it counts as not answering.
CONNECT_TIMEOUT_S = 5.0
LOCAL = ("", "local")


def check_address(address: str) -> str | None:
    """The host:port that `address` joins (None: a local instance is started, or Ray already
    runs in this process); a ConfigError within seconds if nothing answers there."""
    if address in LOCAL:
        return None
    import ray

    if ray.is_initialized():
        return None
    target = address.removeprefix("ray://")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"--ray-address auto: no running Ray cluster found ({exc})") from None
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r} is not auto, local or host:port (e.g. 10.0.0.5:6379)"
        )
    resolved = "" if target == address else f" (resolved to {target})"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"Ray cluster at {address}{resolved} does not answer: {reason}; "
            "is it running (ray start --head), and is the port open?"
        ) from None
    return target


@contextmanager
def session(address: str, *, cpus: float = 0, gpus: float = 0) -> Iterator[None]:
    """Ray for the `with` block: the cluster at `address` joined, or a private local instance
    started with at least `cpus` CPUs (never fewer than this machine's cores) and `gpus` GPUs.
    Shut down at the end if this call started or joined it; a Ray already running in this
    process is used as it is and left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    check_address(address)
    # Worker output reaches the terminal only with `vtadl -v`; it is always in Ray's session
    # logs, and a worker's error is raised by the caller as one line either way.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": log.isEnabledFor(logging.INFO)}
    try:
        if address in LOCAL:
            start_local(max(os.cpu_count() or 1, math.ceil(cpus)), math.ceil(gpus), **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(_refused(address, exc)) from None
    try:
        yield
    finally:
        ray.shutdown()


def start_local(num_cpus: int, num_gpus: int = 0, **init: Any) -> None:
    """Start a private local Ray instance with its dashboard, whose workers find its state API.

    The dashboard must stay on: Ray Train's placement-group cleaner asks the state API whether
    a Train controller is still alive, and without that answer the workers of trials that ASHA
    stopped keep their resources and the next trial hangs (Ray issue #54305). Where several
    Ray instances run on one machine, a worker would find the state API through
    /tmp/ray/ray_current_cluster, which may name another instance: every worker is told the
    address (RAY_API_SERVER_ADDRESS). `init` goes to `ray.init` (its `runtime_env` is kept,
    with that variable added).
    """
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime_env = dict(init.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {
        **runtime_env.get("env_vars", {}),
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
    }
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_port=port,
        runtime_env=runtime_env,
        **init,
    )
    log.info("started a private Ray instance; its dashboard: http://127.0.0.1:%d", port)


def _refused(address: str, exc: Exception) -> str:
    """Why starting Ray, or joining a cluster that answers, failed, in one line."""
    lines = str(exc).strip().splitlines()
    why = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    if address in LOCAL:
        return f"cannot start a local Ray instance ({why})"
    if not isinstance(exc, ConnectionError):
        return f"cannot join the Ray cluster at {address} ({why})"
    if os.environ.get("RAY_AUTH_MODE") == "token" and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        hint = "check that this machine's Ray token is the cluster's"
    else:
        hint = (
            "if the cluster uses token authentication, this machine needs its token "
            "(RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        )
    return f"cannot join the Ray cluster at {address} ({why}); {hint}"
