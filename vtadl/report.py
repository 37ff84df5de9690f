"""One self-contained HTML page for everything under a runs folder, and TensorBoard on it.

`write_report(runs_dir, out)` finds evaluated runs (folders with `metrics.json`) and Tune
experiments (folders with `tune_results.csv`) and writes one HTML file: per dataset a table of
the three metrics per category with a mean row beside the paper's figure (labelled with the
metric it really is), the search results of each tuned category (the objective against the
number of Gaussians and against the noise level, as in the paper's ablation), training curves
and a gallery of heat maps. Plots are drawn with matplotlib; every image is inlined as base64,
so the page needs no server and no network.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vtadl.exceptions import RunError
from vtadl.metrics import LABELS as METRIC_LABELS
from vtadl.tune.settings import PARAMS, RESULTS_FILE, SETTINGS_FILE, SUMMARY_FILE, winner_commands

log = logging.getLogger(__name__)

# The paper's tables (see DESIGN.md), with the metric each number really is.
PAPER = {
    "mvtec": (
        "pixel AUROC (the paper calls it PRO)",
        {
            "carpet": 0.773, "grid": 0.871, "leather": 0.728, "tile": 0.796, "wood": 0.781,
            "bottle": 0.949, "cable": 0.776, "capsule": 0.672, "hazelnut": 0.897,
            "metal_nut": 0.726, "pill": 0.705, "screw": 0.928, "toothbrush": 0.901,
            "transistor": 0.796, "zipper": 0.808,
        },
    ),
    "btad": ("pixel AUROC (the paper calls it PRO)", {"01": 0.92, "02": 0.89, "03": 0.86}),
    "mnist": (
        "image AUROC (presumably)",
        dict(zip("0123456789", (0.99, 1.0, 0.976, 0.976, 0.984, 0.971, 0.995, 0.99, 0.974, 0.99))),
    ),
}  # fmt: skip
PAPER_MEANS = {"mvtec": 0.807, "btad": 0.89, "mnist": 0.984}
# The paper's ablation figure: "PRO" against the number of Gaussians, for a dataset and
# category that the figure does not name (its 0.937 at K=150 is above every VT-ADL entry of
# the MVTec table but one; ../shared/research/vtadl_reference.md, section 3.4).
PAPER_GAUSSIANS = {10: 0.764, 30: 0.831, 50: 0.833, 70: 0.80, 100: 0.841, 120: 0.879, 150: 0.937,
                   200: 0.935}  # fmt: skip
GALLERY_SIZE = 12


@dataclass(frozen=True)
class Run:
    path: Path
    dataset: str
    category: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass(frozen=True)
class Experiment:
    path: Path
    dataset: str
    category: str
    metric: str
    params: list[str]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_runs(root: Path) -> list[Run]:
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        m = json.loads(path.read_text())
        runs.append(Run(path.parent, m["dataset"], m["category"], m, _history(path.parent)))
    return runs


# Columns of tune_results.csv that stay text: a Ray trial id such as "12e45_00001" reads as a
# number to float() (underscores are allowed in numbers).
TEXT_COLUMNS = {"trial_id", "state", "run_dir", "mixture_fit"}


def _number(text: str) -> Any:
    try:
        return float(text) if text not in ("", "None") else None
    except ValueError:
        return text


def find_experiments(root: Path) -> list[Experiment]:
    found = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        folder = path.parent
        stored = json.loads((folder / SETTINGS_FILE).read_text())
        with open(path, newline="") as f:
            rows = [
                {k: v if k in TEXT_COLUMNS else _number(v) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]
        summary_path = folder / SUMMARY_FILE
        d = stored["config"]["data"]
        found.append(
            Experiment(
                folder,
                d["dataset"],
                d["category"],
                stored["settings"]["metric"],
                [p for p in PARAMS if p in stored["settings"]["space"]],
                rows,
                json.loads(summary_path.read_text()) if summary_path.exists() else {},
            )
        )
    return found


def _png(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return _img(buf.getvalue(), "image/png", alt)


def _img(data: bytes, kind: str, alt: str = "") -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:{kind};base64,{encoded}">'


def _figure(width: float = 4.6, height: float = 3.0, integer_x: bool = False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(width, height))
    ax.grid(True, alpha=0.3)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def ablation_plots(exp: Experiment) -> list[str]:
    """The objective against each searched parameter, one line per value of another one;
    trials ASHA stopped early are hollow."""
    plots = []
    for x in exp.params:
        others = [p for p in exp.params if p != x]
        group = others[0] if others else None
        fig, ax = _figure()
        keys = sorted({r[group] for r in exp.rows}, key=_order) if group else [None]
        at = _positions([r[x] for r in exp.rows])
        for key in keys:
            rows = sorted(
                (r for r in exp.rows if (group is None or r[group] == key) and r[exp.metric]),
                key=lambda r: _order(r[x]),
            )
            if not rows:
                continue
            label = f"{_SHORT[group]} {_fmt_param(key)}" if group else "trials"
            xs = [at[r[x]] for r in rows]
            line = ax.plot(xs, [r[exp.metric] for r in rows], "-", label=label)
            for r in rows:
                full = r["state"] == "completed"
                ax.plot(
                    at[r[x]],
                    r[exp.metric],
                    "o",
                    color=line[0].get_color(),
                    mfc=line[0].get_color() if full else "white",
                )
        numbers = [v for v in at.values() if v]
        if x == "lr" or (x == "n_gaussians" and numbers and max(numbers) >= 10 * min(numbers)):
            ax.set_xscale("log")
        if "all" in at:  # a kernel on every training token: drawn beyond the largest K
            ax.set_xticks(sorted(at.values()), [_fmt_param(k) for k in sorted(at, key=_order)])
        ax.set_xlabel(_LABELS[x])
        ax.set_ylabel(f"{METRIC_LABELS[exp.metric]} on the tuning split")
        title = f"{exp.category}: {METRIC_LABELS[exp.metric]} against {_LABELS[x]}"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        plots.append(_png(fig, title))
    return plots


def _order(value: Any) -> tuple:
    """Numbers in order, then words ("all": every training token, more than any K)."""
    return (1, 0, str(value)) if isinstance(value, str) else (0, value, "")


def _positions(values: list) -> dict:
    """Where each parameter value sits on the x axis: a number at itself, "all" at twice the
    largest number."""
    numbers = [v for v in values if not isinstance(v, str)]
    top = 2 * max(numbers) if numbers else 1
    return {v: (top if isinstance(v, str) else v) for v in values}


_LABELS = {"n_gaussians": "number of Gaussians", "noise_std": "noise level", "lr": "learning rate"}
_SHORT = {"n_gaussians": "K =", "noise_std": "noise", "lr": "lr"}


def curves_plot(title: str, series: dict[str, list[dict[str, Any]]], keys=("loss", "val_loss")):
    fig, ax = _figure(integer_x=True)
    for name, history in series.items():
        colour = None
        for key in keys:
            if history and key in history[0]:
                label = name if len(keys) == 1 else key if len(series) == 1 else f"{name} {key}"
                style = "-" if key == "val_loss" else ":"
                x, y = [h["epoch"] for h in history], [h[key] for h in history]
                line = ax.plot(
                    x, y, style, marker="." if len(x) < 4 else None, label=label, color=colour
                )
                colour = line[0].get_color()
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False, ncol=2 if len(series) > 4 else 1)
    return _png(fig, title)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]], foot: list[Any] | None = None) -> str:
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(_fmt(v))}</{tag}>" for v in row)
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    tfoot = f"<tfoot><tr>{cells(foot, 'td')}</tr></tfoot>" if foot else ""
    head = f"<thead><tr>{cells(header, 'th')}</tr></thead>"
    return f"<table>{head}<tbody>{body}</tbody>{tfoot}</table>"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def metrics_table(dataset: str, runs: list[Run]) -> str:
    """One row per category (its newest run) and a mean row, beside the paper's figure."""
    newest = {r.category: r for r in sorted(runs, key=lambda r: r.path.name)}
    paper_metric, paper = PAPER.get(dataset, ("", {}))
    header = ["category", *METRIC_LABELS.values(), f"paper: {paper_metric}" if paper else "paper"]
    header += ["variant", "epochs", "runs", "run"]
    rows = []
    for cat in sorted(newest):
        r = newest[cat]
        count = sum(x.category == cat for x in runs)
        values = [r.metrics.get(k) for k in METRIC_LABELS]
        epochs = r.history[-1]["epoch"] if r.history else None
        rows.append(
            [cat, *values, paper.get(cat), r.metrics.get("variant"), epochs, count, r.path.name]
        )
    mean = ["mean", *(_mean([row[i] for row in rows]) for i in range(1, 5))]
    if paper and set(newest) >= set(paper):
        mean[4] = PAPER_MEANS[dataset]
    return _table(header, rows, mean + ["", "", "", ""])


