"""Ray Tune on this machine: trials per hour, and a Tune trial's cost against `vtadl train`.

.venv/bin/python benchmarks/tune_throughput.py tiny
    the 2 x 2 grid of the tests (vtadl_tiny, tiny demo data): trials per hour with 1 and 2
    trials at once, FIFO and ASHA; Ray is started once before the timed searches
.venv/bin/python benchmarks/tune_throughput.py overhead --epochs 10
    the same run (vtadl_small, demo brick) as `vtadl train` and as a one-trial `vtadl tune`,
    each a fresh process timed end to end, alternated `--repeats` times
.venv/bin/python benchmarks/tune_throughput.py report --reports 100
    what one `tune.report` costs a trial that does nothing else (a function trainable
    waits until Tune's controller has taken each report in)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VTADL = [sys.executable, "-m", "vtadl"]


def tiny(a: argparse.Namespace) -> None:
    import ray

    from vtadl.config import default_config
    from vtadl.data.demo import make_demo_dataset
    from vtadl.ray_session import start_local
    from vtadl.tune.driver import tune

    tmp = Path(tempfile.mkdtemp(prefix="tune-tiny-"))
    make_demo_dataset(
        tmp / "data", ["brick"], image_size=32, n_train=12, n_test_good=4, n_test_defect=2
    )
    tic = time.perf_counter()
    start_local(os.cpu_count(), logging_level="ERROR", log_to_driver=False)
    print(f"Ray start: {time.perf_counter() - tic:.1f} s\n")
    print("| trials at once | scheduler | trials | epochs run | wall time | trials per hour |")
    print("|---|---|---|---|---|---|")
    for concurrent in (1, 2):
        for scheduler in ("fifo", "asha"):
            name = f"c{concurrent}-{scheduler}"
            base = default_config("vtadl_tiny").override(
                data={"root": str(tmp / "data"), "category": "brick"},
                train={"epochs": a.epochs, "batch_size": 4, "out": str(tmp / name)},
            )
            tic = time.perf_counter()
            s = tune(
                base,
                {
                    "gaussians": "2,8",
                    "noise": "0,0.2",
                    "scheduler": scheduler,
                    "max_concurrent": concurrent,
                    "name": name,
                },
            )
            seconds = time.perf_counter() - tic
            epochs = sum(r["epochs"] for r in s["trials"])
            n = len(s["trials"])
            print(
                f"| {concurrent} | {scheduler} | {n} | {epochs} | {seconds:.0f} s "
                f"| {3600 * n / seconds:.0f} |",
                flush=True,
            )
    ray.shutdown()


def _timed(command: list[str]) -> tuple[float, dict]:
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def _epoch_seconds(run_dir: str | Path, key: str = "seconds") -> float:
    """The median over epochs (the first left out) of an epoch's wall clock ("seconds":
    training, validation, checkpoints, the previous epoch's report) or of its training
    steps alone ("train_seconds")."""
    lines = (Path(run_dir) / "history.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)[key] for line in lines[1:])


def overhead(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tune-overhead-"))
    common = [
        "--root",
        a.root,
        "--category",
        a.category,
        "--variant",
        "vtadl_small",
        "--epochs",
        str(a.epochs),
        "--json",
    ]
    print(
        "| repeat | vtadl train | vtadl tune (1 trial) | overhead | train's fit "
        "| the trial | trial overhead | median epoch, train / trial "
        "| its training steps, train / trial |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, trial_ratios = [], []
    for i in range(a.repeats):
        train_s, train = _timed([*VTADL, "train", *common, "--out", str(tmp / f"train{i}")])
        tune_s, tuned = _timed(
            [
                *VTADL,
                "tune",
                *common,
                "--out",
                str(tmp / f"tune{i}"),
                "--gaussians",
                "30",
                "--noise",
                "0.2",
                "--scheduler",
                "fifo",
            ]
        )
        ratios.append(tune_s / train_s - 1)
        # The trial against the training it repeats: Ray's time_total_s of the trial actor
        # (set-up, epochs, scoring on the tuning split) against the train run's fit call.
        fit_s = train["timing"]["fit_seconds"]
        trial_s = tuned["trials"][0]["seconds"]
        trial_ratios.append(trial_s / fit_s - 1)
        print(
            f"| {i + 1} | {train_s:.0f} s | {tune_s:.0f} s | {100 * ratios[-1]:+.0f}% "
            f"| {fit_s:.1f} s | {trial_s:.1f} s | {100 * trial_ratios[-1]:+.0f}% "
            f"| {_epoch_seconds(train['run_dir']):.2f} / "
            f"{_epoch_seconds(tuned['best']['run_dir']):.2f} s "
            f"| {_epoch_seconds(train['run_dir'], 'train_seconds'):.2f} / "
            f"{_epoch_seconds(tuned['best']['run_dir'], 'train_seconds'):.2f} s |",
            flush=True,
        )
    print(
        f"\nmedian overhead: whole command {100 * statistics.median(ratios):+.0f}%, "
        f"the trial {100 * statistics.median(trial_ratios):+.0f}%"
    )


def report_cost(a: argparse.Namespace) -> None:
    import logging

    import ray
    from ray import tune

    from vtadl.ray_session import start_local

    start_local(2, logging_level=logging.WARNING, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="tune-report-"))
    n = a.reports

    def trainable(config: dict) -> None:
        tic = time.perf_counter()
        for i in range(n):
            tune.report({"epoch": i + 1})
        (out / "seconds").write_text(str(time.perf_counter() - tic))

    run = tune.RunConfig(storage_path=str(out), verbose=0)
    tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), run_config=run).fit()
    seconds = float((out / "seconds").read_text())
    print(f"{n} reports in {seconds:.2f} s: {1000 * seconds / n:.1f} ms per report")
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tiny")
    t.add_argument("--epochs", type=int, default=4)
    o = sub.add_parser("overhead")
    o.add_argument("--root", default="data/demo")
    o.add_argument("--category", default="brick")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--repeats", type=int, default=2)
    r = sub.add_parser("report")
    r.add_argument("--reports", type=int, default=100)
    a = p.parse_args()
    {"tiny": tiny, "overhead": overhead, "report": report_cost}[a.what](a)


if __name__ == "__main__":
    main()
