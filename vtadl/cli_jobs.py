"""The job service's commands: submit, worker, status, logs, cancel, retry, results, service.

Thin like the rest of the CLI: each parses, calls `vtadl.queue` / `vtadl.worker` /
`vtadl.service`, prints. `submit` takes every option of `train` (its signature is built from
train's), so a job is exactly the run `vtadl train` would make.
"""

from __future__ import annotations

import inspect
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from vtadl.cli import app, config_from_options, train
from vtadl.console import METRIC_NAMES, err, handle_errors, out

service_app = typer.Typer(no_args_is_help=True, help="The private Redis that the queue uses.")
app.add_typer(service_app, name="service")

REDIS_URL = typer.Option(
    None,
    "--redis-url",
    help="redis:// or rediss:// URL of the queue (default: $VTADL_REDIS_URL, else a private "
    "local server started on demand).",
)
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _connect(url: str | None, **kwargs: Any):
    from vtadl.service import connect

    return connect(url, **kwargs)


def _submit(
    *,
    dataset: str,
    root: Path,
    category: list[str] | None,
    all_categories: bool,
    config: Path | None,
    priority: str,
    timeout: str,
    retries: int,
    retry_backoff: int,
    redis_url: str | None,
    force: bool,
    as_json: bool,
    tune: bool,
    **options: Any,
) -> None:
    """Queue one training job per category (with --tune: one search per category); workers
    (vtadl worker) run them."""
    from vtadl.data import dataset_categories
    from vtadl.data.check import check_dataset
    from vtadl.exceptions import ConfigError, DataError
    from vtadl.queue import make_request, parse_duration, queue_name, submit

    # Everything is checked before anything is enqueued.
    search = {k: options.pop(k) for k in TUNE_OPTIONS}
    train_options = options
    queue_name(priority)
    seconds = parse_duration(timeout)
    if tune:
        from vtadl.tuning import settings_from_options

        settings_from_options(search)
    elif any(v is not None for k, v in search.items() if k in ("gaussians", "noise")):
        raise ConfigError("--gaussians and --noise are search values: add --tune")
    if bool(category) == all_categories:
        raise ConfigError("give --category C (repeatable) or --all-categories")
    names = dataset_categories(dataset, root) if all_categories else list(dict.fromkeys(category))
    requests = []
    for name in names:
        report = check_dataset(dataset, root, name)
        if report.errors:
            first = report.errors[0].message
            more = f" (and {len(report.errors) - 1} more; see vtadl data check)"
            raise DataError(f"{dataset}/{name}: {first}" + (more if len(report.errors) > 1 else ""))
        for warning in report.warnings:
            err.print(f"[yellow]warning[/yellow] {escape(warning.message)}", highlight=False)
        options = train_options | dict(
            dataset=dataset, root=root, category=name, config=config, resume=False
        )
        cfg, _ = config_from_options(options)
        # Workers may run elsewhere and in other folders: absolute paths in every request.
        cfg = cfg.override(
            data={"root": str(Path(cfg.data.root).resolve())},
            train={"out": str(Path(cfg.train.out).resolve())},
        )
        requests.append(make_request("tune", cfg, search) if tune else make_request("train", cfg))
    conn = _connect(redis_url)
    done = submit(
        conn,
        requests,
        priority=priority,
        timeout=seconds,
        retries=retries,
        retry_backoff=retry_backoff,
        force=force,
    )
    if as_json:
        print(json.dumps([s.to_dict() for s in done]))
        return
    table = Table(title=f"{len(done)} jobs ({sum(s.new for s in done)} new)")
    for column in ("job", "dataset", "category", "state"):
        table.add_column(column)
    for s in done:
        state = s.state if s.new else f"{s.state} (submitted before; --force for a new run)"
        table.add_row(s.job_id, s.dataset, s.category, state)
    out.print(table)
    out.print("watch: vtadl status --watch; run them: vtadl worker", highlight=False)


