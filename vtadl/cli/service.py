"""`vtadl service`: start, inspect and stop the Redis that the queue uses."""

from __future__ import annotations

from pathlib import Path

import typer

from vtadl.cli.console import handle_errors, out


@handle_errors
def service_start(
    folder: Path | None = typer.Option(
        None, "--dir", help="Its data folder (default: the private one in the state folder)."
    ),
    port: int | None = typer.Option(
        None,
        min=1,
        max=65535,
        help="Port (default: the one it had, else a free one); kept across restarts.",
    ),
    bind: list[str] = typer.Option(
        [], help="An address to listen on besides 127.0.0.1 (a cluster's private one)."
    ),
    password_file: Path | None = typer.Option(
        None, help="File holding the password (default: a random one, kept in --dir)."
    ),
) -> None:
    """Start the queue's Redis (or report the one already running).

    Without options: the private server of this machine. On a cluster's head node:
    --dir, --port, --bind and --password-file make it the cluster's queue.
    """
    from vtadl.exceptions import ServiceError
    from vtadl.service import PrivateServer, redact

    password = None
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as exc:
            raise ServiceError(f"cannot read {password_file}: {exc.strerror}") from None
        if not password:
            raise ServiceError(f"{password_file} is empty")
    private = PrivateServer(folder.expanduser().resolve() if folder else None)
    server = private.ensure(port=port, bind=tuple(bind), password=password)
    out.print(
        f"Redis on port {server.port}: {redact(server.url)} (data in {server.folder})",
        highlight=False,
    )


DIR = typer.Option(None, "--dir", help="Its data folder (default: the private server's).")


@handle_errors
def service_status(folder: Path | None = DIR) -> None:
    """Whether the private Redis runs, on which port, and which Redis the commands use.

    Exit code 0: it runs; 1: it does not (it starts again on the port it had); 2: its port
    is taken by something else."""
    import os

    from vtadl.service import URL_ENV, PrivateServer, redact

    private = PrivateServer(folder.expanduser().resolve() if folder else None)
    server = private.running()
    if os.environ.get(URL_ENV):
        out.print(f"commands use {URL_ENV}={redact(os.environ[URL_ENV])}", highlight=False)
    if server is None:
        saved = private.saved()
        if saved is not None:
            private.check_port(saved)
        again = f"; it starts again on port {saved.port}" if saved else ""
        out.print(f"the Redis of {private.folder} is not running{again}", highlight=False)
        raise typer.Exit(1)
    out.print(
        f"private Redis on port {server.port}: {redact(server.url)} (data in {server.folder})",
        highlight=False,
    )


@handle_errors
def service_stop(folder: Path | None = DIR) -> None:
    """Stop the private Redis; its queue is kept on disk for the next start."""
    from vtadl.service import PrivateServer

    stopped = PrivateServer(folder.expanduser().resolve() if folder else None).stop()
    out.print("private Redis stopped" if stopped else "the private Redis was not running")