def gallery(run: Run) -> str:
    maps = sorted((run.path / "maps").glob("*.png"))[:GALLERY_SIZE]
    if not maps:
        return "<p class=note>no heat maps in this run</p>"
    items = []
    for path in maps:
        defect = path.stem.split("_")[0]
        items.append(
            f"<figure>{_img(path.read_bytes(), 'image/png', path.stem)}"
            f"<figcaption>{html.escape(defect)}: {html.escape(path.stem)}</figcaption></figure>"
        )
    return (
        "<p class=note>Each picture: the image, the map over it (true defect outlined in "
        "green), the map alone; colours span the validation images' range.</p>"
        f"<div class=gallery>{''.join(items)}</div>"
    )


def experiment_section(exp: Experiment) -> str:
    best = exp.summary.get("best", {})
    chosen = lambda r: (
        bool(best) and all(r.get(k) == best.get(k) for k in ("trial_id", *exp.params))
    )
    fitted = exp.summary.get("fitted_after_training") or []
    header = [
        "trial",
        *(_LABELS[p] for p in exp.params),
        METRIC_LABELS[exp.metric],
        "epochs",
        "state",
    ]
    rows = [
        [
            r["trial_id"] + (" (best)" if chosen(r) else ""),
            *(_fmt_param(r[p]) for p in exp.params),
            r[exp.metric],
            int(r["epochs"] or 0),
            r["state"],
        ]
        for r in exp.rows
    ]
    test = exp.summary.get("test_metrics")
    result = (
        "<p>Best trial on the test split (evaluated once): "
        + ", ".join(
            f"{html.escape(METRIC_LABELS[k])} {test[k]:.3f}"
            for k in METRIC_LABELS
            if test.get(k) is not None
        )
        + f" &mdash; run <code>{html.escape(Path(exp.summary['best_run']).name)}</code>"
        + _best_config(exp.summary)
        + "</p>"
        if test
        else "<p class=note>search not finished: no test evaluation yet</p>"
    )
    # one curve per training: K fitted after training shares its trial's
    trained = [p for p in exp.params if p not in fitted]
    trials = {
        ", ".join(f"{_SHORT[p]} {_fmt_param(r[p])}" for p in trained) or r["trial_id"]: _history(
            exp.path / "trials" / r["trial_id"]
        )
        for r in exp.rows
    }
    return (
        f"<h4>Search {html.escape(exp.path.name)}</h4>"
        f"<p class=note>Objective: {html.escape(METRIC_LABELS[exp.metric])} on the tuning split "
        "(validation images, clean and with synthetic defects pasted in); the test split is not "
        "used to choose. Hollow markers: trials stopped early by the scheduler.</p>"
        f"<div class=plots>{''.join(ablation_plots(exp))}"
        f"{curves_plot(f'{exp.category}: validation loss of each trial', trials, ('val_loss',))}"
        f"</div>{_paper_ablation(exp)}{_table(header, rows)}{result}"
    )


