"""What `train` and `evaluate` show while they work and when they are done: progress bars
(or one line per epoch where stderr is not a terminal) and the metrics table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vtadl.cli.console import err, out


class RichCallbacks:
    """Epoch and step progress bars on a terminal; elsewhere (a job log, `nohup`), one line
    per epoch on stderr, so that a long run does not look hung."""

    reads_checkpoints = False  # the loop need not wait for checkpoint writes to call us

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.epochs = self.steps = self.evaluation = None
        self.total_epochs = 0

    def on_train_start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None:
        self.total_epochs = epochs
        self.epochs = self.progress.add_task("epochs", total=epochs)
        self.steps = self.progress.add_task("steps", total=steps_per_epoch)
        _log_line(f"training in {run_dir}")

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        self.progress.update(self.steps, completed=step + 1, description=f"loss {loss:.4f}")

    def on_epoch_end(self, record: dict) -> None:
        self.progress.update(
            self.epochs,
            completed=record["epoch"],
            description=f"epoch {record['epoch']} val {record['val_loss']:.4f}",
        )
        self.progress.reset(self.steps)
        _log_line(
            f"epoch {record['epoch']}/{self.total_epochs}: loss {record['loss']:.4f}, "
            f"val {record['val_loss']:.4f}{' (best)' if record['best'] else ''}, "
            f"training steps {record['train_seconds']:.1f} s, {record['wall_seconds']:.1f} s"
        )

    def evaluating(self, done: int, total: int) -> None:
        if self.evaluation is None:
            _log_line(f"evaluating the best checkpoint on {total} test images")
            self.evaluation = self.progress.add_task("evaluating", total=total)
        self.progress.update(self.evaluation, completed=done, total=total)


def _log_line(text: str) -> None:
    """Progress for logs: a line on stderr when it is not a terminal (which has the bars)."""
    if not err.is_terminal:
        err.print(text, markup=False, highlight=False, soft_wrap=True)


def progress_bars() -> Progress:
    """Bars on stderr that vanish when done; disabled where stderr is not a terminal."""
    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )


def print_metrics(result: dict, run_dir: Path, as_json: bool) -> None:
    """A run's metrics: one JSON line, or tables, the time it took and its folder."""
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), **result}))
        return
    from vtadl.metrics import LABELS

    table = Table(
        title=f"{result['dataset']}/{result['category']} ({result['n_test']} test images)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, name in LABELS.items():
        if result.get(key) is not None:
            table.add_row(name, f"{result[key]:.4f}")
    out.print(table)
    if result.get("pixel_metrics_absent"):
        out.print(f"no pixel metrics: {result['pixel_metrics_absent']}", highlight=False)
    by_defect = result.get("by_defect") or {}
    if len(by_defect) > 1:
        per = Table(title="each defect type against the good test images")
        keys = ["image_auroc"] + ([] if result.get("pixel_metrics_absent") else ["pixel_auroc"])
        per.add_column("defect type")
        per.add_column("images", justify="right")
        for key in keys:
            per.add_column(LABELS[key], justify="right")
        for defect, m in by_defect.items():
            values = ["-" if m[k] is None else f"{m[k]:.4f}" for k in keys]
            per.add_row(defect, str(m["n_images"]), *values)
        out.print(per)
    timing = result.get("timing")
    if timing and timing["epochs"]:
        out.print(
            f"took {timing['wall_seconds']:.1f} s: training {timing['fit_seconds']:.1f} s for "
            f"{timing['epochs']} epochs ({timing['wall_images_per_second']:.1f} images/s; "
            f"{timing['images_per_second']:.1f} images/s in the {timing['train_seconds']:.1f} s "
            f"of training steps), evaluation {timing['evaluate_seconds']:.1f} s",
            highlight=False,
        )
    out.print(f"run folder: {run_dir}  (heat maps in {run_dir / 'maps'})", highlight=False)