_SUBMIT_OWN = [
    ("dataset", str, typer.Option("mvtec", help="mvtec, btad, mnist or folder.")),
    ("root", Path, typer.Option(..., help="Folder that holds the category folders.")),
    (
        "category",
        list[str] | None,
        typer.Option(None, help="A product category (repeat for several)."),
    ),
    (
        "all_categories",
        bool,
        typer.Option(False, "--all-categories", help="Every category found under --root."),
    ),
    ("config", Path | None, typer.Option(None, help="YAML/JSON config file; options override it.")),
    ("priority", str, typer.Option("normal", help="Queue: high, normal or low.")),
    ("timeout", str, typer.Option("48h", help="Longest a job may run: e.g. 3600, 90m, 12h.")),
    ("retries", int, typer.Option(0, help="Reruns of a failed job (each resumes its run).")),
    (
        "retry_backoff",
        int,
        typer.Option(60, help="Seconds before the first rerun; doubles each time (0: at once)."),
    ),
    ("redis_url", str | None, REDIS_URL),
    ("force", bool, typer.Option(False, "--force", help="Queue a new run even if submitted.")),
    ("as_json", bool, AS_JSON),
    (
        "tune",
        bool,
        typer.Option(
            False,
            "--tune",
            metavar="",
            help="Queue a Ray Tune search per category (vtadl tune) instead of one training.",
        ),
    ),
]
# The search options of `vtadl tune` that a --tune submission takes (its --lr list is not
# one of them: submit's --lr is the learning rate of every trial).
TUNE_OPTIONS = (
    "gaussians", "noise", "search", "num_samples", "scheduler", "metric", "max_concurrent",
)  # fmt: skip
_NOT_FOR_SUBMIT = {"dataset", "root", "category", "config", "resume", "as_json"}


def _submit_signature() -> inspect.Signature:
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [inspect.Parameter(n, kw, default=d, annotation=t) for n, t, d in _SUBMIT_OWN]
    shared = [
        p.replace(kind=kw)
        for name, p in inspect.signature(train).parameters.items()
        if name not in _NOT_FOR_SUBMIT
    ]
    from vtadl import cli_tune

    searched = inspect.signature(cli_tune._tune).parameters  # `vtadl tune`'s own options
    borrowed = [searched[name].replace(kind=kw) for name in TUNE_OPTIONS]
    return inspect.Signature(own + borrowed + shared)


_submit.__signature__ = _submit_signature()
app.command("submit")(handle_errors(_submit))


@app.command()
@handle_errors
def worker(
    queues: str = typer.Option("high,normal,low", help="Queues to take jobs from, in order."),
    burst: bool = typer.Option(False, "--burst", help="Stop when the queues are empty."),
    ray_address: str | None = typer.Option(
        None, help="Ray cluster for distributed jobs that name none (auto or host:port)."
    ),
    redis_url: str | None = REDIS_URL,
    name: str | None = typer.Option(None, help="Worker name (default: host and process id)."),
    heartbeat: int = typer.Option(
        30,
        min=1,
        help="Seconds between a running job's heartbeats; a job is requeued "
        "about three heartbeats after its worker is lost.",
    ),
) -> None:
    """Run queued jobs, one at a time, each in a fresh process."""
    from vtadl.queue import queue_name
    from vtadl.service import redact
    from vtadl.service import redis_url as resolve_url
    from vtadl.worker import run_worker

    names = [q.strip() for q in queues.split(",") if q.strip()]
    for q in names:
        queue_name(q)
    url = resolve_url(redis_url)
    conn = _connect(url, for_worker=True)
    err.print(f"worker on {', '.join(names)} at {redact(url)}; Ctrl-C stops it", highlight=False)
    run_worker(conn, names, burst=burst, name=name, ray_address=ray_address, heartbeat=heartbeat)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M") if ts else ""


