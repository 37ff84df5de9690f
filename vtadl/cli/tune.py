"""`tune` (a Ray Tune search with train's options as its base config), `report` and
`dashboard`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import get_type_hints

import typer
from rich.table import Table

from vtadl.cli.console import handle_errors, out
from vtadl.cli.options import config_from_options
from vtadl.cli.run import train
from vtadl.tune.settings import winner_commands

# train's options that `tune` replaces (searched values, resume, output) or has no use for.
_NOT_FOR_TUNE = {"resume", "as_json", "lr", "n_gaussians", "noise_std"}


def _tune(
    gaussians: str | None = typer.Option(
        None,
        help="Numbers of Gaussians K to try under the run's fit, e.g. 10,50,100,150 (all: a "
        "kernel on every token). For em and kernel each trial fits every K to its network.",
    ),
    noise: str | None = typer.Option(None, help="Token noise levels to try, e.g. 0,0.1,0.2."),
    lr: str | None = typer.Option(None, help="Learning rates to try, e.g. 1e-4,3e-4."),
    search: str = typer.Option("grid", help="grid (every combination), random or optuna."),
    num_samples: int = typer.Option(
        1, help="Trials drawn (random, optuna); repeats of the grid (grid)."
    ),
    scheduler: str = typer.Option("asha", help="asha (stop poor trials early) or fifo."),
    metric: str = typer.Option(
        "au_pro", help="Objective on the tuning split: au_pro, pixel_auroc or image_auroc."
    ),
    max_concurrent: int = typer.Option(1, help="Trials running at once."),
    name: str | None = typer.Option(None, help="Experiment name (default: a timestamp)."),
    resume: bool = typer.Option(
        False,
        "--resume",
        metavar="",
        help="Continue the newest experiment of this category; finished trials stay.",
    ),
    as_json: bool = typer.Option(
        False, "--json", metavar="", help="Print one JSON object as the last line."
    ),
    **train_options,
) -> None:
    from vtadl.tune.driver import tune as tune_search

    options = {**train_options, **{k: None for k in _NOT_FOR_TUNE}, "resume": False}
    base, _ = config_from_options(options)
    summary = tune_search(
        base,
        {
            "gaussians": gaussians,
            "noise": noise,
            "lr": lr,
            "search": search,
            "num_samples": num_samples,
            "scheduler": scheduler,
            "metric": metric,
            "max_concurrent": max_concurrent,
            "name": name,
            "resume": resume,
        },
    )
    _print_summary(summary, as_json)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    from vtadl.metrics import LABELS

    metric, rows = summary["metric"], summary["trials"]
    trainings = len({r["trial_id"] for r in rows})
    table = Table(
        title=f"{trainings} trainings, {len(rows)} settings (mixture fit "
        f"{summary.get('mixture_fit', '?')}); objective: {metric} on the tuning split"
    )
    params = [k for k in rows[0] if k not in ("trial_id", metric) and k in _PARAM_LABELS]
    for column in ["trial", *(_PARAM_LABELS[p] for p in params), metric, "epochs", "state"]:
        table.add_column(column, justify="left" if column in ("trial", "state") else "right")
    best = summary["best"]
    for r in rows:
        objective = "-" if r[metric] is None else f"{r[metric]:.4f}"
        chosen = all(r.get(k) == best.get(k) for k in ("trial_id", *params))
        table.add_row(
            r["trial_id"] + (" *" if chosen else ""),
            *(_shown(r[p]) for p in params),
            objective,
            str(r["epochs"]),
            r["state"],
        )
    out.print(table)
    test = summary["test_metrics"]
    values = ", ".join(
        f"{label} {test[key]:.4f}" for key, label in LABELS.items() if test.get(key) is not None
    )
    out.print(f"best setting (*) on the test split: {values}", highlight=False, soft_wrap=True)
    out.print(f"best run: {summary['best_run']}", highlight=False)
    out.print(f"experiment: {summary['experiment']}  (tune_results.csv)", highlight=False)
    if summary.get("best_config"):
        out.print(
            "train it again, or on the queue: "
            + "  |  ".join(winner_commands(summary["best_config"])),
            highlight=False,
            soft_wrap=True,
        )


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


_PARAM_LABELS = {"n_gaussians": "Gaussians", "noise_std": "noise", "lr": "lr"}


def _with_train_options(fn):
    """Give `fn` train's options (minus those it replaces) after its own, for Typer."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    hints = get_type_hints(train) | get_type_hints(fn)
    borrowed = [
        p.replace(annotation=hints[n])
        for n, p in inspect.signature(train).parameters.items()
        if n not in _NOT_FOR_TUNE
    ]
    params = [p.replace(annotation=hints[p.name]) for p in own] + borrowed
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


# One line per paragraph: Typer keeps the line breaks of a docstring in the help it shows.
_tune.__doc__ = (
    "Search the number of Gaussians, the noise level and the learning rate with Ray Tune; "
    "evaluate the best run once on the test split.\n\n"
    "Trials are scored on the validation images with synthetic defects pasted in, never on the "
    "test split. Without values the paper's two ablations are searched under the run's "
    "mixture fit: Gaussians 10,50,100,150 (sgd, em) or 16384,32768,all (kernel) x noise "
    "0,0.1,0.2. A trial trains one network; K fitted after training (em, kernel) is fitted "
    "to each trial's network, not trained again. The train options set the base config of "
    "every trial; the best setting is written as a config file for train and submit."
)
tune = handle_errors(_with_train_options(_tune))


@handle_errors
def report(
    runs_dir: Path = typer.Argument(..., help="A runs folder (as written by train and tune)."),
    out_file: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
) -> None:
    """One self-contained HTML page for every run and search under a folder."""
    from vtadl.report import write_report

    summary = write_report(runs_dir, out_file)
    out.print(
        f"report of {summary['runs']} runs and {summary['experiments']} searches: {out_file}",
        highlight=False,
    )


@handle_errors
def dashboard(
    runs_dir: Path = typer.Argument(..., help="A runs folder (as written by train and tune)."),
    port: int = typer.Option(6006, help="TensorBoard's port."),
    host: str = typer.Option("127.0.0.1", help="Address to serve on (0.0.0.0: every interface)."),
) -> None:
    """TensorBoard on every run and trial under a folder (Ctrl-C stops it)."""
    from vtadl.report import serve_tensorboard

    serve_tensorboard(
        runs_dir,
        port=port,
        host=host,
        announce=lambda s: out.print(s, highlight=False, soft_wrap=True),
    )
