"""What drives a search: `tune()`, the Tuner and its trainable, the trials' results, the best
trial finished and evaluated once on the test split."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vtadl.config import Config, absolute_paths, save_config, validate
from vtadl.data.synthetic import KINDS
from vtadl.exceptions import ConfigError, RunError, TrainingError
from vtadl.ray_session import check_address, session
from vtadl.run_folders import new_run_dir
from vtadl.tune.settings import (
    BEST_CONFIG,
    EPOCH,
    OBJECTIVE,
    OBJECTIVES,
    RESULTS_FILE,
    SETTINGS_FILE,
    SPLIT_FILE,
    SUMMARY_FILE,
    TuneSettings,
    grace_period,
    n_trials,
    search_space,
    settings_from_options,
)
from vtadl.tune.trial import (
    deciding_epochs,
    fitted_after_training,
    k_key,
    run_trial,
    scoring_epochs,
    settings_for,
    trial_config,
    trial_dirname,
    tuning_split,
)

log = logging.getLogger(__name__)

FINISHED = ("completed", "stopped early", "error")


def tune(base_config: Config | dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Run (or with `options["resume"]` continue) a search; evaluate the best run once.

    `base_config` is a Config or its dict, `options` JSON-serialisable (see
    `settings_from_options`), so a queue job can pass both as JSON. Returns a JSON-serialisable
    summary: the experiment folder, the trials' rows, the best trial, its run folder and test
    metrics.
    """
    settings = settings_from_options(options)
    if isinstance(base_config, dict):
        base_config = Config.from_dict(base_config)
    # Trials run in their own working folders: every path is made absolute.
    base = absolute_paths(validate(base_config))
    settings = settings_for(base, settings)
    check_address(base.train.ray_address)
    d = base.data
    root = Path(base.train.out) / "tune" / d.dataset / d.category
    resume = bool(options.get("resume"))
    if resume:
        experiment = latest_experiment(root, settings.name)
        stored = json.loads((experiment / SETTINGS_FILE).read_text())
        settings, base = TuneSettings(**stored["settings"]), Config.from_dict(stored["config"])
        summary_path = experiment / SUMMARY_FILE
        if summary_path.exists():
            return json.loads(summary_path.read_text())
    else:
        experiment = root / (settings.name or datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
        if experiment.exists():
            raise ConfigError(f"experiment {experiment} exists; pick another name or --resume")
    if not (experiment / SPLIT_FILE).exists():
        _write_split(experiment, base, settings)

    with session(base.train.ray_address, **_resources(base, settings)):
        trainable = _trainable(base, settings, experiment)
        with _quiet_tune():
            _tuner(base, settings, experiment, trainable, resume).fit()
        rows = trial_rows(experiment, settings, base)
        write_results(experiment / RESULTS_FILE, rows)
        trained = {r["trial_id"]: r["state"] for r in rows}
        fitted = fitted_after_training(base, settings)
        if len(trained) < n_trials(settings, fitted) or any(
            state not in FINISHED for state in trained.values()
        ):
            raise KeyboardInterrupt  # Tune caught Ctrl-C and saved the experiment
        best = best_trial(rows, settings.metric)
        run_dir, test_metrics, config_path = finish_best(base, settings, best, experiment)
    summary = {
        "experiment": str(experiment),
        "metric": settings.metric,
        "objective_split": f"validation images with synthetic defects ({', '.join(KINDS)})",
        "mixture_fit": base.train.mixture_fit,
        "fitted_after_training": list(fitted),
        "trials": rows,
        "best": best,
        "best_run": str(run_dir),
        "best_config": str(config_path),
        "test_metrics": test_metrics,
    }
    (experiment / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _write_split(experiment: Path, base: Config, settings: TuneSettings) -> None:
    """The tuning split and the search's settings, kept in the experiment for its trials and
    for a resume."""
    split = tuning_split(base, settings.defects_per_kind)  # packs the category once
    experiment.mkdir(parents=True, exist_ok=True)
    split.save(experiment / SPLIT_FILE)
    (experiment / SETTINGS_FILE).write_text(
        json.dumps(
            {"settings": asdict(settings), "config": base.to_dict(), "split": split.describe()},
            indent=2,
        )
    )


def _resources(config: Config, settings: TuneSettings) -> dict[str, float]:
    """What a local Ray needs for the concurrent trials: a single-process trial shares the
    machine; a ddp/deepspeed trial holds a CPU and launches its workers."""
    t = config.train
    need = 0 if t.strategy == "single" else 1 + t.num_workers * t.cpus_per_worker
    return {
        "cpus": settings.max_concurrent * need,
        "gpus": settings.max_concurrent * t.num_workers * t.gpus_per_worker,
    }


def _trainable(config: Config, settings: TuneSettings, experiment: Path):
    import ray
    from ray import tune

    t = config.train
    if t.strategy == "single":
        # The machine is shared evenly by the trials that run at once.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // settings.max_concurrent)
        resources = {"cpu": cpus, "gpu": t.gpus_per_worker}
    else:
        # The trial launches its TorchTrainer, waits, and scores between epochs.
        resources = {"cpu": 1}
    fitted = fitted_after_training(config, settings)
    setup = {
        "config": config.to_dict(),
        "experiment": str(experiment),
        "metric": settings.metric,
        "score_at": scoring_epochs(t.epochs, settings),
        "decide_at": deciding_epochs(t.epochs, settings),
        "ks": settings.space["n_gaussians"] if fitted else None,
    }
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)


def _tuner(config: Config, settings: TuneSettings, experiment: Path, trainable, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if resume:
        return tune.Tuner.restore(
            str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    scheduler = (
        ASHAScheduler(
            time_attr=EPOCH,
            max_t=config.train.epochs,
            grace_period=grace_period(settings, config.train.epochs),
            reduction_factor=settings.reduction_factor,
        )
        if settings.scheduler == "asha"
        else FIFOScheduler()
    )
    search_alg = None
    if settings.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ConcurrencyLimiter(
            OptunaSearch(seed=config.train.seed), max_concurrent=settings.max_concurrent
        )
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    return tune.Tuner(
        trainable,
        param_space=search_space(settings, fitted_after_training(config, settings)),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            # The limiter bounds Optuna's trials; Tune warns if both are given.
            max_concurrent_trials=None if search_alg else settings.max_concurrent,
            reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(experiment.parent),
            verbose=1 if log.isEnabledFor(logging.INFO) else 0,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


@contextmanager
def _quiet_tune():
    """Tune's console output only with -v: its newer output prints a header and a TensorBoard
    hint into Ray's temporary session folder whatever the verbosity; the older one does not."""
    if log.isEnabledFor(logging.INFO):
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT")
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def trial_rows(experiment: Path, settings: TuneSettings, base: Config) -> list[dict[str, Any]]:
    """One row per trial and K fitted after training (one per trial when K is trained):
    parameters, objective, epochs run, state."""
    from ray.tune import ExperimentAnalysis

    fitted = fitted_after_training(base, settings)
    ks = settings.space["n_gaussians"] if fitted else [None]
    rows = []
    for trial in ExperimentAnalysis(str(experiment)).trials:
        last = trial.last_result or {}
        done = last.get(EPOCH, 0)
        if trial.status == "ERROR":
            state = "error"
        elif trial.status != "TERMINATED":
            state = trial.status.lower()
        else:
            state = "completed" if done >= base.train.epochs else "stopped early"
        for k in ks:
            scores = {
                name: last.get(k_key(k, name) if k is not None else f"tuning_{name}")
                for name in OBJECTIVES
            }
            params = {name: trial.config.get(name) for name in settings.space}
            rows.append(
                {
                    "trial_id": trial.trial_id,
                    **params,
                    **({"n_gaussians": k} if k is not None else {}),
                    "mixture_fit": base.train.mixture_fit,
                    settings.metric: scores[settings.metric],
                    "epochs": done,
                    "state": state,
                    "val_loss": last.get("val_loss"),
                    **{f"tuning_{name}": v for name, v in scores.items()},
                    # The trial's wall clock in its actor (Ray's time_total_s): set-up,
                    # epochs, fits and scoring on the tuning split, shared by its K.
                    "seconds": last.get("time_total_s"),
                    "run_dir": str(experiment / "trials" / trial.trial_id),
                }
            )
    return sorted(rows, key=lambda r: r["trial_id"])


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)


def best_trial(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Highest objective; ties go to the trial that trained longer, then lower val loss."""
    scored = [r for r in rows if r[metric] is not None and not math.isnan(r[metric])]
    if not scored:
        raise TrainingError("no trial reported an objective; see the trials' error.txt files")
    return max(scored, key=lambda r: (r[metric], r["epochs"], -(r["val_loss"] or 0)))


def finish_best(
    base: Config, settings: TuneSettings, best: dict[str, Any], experiment: Path
) -> tuple[Path, dict, Path]:
    """Copy the best trial's run to a new run folder with the best K, train it to the end if
    ASHA stopped it, evaluate it once on the test split, and write its config as a file
    that `vtadl train --config` and `vtadl submit --config` take (BEST_CONFIG)."""
    from vtadl.evaluation import evaluate_run
    from vtadl.runs import set_gaussians, train_and_evaluate

    config = trial_config(base, {k: best[k] for k in settings.space})
    config_path = experiment / BEST_CONFIG
    save_config(config, config_path)
    run_dir = new_run_dir(config)
    # Ray Train's own storage (ddp, deepspeed) names absolute paths of the trial: not copied.
    shutil.copytree(best["run_dir"], run_dir, ignore=shutil.ignore_patterns("ray", "workers"))
    if fitted_after_training(base, settings):
        set_gaussians(run_dir, best["n_gaussians"])
    if best["epochs"] >= config.train.epochs:
        return run_dir, evaluate_run(run_dir), config_path
    log.info("the best trial stopped after %d epochs; training it to the end", best["epochs"])
    run_dir, result = train_and_evaluate(config, run_dir=run_dir)
    return run_dir, result, config_path


def latest_experiment(root: Path, name: str = "") -> Path:
    """The newest resumable experiment under `root`, or the one called `name`."""
    from ray.tune import Tuner

    pattern = f"{name or '*'}/{SETTINGS_FILE}"
    found = sorted(p.parent for p in root.glob(pattern) if Tuner.can_restore(p.parent))
    if not found:
        raise RunError(f"no Tune experiment to resume under {root}")
    return found[-1]
