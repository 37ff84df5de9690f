"""The job service's commands: submit, worker, status, logs, cancel, retry, results.

Thin like the rest of the CLI: each parses, calls `vtadl.submission` / `vtadl.queue` /
`vtadl.worker`, prints. `submit` takes every option of `train` (its signature is built from
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

from vtadl.cli.console import err, handle_errors, out
from vtadl.cli.options import AS_JSON, REDIS_URL, config_sections
from vtadl.cli.run import train
from vtadl.cli.tune import tune as tune_command
from vtadl.tune.settings import winner_commands


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
    from vtadl.submission import submit_categories

    search = {k: options.pop(k) for k in TUNE_OPTIONS}
    done = submit_categories(
        dataset=dataset,
        root=root,
        categories=category,
        all_categories=all_categories,
        overrides=config_sections(options),
        config_file=config,
        variant=options["variant"],
        preset=options["preset"],
        kind="tune" if tune else "train",
        search=search,
        priority=priority,
        timeout=timeout,
        retries=retries,
        retry_backoff=retry_backoff,
        force=force,
        redis_url=redis_url,
        warn=lambda message: err.print(
            f"[yellow]warning[/yellow] {escape(message)}", highlight=False
        ),
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
    searched = inspect.signature(tune_command).parameters  # `vtadl tune`'s own options
    borrowed = [searched[name].replace(kind=kw) for name in TUNE_OPTIONS]
    return inspect.Signature(own + borrowed + shared)


_submit.__signature__ = _submit_signature()
submit = handle_errors(_submit)


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
    """Run queued jobs, one at a time, each in a fresh process; wait out any outage of Redis.
    With --burst, exit 1 if a job failed."""
    from vtadl.cli.console import fail
    from vtadl.job_contract import queue_name
    from vtadl.service import redact
    from vtadl.service import redis_url as resolve_url
    from vtadl.worker import run_worker

    names = [q.strip() for q in queues.split(",") if q.strip()]
    for q in names:
        queue_name(q)
    url = resolve_url(redis_url)
    conn = _connect(url, for_worker=True, block_seconds=heartbeat)  # one read: one heartbeat
    err.print(f"worker on {', '.join(names)} at {redact(url)}; Ctrl-C stops it", highlight=False)
    failed = run_worker(
        conn, names, burst=burst, name=name, ray_address=ray_address, heartbeat=heartbeat
    )
    if burst and failed:
        raise fail(f"{failed} job{'s' if failed > 1 else ''} failed (vtadl status says why)", 1)


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


def _compact(value: Any) -> str:
    """A score in five characters for the status table: .9876, but 1.000 (n/a if missing)."""
    if not isinstance(value, float):
        return "n/a"
    text = f"{value:.4f}"
    return text[1:] if text.startswith("0.") else f"{value:.3f}"


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
            " ".join(f"{short} {_compact(m.get(k))}" for k, short in SHORT_NAMES.items())
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


@handle_errors
def cancel(
    job_id: str = typer.Argument(..., help="A queued or running job."),
    redis_url: str | None = REDIS_URL,
) -> None:
    """Cancel a queued job, or stop a running one (its checkpoints are kept)."""
    from vtadl.queue import cancel as cancel_job

    done = cancel_job(_connect(redis_url), job_id)
    out.print(f"{job_id}: {done}", highlight=False)


@handle_errors
def retry(
    job_id: str = typer.Argument(..., help="A failed or cancelled job."),
    redis_url: str | None = REDIS_URL,
) -> None:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    from vtadl.queue import retry as retry_job

    done = retry_job(_connect(redis_url), job_id)
    out.print(f"{job_id}: {done}", highlight=False)


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
    from vtadl.metrics import LABELS

    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        table = Table(title=f"{dataset}: {len(mine)} categories")
        table.add_column("category")
        for name in LABELS.values():
            table.add_column(name, justify="right")
        table.add_column("run folder", overflow="fold")
        for r in mine:
            table.add_row(r["category"], *(_fmt(r["metrics"].get(k)) for k in LABELS), r["run_dir"])
        means = []
        for key in LABELS:
            values = [r["metrics"].get(key) for r in mine]
            values = [v for v in values if isinstance(v, float)]
            means.append(_fmt(sum(values) / len(values)) if values else "n/a")
        table.add_row("[bold]mean[/bold]", *means, "", end_section=True)
        out.print(table)
        for r in mine:
            if r.get("best_config"):
                out.print(
                    f"{r['category']}: the search's best settings: "
                    + "  |  ".join(winner_commands(r["best_config"])),
                    highlight=False,
                    soft_wrap=True,
                )
