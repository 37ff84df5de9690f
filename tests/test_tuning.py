"""Ray Tune searches on the tiny demo: real Ray, real trials, one shared experiment.

The module runs one 2 x 3 grid (Gaussians x noise) with ASHA, interrupted with Ctrl-C after its
first trial finished and then resumed. The mixture is the default kernel, fitted after
training: K does not change training, so the grid is three trainings (one per noise level),
each fitting both K. Every read of test images or masks through a data
source, in this process and in every Ray worker, is appended to a log (a Ray worker setup
hook wraps the sources' methods), so the tests can check that no trial read the test split
and that the one final evaluation did. (Listing the split's names and labels is not reading.)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vtadl.config import default_config
from vtadl.data.synthetic import KINDS, make_tuning_split
from vtadl.ray_session import start_local
from vtadl.tune.settings import TuneSettings, default_space, n_trials, search_space
from vtadl.tune.trial import fitted_after_training, scoring_epochs

ray = pytest.importorskip("ray")

EPOCHS = 3
GRID = {"gaussians": "2,8", "noise": "0,0.1,0.2", "max_concurrent": 1, "name": "grid"}
TESTS = str(Path(__file__).parent)
READS = "VTADL_TEST_READS"


def record_test_reads() -> None:
    """Log every read of the test split through a data source (a Ray worker setup hook)."""
    from vtadl.data import source

    log = os.environ[READS]

    def note(what: str) -> None:
        with open(log, "a") as f:
            f.write(f"{time.time()} {os.getpid()} {what}\n")

    for cls in (source.FileSource, source.PackSource):
        for name in ("dataset", "model_input", "mask", "display_image"):
            original = getattr(cls, name)

            def wrapped(self, split, *args, _original=original, _name=name):
                if split == "test":
                    note(f"read {_name}")
                return _original(self, split, *args)

            setattr(cls, name, wrapped)
    note("setup")


def init_ray(log: Path) -> None:
    os.environ[READS] = str(log)
    start_local(
        2,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": TESTS, READS: str(log)},
            "worker_process_setup_hook": "test_tuning.record_test_reads",
        },
    )


def base_config(root: Path, out: Path):
    # one token grid: a trial scores every K at each scoring epoch, 16 grids would cost more
    return default_config("vtadl_tiny").override(
        data={"root": str(root), "category": "brick"},
        train={"epochs": EPOCHS, "batch_size": 4, "out": str(out)},
        eval={"grid_shifts": 1},
    )


PHASE_ONE = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_tuning import base_config, init_ray, record_test_reads
init_ray(Path({log!r}))
record_test_reads()
from vtadl.tune.driver import tune
try:
    tune(base_config(Path({root!r}), Path({out!r})), {options!r})
except KeyboardInterrupt:
    sys.exit(130)
"""


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [folder / "history.jsonl", folder / "checkpoints" / "last.pt"]
    }