def _best_config(summary: dict) -> str:
    path = summary.get("best_config")
    if not path:
        return ""
    train, submit = (html.escape(command) for command in winner_commands(path))
    return f"<br>Its settings as a config file: <code>{train}</code> (or <code>{submit}</code>)"


def _paper_ablation(exp: Experiment) -> str:
    if "n_gaussians" not in exp.params:
        return ""
    figures = ", ".join(f"K={k} {v:.3f}" for k, v in PAPER_GAUSSIANS.items())
    fit = exp.summary.get("mixture_fit") or exp.rows[0].get("mixture_fit") if exp.rows else None
    return (
        f"<p class=note>K here is the number of Gaussians of the mixture fitted by "
        f"{html.escape(str(fit or 'the run'))}. The paper's ablation figure, for comparison: "
        f"{figures}, its mixture trained with the network (sgd), on a test split of a dataset "
        "and category that the figure does not name, in a metric the paper calls PRO (most "
        "likely pixel AUROC); one curve, not an MVTec AD mean.</p>"
    )


def _fmt_param(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;margin:0 auto;
max-width:1180px;padding:24px 32px}
h1{font-size:24px;margin-bottom:4px}h2{margin-top:36px;border-bottom:2px solid #ddd}
h3{margin-top:28px}h4{margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 14px;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;text-align:right;border-bottom:1px solid #e4e4e4}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4;font-weight:600}
tfoot td{font-weight:600;border-top:2px solid #bbb}
.note{color:#666;font-size:12.5px;margin:4px 0}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{width:calc((100% - 24px) / 3)}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:12px}
.gallery img{width:100%;image-rendering:pixelated;border:1px solid #ddd}
figure{margin:0}figcaption{font-size:12px;color:#555}
code{font-size:12.5px}
"""


def render(root: Path, runs: list[Run], experiments: list[Experiment]) -> str:
    parts = [
        f"<h1>vtadl report</h1><p class=note>{html.escape(str(root.resolve()))} &middot; "
        f"{len(runs)} evaluated runs, {len(experiments)} searches &middot; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC</p>"
        "<p class=note>image AUROC: defective vs good test images by the map's maximum; pixel "
        "AUROC: every test pixel against the masks; AU-PRO: area under the per-region overlap "
        "curve up to a false-positive rate of 0.3, normalised. Three different numbers.</p>"
    ]
    datasets = sorted({r.dataset for r in runs} | {e.dataset for e in experiments})
    for dataset in datasets:
        druns = [r for r in runs if r.dataset == dataset]
        parts.append(f"<h2>{html.escape(dataset)}</h2>")
        if druns:
            parts.append(metrics_table(dataset, druns))
        categories = sorted(
            {r.category for r in druns} | {e.category for e in experiments if e.dataset == dataset}
        )
        for cat in categories:
            parts.append(f"<h3>{html.escape(dataset)} / {html.escape(cat)}</h3>")
            for exp in (e for e in experiments if e.dataset == dataset and e.category == cat):
                parts.append(experiment_section(exp))
            cruns = [r for r in druns if r.category == cat]
            if cruns:
                series = {r.path.name: r.history for r in cruns[-6:]}
                parts.append(
                    "<h4>Training</h4><div class=plots>"
                    + curves_plot(f"{cat}: training (dotted) and validation loss", series)
                    + f"</div><h4>Heat maps (run {html.escape(cruns[-1].path.name)})</h4>"
                    + gallery(cruns[-1])
                )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vtadl report</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_report(runs_dir: str | Path, out: str | Path) -> dict[str, int]:
    """Write the HTML report of everything under `runs_dir` to `out`."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise RunError(f"runs folder not found: {root}")
    runs, experiments = find_runs(root), find_experiments(root)
    if not runs and not experiments:
        raise RunError(f"no evaluated runs (metrics.json) or searches under {root}")
    Path(out).write_text(render(root, runs, experiments))
    return {"runs": len(runs), "experiments": len(experiments)}


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), 1).close()
        return True
    except OSError:
        return False


def serve_tensorboard(
    runs_dir: str | Path, *, port: int, host: str, announce: Callable[[str], None] = print
) -> None:
    """Serve TensorBoard on every run and trial under `runs_dir` until interrupted."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise RunError(f"runs folder not found: {root}")
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(root),
        "--port",
        str(port),
        "--host",
        host,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                last = (proc.stderr.read().strip().splitlines() or ["no output"])[-1]
                raise RunError(f"TensorBoard did not start on port {port}: {last}")
            time.sleep(0.3)
        announce(f"TensorBoard: http://{host}:{port}/  (runs and Tune trials under {root})")
        announce(
            "Ray dashboard: http://127.0.0.1:8265 on the Ray head while a search runs (vtadl "
            "tune starts Ray with it); on a `ray up` cluster: ray dashboard "
            "cluster/ray_cluster.yaml"
        )
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)
