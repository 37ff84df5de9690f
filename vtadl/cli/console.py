"""What every command shares: the two consoles and the error boundary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from vtadl.exceptions import VtadlError

err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line; raise the returned Exit."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def os_error_line(exc: OSError) -> str:
    """An operating-system error on a user's path as one line: the path(s), then the problem."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return str(exc)
    return f"{' -> '.join(paths)}: {exc.strerror or exc}"


def redis_error_line(exc: Exception) -> str | None:
    """A Redis error after the first connection (it went away, or stopped answering within
    the command timeout) as one line; None for any other exception. Redis is not imported
    here: a command that never used it cannot have raised its errors."""
    errors = sys.modules.get("redis.exceptions")
    if errors is None or not isinstance(exc, errors.RedisError):
        return None
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"Redis failed during the command ({reason}); vtadl status shows what was done"


def handle_errors(fn: Callable) -> Callable:
    """Known errors, operating-system errors (a folder that cannot be written, a path below
    a file, a full disk) and Redis errors become one line on stderr and exit code 2, never
    a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VtadlError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(os_error_line(exc)) from None
        except Exception as exc:
            line = redis_error_line(exc)
            if line is None:
                raise
            raise fail(line) from None
        except KeyboardInterrupt:
            err.print("interrupted; checkpoints so far are kept (continue with --resume)")
            raise typer.Exit(130) from None

    return wrapper