def _interrupted_search(root: Path, out: Path, log: Path) -> Path:
    """Start the search in a subprocess; Ctrl-C it once the first trial has finished."""
    script = PHASE_ONE.format(tests=TESTS, log=str(log), root=str(root), out=str(out), options=GRID)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    trials = out / "tune" / "mvtec" / "brick" / "grid" / "trials"
    deadline = time.monotonic() + 600  # generous: the machine may be shared
    while len(list(trials.glob("*/checkpoints"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the first trial did not finish in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130, proc.stderr.read()
    return trials.parent


@pytest.fixture(scope="module")
def search(demo_root: Path, tmp_path_factory):
    """The grid, interrupted after its first trial and resumed; with the test-read log."""
    tmp = tmp_path_factory.mktemp("tune")
    out, log = tmp / "runs", tmp / "reads.log"
    experiment = _interrupted_search(demo_root, out, log)
    done = [r for r in _rows(experiment) if r["state"] == "completed"]
    before = {r["trial_id"]: _digest(Path(r["run_dir"])) for r in done}
    evaluations: list[float] = []
    from vtadl import evaluation

    with pytest.MonkeyPatch.context() as mp:
        original = evaluation.evaluate_run

        def counted(*args, **kwargs):
            evaluations.append(time.time())
            return original(*args, **kwargs)

        mp.setattr(evaluation, "evaluate_run", counted)
        init_ray(log)
        record_test_reads()
        try:
            from vtadl.tune.driver import tune

            summary = tune(base_config(demo_root, out), {"resume": True})
        finally:
            ray.shutdown()
    return {
        "summary": summary,
        "experiment": experiment,
        "before": before,
        "log": log.read_text().splitlines(),
        "evaluations": evaluations,
        "out": out,
    }


def _rows(experiment: Path) -> list[dict]:
    with open(experiment / "tune_results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_each_network_is_trained_once_and_every_k_fitted_to_it(search) -> None:
    rows = _rows(search["experiment"])
    assert len(rows) == 6
    assert {(r["n_gaussians"], r["noise_std"]) for r in rows} == {
        (k, noise) for k in ("2", "8") for noise in ("0.0", "0.1", "0.2")
    }
    assert {r["mixture_fit"] for r in rows} == {"kernel"}
    trainings = {}
    for r in rows:
        trainings.setdefault(r["trial_id"], []).append(r)
    assert len(trainings) == 3  # one per noise level, not one per (K, noise)
    for same in trainings.values():
        assert [r["n_gaussians"] for r in same] == ["2", "8"]
        assert len({(r["noise_std"], r["run_dir"], r["epochs"], r["state"]) for r in same}) == 1
    # Both K were fitted to each network and scored apart.
    assert any(same[0]["au_pro"] != same[1]["au_pro"] for same in trainings.values())
    run_dir = Path(rows[0]["run_dir"])
    assert {p.name for p in run_dir.glob("mixture_best*")} >= {
        "mixture_best_kernel2.npz",
        "mixture_best_kernel8.npz",
    }


def test_every_trial_reports_and_asha_stops_some(search) -> None:
    rows = _rows(search["experiment"])
    for r in rows:
        assert 0.0 <= float(r["au_pro"]) <= 1.0
        assert 1 <= int(r["epochs"]) <= EPOCHS
        history = (Path(r["run_dir"]) / "history.jsonl").read_text().splitlines()
        assert len(history) == int(r["epochs"])
        # The trial's wall clock covers at least its epochs' training.
        trained = sum(json.loads(line)["train_seconds"] for line in history)
        assert float(r["seconds"]) >= trained
    states = [r["state"] for r in rows]
    assert set(states) <= {"completed", "stopped early"}
    assert "stopped early" in states and "completed" in states
    # Tune's TensorBoard files for every trial (an interrupted trial has two).
    for r in rows:
        assert list(search["experiment"].glob(f"trial_{r['trial_id']}/events.out.tfevents*"))


def test_best_is_chosen_on_the_tuning_split_and_the_test_split_is_read_once(search) -> None:
    summary, rows = search["summary"], _rows(search["experiment"])
    best = max(rows, key=lambda r: float(r["au_pro"]))
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert str(summary["best"]["n_gaussians"]) == best["n_gaussians"]
    assert summary["metric"] == "au_pro"
    lines = [line.split(" ", 2) for line in search["log"]]
    # The hook ran in the Ray workers of both phases, not only here.
    assert len({pid for _, pid, what in lines if what == "setup"} - {str(os.getpid())}) >= 2
    reads = [(float(t), pid) for t, pid, what in lines if what.startswith("read")]
    [evaluated] = search["evaluations"]  # the test split was evaluated once ...
    assert reads and all(t >= evaluated for t, _ in reads)  # ... and read by nothing before
    assert {pid for _, pid in reads} == {str(os.getpid())}


def test_best_run_is_a_train_run_evaluated_on_the_test_split(search) -> None:
    summary = search["summary"]
    run = Path(summary["best_run"])
    assert run.parent == search["out"] / "mvtec" / "brick"
    k = int(float(summary["best"]["n_gaussians"]))
    config = (run / "config.yaml").read_text()
    assert f"n_gaussians: {k}" in config and "mixture_fit: kernel" in config  # the run's fit
    assert len((run / "history.jsonl").read_text().splitlines()) == EPOCHS
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_gaussians"] == k and metrics["mixture_fit"] == "kernel"
    assert metrics == {**metrics, **{k: summary["test_metrics"][k] for k in ("au_pro", "n_test")}}
    assert list((run / "maps").glob("*.png"))
    assert not (Path(summary["best"]["run_dir"]) / "metrics.json").exists()


def test_the_winner_is_a_config_file_that_train_takes_unchanged(search) -> None:
    from vtadl.checkpoints import model_from_checkpoint
    from vtadl.runs import train_config

    summary = search["summary"]
    path = Path(summary["best_config"])
    assert path.parent == search["experiment"]
    config, _ = train_config(config_file=path)
    best = summary["best"]
    assert config.model.n_gaussians == int(float(best["n_gaussians"]))
    assert config.model.noise_std == float(best["noise_std"])
    assert config.data.category == "brick" and config.train.epochs == EPOCHS
    # The best run's checkpoint says the same K: predict and evaluate use it.
    stored, _, _ = model_from_checkpoint(Path(summary["best_run"]) / "checkpoints" / "best.pt")
    assert stored.model == config.model


def test_resume_completed_the_search_without_redoing_finished_trials(search) -> None:
    assert search["before"], "the interruption came before any trial finished"
    for trial_id, digest in search["before"].items():
        run_dir = search["experiment"] / "trials" / trial_id
        assert _digest(run_dir) == digest
    assert all(r["state"] != "pending" for r in _rows(search["experiment"]))
    assert (search["experiment"] / "tuning.json").exists()


def test_report_of_a_search_holds_table_ablation_and_gallery(search, tmp_path) -> None:
    from vtadl.report import write_report

    out = tmp_path / "report.html"
    assert write_report(search["out"], out) == {"runs": 1, "experiments": 1}
    page = out.read_text()
    table = page[page.index("<table>") : page.index("</table>")]
    assert "brick" in table and "image AUROC" in table and "AU-PRO" in table and "mean" in table
    metrics = json.loads((Path(search["summary"]["best_run"]) / "metrics.json").read_text())
    assert f"{metrics['image_auroc']:.3f}" in table
    assert 'alt="brick: AU-PRO (FPR&lt;=0.3) against number of Gaussians' in page
    assert 'alt="brick: AU-PRO (FPR&lt;=0.3) against noise level' in page
    n_maps = len(list((Path(search["summary"]["best_run"]) / "maps").glob("*.png")))
    # Two ablation plots, the trials' and the run's loss curves, the heat maps.
    assert page.count("data:image/png;base64,") == 4 + n_maps
    assert "class=gallery" in page and "(best)" in page
    assert "http://" not in page and "https://" not in page


def test_k_is_searched_under_the_run_s_own_fit_and_trained_only_when_it_shapes_training():
    ray_tune = pytest.importorskip("ray.tune")
    config = default_config("vtadl_tiny")
    assert config.train.mixture_fit == "kernel"
    # No values: K under the run's fit (coreset sizes for a kernel), and the noise.
    assert default_space("kernel")["n_gaussians"] == [16384, 32768, "all"]
    assert default_space("em")["n_gaussians"] == [10, 50, 100, 150]  # the paper's ablation
    assert default_space("sgd")["noise_std"] == [0.0, 0.1, 0.2]
    settings = TuneSettings(space={"n_gaussians": [2, 8, "all"], "noise_std": [0.0, 0.2]})
    for how in ("kernel", "em"):  # fitted after training: not a trial dimension
        fitted = fitted_after_training(config.override(train={"mixture_fit": how}), settings)
        assert fitted == ("n_gaussians",)
        assert n_trials(settings, fitted) == 2
        assert search_space(settings, fitted) == {"noise_std": ray_tune.grid_search([0.0, 0.2])}
    sgd = config.override(train={"mixture_fit": "sgd"})  # K is trained: a trial each
    assert fitted_after_training(sgd, settings) == ()
    assert n_trials(settings) == 6
    attached = config.override(model={"mdn_detach": False}, train={"mixture_fit": "em"})
    assert fitted_after_training(attached, settings) == ()  # the head shapes the encoder
    assert fitted_after_training(config, TuneSettings(space={"noise_std": [0.1]})) == ()


def test_tuning_split_masks_are_exact() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    split = make_tuning_split(images, per_kind=2, seed=1)
    assert len(split.images) == 2 + 2 * 2 * len(KINDS)
    assert list(split.labels) == [0, 0] + [1] * 12
    for i in range(2, len(split.images)):
        clean = images[(i - 2) // (2 * len(KINDS))]
        mask = split.masks[i]
        assert mask.any()
        assert (split.images[i][~mask] == clean[~mask]).all()
        assert (split.images[i][mask] != clean[mask]).any(axis=-1).all()
    again = make_tuning_split(images, per_kind=2, seed=1)
    assert (again.images == split.images).all()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--gaussians", "0,10"], "at least 1"),
        (["--gaussians", ""], "empty"),
        (["--noise", "0.1,-0.2"], "at least 0.0"),
        (["--noise", "0.1,high"], "not a number"),
        (["--gaussians", "2.5"], "whole number"),
        (["--gaussians", "8,all", "--mixture-fit", "em"], "n_gaussians all"),
        (["--metric", "f1"], "unknown metric"),
        (["--scheduler", "hyperband"], "unknown scheduler"),
        (["--search", "bayes"], "unknown search"),
        (["--ray-address", "127.0.0.1:9"], "does not answer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(demo_root, tmp_path, option, message) -> None:
    from vtadl.cli.main import app

    out = tmp_path / "runs"
    args = ["tune", "--root", str(demo_root), "--category", "brick", "--out", str(out), *option]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "tune").exists()


def test_trials_score_the_tuning_split_only_where_the_scheduler_decides() -> None:
    # ASHA decides at its rungs (grace period, then x reduction factor) and at the end;
    # FIFO only at the end (the first epoch is scored so that every report has a number).
    asha = TuneSettings(scheduler="asha", grace_period=1, reduction_factor=2)
    assert scoring_epochs(10, asha) == [1, 2, 4, 8, 10]
    assert scoring_epochs(100, TuneSettings(scheduler="asha")) == [1, 12, 24, 48, 96, 100]
    assert scoring_epochs(10, TuneSettings(scheduler="fifo")) == [1, 10]
    assert scoring_epochs(1, TuneSettings(scheduler="fifo")) == [1]


def test_trials_report_at_scoring_epochs_and_otherwise_at_most_every_interval(
    monkeypatch,
) -> None:
    # What the trial sends to Tune, epoch by epoch (Tune's report recorded, not run: the
    # search above runs the real one); the scoring itself is counted, not computed.
    import ray.tune

    from vtadl.tune import trial

    sent, scored = [], []
    monkeypatch.setattr(ray.tune, "report", lambda metrics: sent.append(metrics["epoch"]))

    def score(run_dir, split, ks):
        scored.append(run_dir)
        return [{"au_pro": 0.5, "pixel_auroc": 0.6, "image_auroc": 0.7}]

    monkeypatch.setattr(trial, "tuning_scores", score)

    def run(every: float, epochs: int = 10) -> list[int]:
        sent.clear()
        reporter = trial._Reporter(Path("run"), None, "au_pro", [1, 4, epochs], every=every)
        for epoch in range(1, epochs + 1):
            reporter.on_epoch_end({"epoch": epoch, "val_loss": 1.0, "best": epoch == 3})
        return list(sent)

    assert run(every=3600) == [1, 4, 10]  # quick epochs: the scoring epochs only
    assert run(every=0) == list(range(1, 11))  # slow epochs: every one
    # The checkpoint changed at epoch 3, so epoch 4 scored again; epoch 10 did not need to.
    assert len(scored) == 4


def test_a_report_that_decides_nothing_fits_the_cheapest_k_only(monkeypatch) -> None:
    # The first epoch is scored only because Tune wants the objective in every report;
    # every K is fitted where the scheduler decides, even with the checkpoint unchanged.
    import ray.tune

    from vtadl.tune import trial

    sent, asked = [], []
    monkeypatch.setattr(ray.tune, "report", lambda metrics: sent.append(dict(metrics)))
    scores = {"au_pro": 0.5, "pixel_auroc": 0.6, "image_auroc": 0.7}
    monkeypatch.setattr(
        trial, "tuning_scores", lambda run_dir, split, ks: asked.append(ks) or [scores] * len(ks)
    )
    ks = [100, 10, "all"]
    reporter = trial._Reporter(Path("run"), None, "au_pro", [1, 5], ks, 3600, decide_at=[5])
    for epoch in range(1, 6):
        reporter.on_epoch_end({"epoch": epoch, "val_loss": 1.0, "best": epoch == 1})
    assert asked == [[10], ks]
    assert [m["epoch"] for m in sent] == [1, 5]
    assert "k10_au_pro" in sent[0] and "kall_au_pro" not in sent[0]
    assert all(trial.k_key(k, "au_pro") in sent[-1] for k in ks)
    assert trial.deciding_epochs(10, TuneSettings(scheduler="fifo")) == [10]