def _took(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    seconds = int((end or time.time()) - start)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


SHORT_NAMES = {"image_auroc": "img", "pixel_auroc": "pix", "au_pro": "pro"}


def _status_table(rows: list[dict]) -> Table:
    table = Table(title=f"{len(rows)} jobs", caption="img/pix: image/pixel AUROC, pro: AU-PRO")
    table.add_column("job", no_wrap=True)
    for column in ("state", "epoch", "started", "took", "result"):
        table.add_column(column, overflow="fold")
    colours = {"finished": "green", "failed": "red", "running": "cyan", "cancelled": "yellow"}
    for r in rows:
        m = r["metrics"] or {}
        result = (
            " ".join(f"{short} {_fmt(m.get(k))[1:]}" for k, short in SHORT_NAMES.items())
            if m
            else r["error"] or ""
        )
        c = colours.get(r["state"], "white")
        table.add_row(
            r["job_id"],
            f"[{c}]{r['state']}[/{c}]",
            f"{r['epoch'] or 0}/{r['epochs']}" if r["epochs"] else "",
            _when(r["started_at"]),
            _took(r["started_at"], r["ended_at"]),
            escape(result),
        )
    return table


@app.command()
@handle_errors
def status(
    job_ids: list[str] = typer.Argument(None, help="Jobs to show (default: all)."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until every job has ended."),
    redis_url: str | None = REDIS_URL,
    as_json: bool = AS_JSON,
) -> None:
    """Jobs with their state, progress, run folder and metrics or error."""
    from vtadl.queue import FINAL
    from vtadl.queue import status as job_status

    conn = _connect(redis_url)
    rows = job_status(conn, job_ids or None)
    if as_json:
        print(json.dumps(rows))
        return
    if not watch:
        out.print(_status_table(rows))
        for r in rows if job_ids else []:
            out.print(f"{r['job_id']}: run folder {r['run_dir'] or '(not yet)'}", highlight=False)
        return
    with Live(_status_table(rows), console=out, refresh_per_second=1) as live:
        while any(r["state"] not in FINAL for r in rows):
            time.sleep(2)
            rows = job_status(conn, job_ids or None)
            live.update(_status_table(rows))


@app.command()
@handle_errors
def logs(
    job_id: str = typer.Argument(..., help="The job whose log to print."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
    redis_url: str | None = REDIS_URL,
) -> None:
    """A job's own log: one line per epoch, errors, the final metrics (kept after it ends)."""
    from vtadl.queue import FINAL, fetch, job_state, read_log

    conn = _connect(redis_url)
    job = fetch(conn, job_id)
    seen = 0
    while True:
        lines = read_log(conn, job_id, seen)
        for line in lines:
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        seen += len(lines)
        if not follow or (job_state(job) in FINAL and not lines):
            return
        time.sleep(1)


@app.command()
@handle_errors
def cancel(
    job_id: str = typer.Argument(..., help="A queued or running job."),
    redis_url: str | None = REDIS_URL,
) -> None:
    """Cancel a queued job, or stop a running one (its checkpoints are kept)."""
    from vtadl.queue import cancel as cancel_job

    done = cancel_job(_connect(redis_url), job_id)
    out.print(f"{job_id}: {done}", highlight=False)


@app.command()
@handle_errors
def retry(
    job_id: str = typer.Argument(..., help="A failed or cancelled job."),
    redis_url: str | None = REDIS_URL,
) -> None:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    from vtadl.queue import retry as retry_job

    done = retry_job(_connect(redis_url), job_id)
    out.print(f"{job_id}: {done}", highlight=False)


@app.command()
@handle_errors
def results(redis_url: str | None = REDIS_URL, as_json: bool = AS_JSON) -> None:
    """Metrics of the finished jobs: one table per dataset with a mean row."""
    from vtadl.queue import results as job_results

    rows = job_results(_connect(redis_url))
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        out.print("no finished jobs yet (vtadl status shows them all)")
        return
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        table = Table(title=f"{dataset}: {len(mine)} categories")
        table.add_column("category")
        for name in METRIC_NAMES.values():
            table.add_column(name, justify="right")
        table.add_column("run folder", overflow="fold")
        for r in mine:
            table.add_row(
                r["category"], *(_fmt(r["metrics"].get(k)) for k in METRIC_NAMES), r["run_dir"]
            )
        means = []
        for key in METRIC_NAMES:
            values = [r["metrics"].get(key) for r in mine]
            values = [v for v in values if isinstance(v, float)]
            means.append(_fmt(sum(values) / len(values)) if values else "n/a")
        table.add_row("[bold]mean[/bold]", *means, "", end_section=True)
        out.print(table)


@service_app.command("start")
@handle_errors
def service_start(
    folder: Path | None = typer.Option(
        None, "--dir", help="Its data folder (default: the private one in the state folder)."
    ),
    port: int | None = typer.Option(None, help="Port (default: a free one)."),
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
    out.print(f"Redis {redact(server.url)} (data in {server.folder})", highlight=False)


DIR = typer.Option(None, "--dir", help="Its data folder (default: the private server's).")


@service_app.command("status")
@handle_errors
def service_status(folder: Path | None = DIR) -> None:
    """Whether the private Redis runs, where, and which Redis the commands use."""
    import os

    from vtadl.service import URL_ENV, PrivateServer, redact

    server = PrivateServer(folder.expanduser().resolve() if folder else None).running()
    if os.environ.get(URL_ENV):
        out.print(f"commands use {URL_ENV}={redact(os.environ[URL_ENV])}", highlight=False)
    if server is None:
        out.print("the Redis of that folder is not running")
        raise typer.Exit(1)
    out.print(f"private Redis {redact(server.url)} (data in {server.folder})", highlight=False)


@service_app.command("stop")
@handle_errors
def service_stop(folder: Path | None = DIR) -> None:
    """Stop the private Redis; its queue is kept on disk for the next start."""
    from vtadl.service import PrivateServer

    stopped = PrivateServer(folder.expanduser().resolve() if folder else None).stop()
    out.print("private Redis stopped" if stopped else "the private Redis was not running")
