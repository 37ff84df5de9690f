"""Ray Tune searches over a run's settings (number of Gaussians, noise level, learning rate).

`tune(base_config, options)` runs one Tune experiment for one category:

1. The tuning split: the validation images (normal training images held out from training)
   clean, plus copies with synthetic defects pasted in (`vtadl.data.synthetic`), so a search
   needs no labelled anomalies and never reads the test split.
2. Each trial is one training run of the base config with the trial's parameters, through
   `vtadl.runs.fit` (in the trial's process, or a `TorchTrainer` launched from it for ddp and
   deepspeed: the Ray Train V2 way). The trial reports its objective to Tune, so ASHA can
   stop poor trials early: the score of the run's best checkpoint (lowest validation loss)
   on the tuning split, computed afresh at the first epoch, at each of ASHA's decision
   points and at the last epoch (scoring every epoch would add about half an epoch's time),
   and reported then and, in between, at most every `REPORT_EVERY_S` seconds.
3. The objective is AU-PRO on the tuning split by default. The validation loss cannot rank
   runs with different noise levels or numbers of Gaussians (the noise and the mixture change
   the loss itself), and pixel AUROC is dominated by the largest defects: the synthetic
   defects' sizes are our own arbitrary choice, while AU-PRO weighs every defect region
   equally and looks only at false-positive rates up to 0.3, where a threshold would be set.
4. The best trial's run folder is copied to where `vtadl train` puts runs (training is
   finished there first if ASHA cut the trial short: resumed from its last checkpoint in one
   process, retrained for ddp/deepspeed) and evaluated once on the test split.

Layout: `<out>/tune/<dataset>/<category>/<experiment>/` is the Tune experiment (resumable,
TensorBoard files per trial) with `trials/<trial_id>/` (each trial's run folder),
`tuning_split.npz`, `tune_settings.json`, `tune_results.csv` and `tuning.json`; the best run
is `<out>/<dataset>/<category>/<run_id>/`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vtadl import metrics
from vtadl.config import Config, load_stored_config, validate
from vtadl.data.synthetic import KINDS, TuningSplit, make_tuning_split
from vtadl.exceptions import ConfigError, RunError, TrainingError
from vtadl.training import BEST, Callbacks, new_run_dir

log = logging.getLogger(__name__)

OBJECTIVES = ("au_pro", "pixel_auroc", "image_auroc")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")
# Searchable parameters: config section and type.
PARAMS: dict[str, tuple[str, type]] = {
    "n_gaussians": ("model", int),
    "noise_std": ("model", float),
    "lr": ("train", float),
}
# The paper's ablation, searched when no values are given.
DEFAULT_SPACE = {"n_gaussians": [10, 50, 100, 150], "noise_std": [0.0, 0.1, 0.2]}
OBJECTIVE, EPOCH = "objective", "epoch"
SPLIT_FILE, SETTINGS_FILE = "tuning_split.npz", "tune_settings.json"
RESULTS_FILE, SUMMARY_FILE = "tune_results.csv", "tuning.json"
# Between scoring epochs a trial reports to Tune at most this often (see _Reporter).
REPORT_EVERY_S = 10.0
FINISHED = ("completed", "stopped early", "error")
_KINDS = {"int": "a whole number", "str": "a string"}


@dataclass(frozen=True)
class TuneSettings:
    """What a search does, apart from the run's config; JSON-serialisable."""

    space: dict[str, list] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    search: str = "grid"
    num_samples: int = 1
    scheduler: str = "asha"
    metric: str = "au_pro"
    max_concurrent: int = 1
    grace_period: int = 0  # epochs before ASHA's first decision; 0: an eighth of the epochs
    reduction_factor: int = 2
    defects_per_kind: int = 2
    name: str = ""


def parse_values(text: str | list, name: str) -> list:
    """'10,50' (or a list) -> checked values of parameter `name`."""
    kind = PARAMS[name][1]
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i.strip() if isinstance(i, str) else i for i in items]
    if not items or any(i == "" for i in items):
        raise ConfigError(f"empty value in the {name} search values {text!r}")
    values = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} search value {item!r} is not a number") from None
        if kind is int and not number.is_integer():
            raise ConfigError(f"{name} search value {item!r} is not a whole number")
        values.append(kind(number))
    low = {"n_gaussians": 1, "noise_std": 0.0}.get(name)
    if low is not None and min(values) < low:
        raise ConfigError(f"{name} search values must be at least {low}, got {min(values)}")
    if name == "lr" and min(values) <= 0:
        raise ConfigError(f"learning rates must be positive, got {min(values)}")
    return list(dict.fromkeys(values))


def settings_from_options(options: dict[str, Any]) -> TuneSettings:
    """Checked settings from options (`gaussians`, `noise`, `lr` as '1,2' or lists; `search`,
    `num_samples`, `scheduler`, `metric`, `max_concurrent`, ...)."""
    o = {k: v for k, v in options.items() if v is not None}
    given = {"n_gaussians": o.pop("gaussians", None), "noise_std": o.pop("noise", None)}
    given["lr"] = o.pop("lr", None)
    space = {k: parse_values(v, k) for k, v in given.items() if v is not None}
    o.pop("resume", None)
    known = {f for f in TuneSettings.__dataclass_fields__} - {"space"}
    unknown = sorted(set(o) - known)
    if unknown:
        raise ConfigError(f"unknown tune option(s): {', '.join(unknown)}")
    for name, value in o.items():
        kind = TuneSettings.__dataclass_fields__[name].type
        if (kind == "int") != (isinstance(value, int) and not isinstance(value, bool)) or (
            kind == "str" and not isinstance(value, str)
        ):
            raise ConfigError(f"tune option {name} must be {_KINDS[kind]}, got {value!r}")
    s = TuneSettings(space=space or dict(DEFAULT_SPACE), **o)
    for value, allowed, what in (
        (s.search, SEARCHES, "search"),
        (s.scheduler, SCHEDULERS, "scheduler"),
        (s.metric, OBJECTIVES, "metric"),
    ):
        if value not in allowed:
            raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if s.grace_period < 0:
        raise ConfigError(f"grace_period must not be negative, got {s.grace_period}")
    for name in ("num_samples", "max_concurrent", "defects_per_kind"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(s, name)}")
    if s.reduction_factor < 2:
        raise ConfigError(f"reduction_factor must be at least 2, got {s.reduction_factor}")
    if s.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "search optuna needs the optuna package (pip install optuna)"
            ) from None
    return s


def grace_period(settings: TuneSettings, epochs: int) -> int:
    return min(settings.grace_period or max(1, epochs // 8), epochs)


def search_space(settings: TuneSettings) -> dict[str, Any]:
    """The Tune parameter space: a grid, or a choice per parameter for random and Optuna
    (Optuna rejects grid_search)."""
    from ray import tune

    pick = tune.grid_search if settings.search == "grid" else tune.choice
    return {name: pick(values) for name, values in settings.space.items()}


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    sections: dict[str, dict] = {}
    for name, value in params.items():
        sections.setdefault(PARAMS[name][0], {})[name] = value
    return base.override(**sections)


def searchable(config: Config, settings: TuneSettings) -> Config:
    """The base config of the trials. A search over the number of Gaussians (the paper's
    ablation, the default space) needs a mixture of that many: the kernel mixture has one
    per training token, so such trials fit theirs by EM."""
    if "n_gaussians" in settings.space and config.train.mixture_fit == "kernel":
        log.info("searching the number of Gaussians: the trials fit their mixtures by EM")
        return config.override(train={"mixture_fit": "em"})
    return config


def tuning_split(config: Config, per_kind: int) -> TuningSplit:
    """Model inputs of the validation split (every tile, when tiling) with synthetic defects."""
    from vtadl.data.source import category_source

    src = category_source(config)
    n = len(src.items("val"))
    inputs = np.concatenate([src.model_input("val", i)[0] for i in range(n)])
    return make_tuning_split(inputs, per_kind=per_kind, seed=config.train.seed)


def tuning_scores(run_dir: str | Path, split: TuningSplit, checkpoint: str = BEST) -> dict:
    """Image AUROC, pixel AUROC and AU-PRO of a run's checkpoint on the tuning split.

    The run's own score and calibration (from its validation images) are used, as in
    `evaluate_run`; nothing is written to the run folder.
    """
    from vtadl.evaluation import Scorer

    # An explicit override makes the Scorer calibrate afresh without writing calibration.json
    # (which belongs to the run's final evaluation).
    config = load_stored_config(Path(run_dir) / "config.yaml")
    scorer = Scorer(run_dir, checkpoint=checkpoint, eval_overrides={"score": config.eval.score})
    raws = scorer.raw(split.images).split(range(1, len(split.images)))
    shape = split.images.shape[1:3]
    maps, scores = zip(*(scorer.scored(raw, None, shape) for raw in raws))
    maps = list(maps)
    masks = list(split.masks)
    return {
        "au_pro": metrics.au_pro(maps, masks, fpr_limit=0.3),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "image_auroc": metrics.image_auroc(scores, split.labels),
    }


def scoring_epochs(epochs: int, settings: TuneSettings) -> list[int]:
    """Epochs at which a trial scores its best checkpoint on the tuning split: the first and
    the last, and under ASHA its decision points too (the rungs: grace * factor^k). FIFO
    decides on the last report only, so scoring in between would only cost time."""
    marks = {1, epochs}
    if settings.scheduler == "asha":
        rung = grace_period(settings, epochs)
        while rung < epochs:
            marks.add(rung)
            rung *= settings.reduction_factor
    return sorted(marks)


class _Reporter(Callbacks):
    """Scores the best checkpoint on the tuning split at the scoring epochs (if it changed)
    and reports to Tune then, and in between at most every `every` seconds, with the
    objective of the last scoring.

    A report holds the trial until Tune's controller, in the driver process, has taken it in
    (a function trainable reports synchronously, so that a scheduler can stop the trial
    there): about 35 ms on a busy 2-core machine (benchmarks/RESULTS.md), more where the
    driver is on another node. ASHA decides at its rungs only, which are scoring epochs,
    and the run folder's history.jsonl and TensorBoard files still have every epoch.
    """

    def __init__(
        self,
        run_dir: Path,
        split: TuningSplit,
        metric: str,
        score_at: list[int],
        every: float = REPORT_EVERY_S,
    ):
        self.run_dir, self.split, self.metric = run_dir, split, metric
        self.score_at, self.every = set(score_at), every
        self.scores: dict | None = None
        self.stale = True
        self.reported_at = -math.inf

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        from ray import tune

        self.stale = self.stale or bool(record.get("best"))
        due = record["epoch"] in self.score_at
        if self.scores is None or (self.stale and due):
            self.scores = tuning_scores(self.run_dir, self.split)
            self.stale = False
        elif not due and time.monotonic() - self.reported_at < self.every:
            return
        tune.report(
            {
                OBJECTIVE: self.scores[self.metric],
                EPOCH: record["epoch"],
                "val_loss": record["val_loss"],
                **{f"tuning_{k}": v for k, v in self.scores.items()},
            }
        )
        self.reported_at = time.monotonic()


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: a training run of the base config with `params`, reporting per epoch.

    The run folder is named by the trial id, so a restarted trial continues its run.
    """
    from ray import tune

    from vtadl.runs import fit

    config = trial_config(Config.from_dict(setup["config"]), params)
    run_dir = Path(setup["experiment"]) / "trials" / tune.get_context().get_trial_id()
    split = TuningSplit.load(Path(setup["experiment"]) / SPLIT_FILE)
    reporter = _Reporter(run_dir, split, setup["metric"], setup["score_at"])
    fit(config, run_dir=run_dir, callbacks=reporter)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def check_ray_address(address: str) -> None:
    """A host:port that does not accept a connection is a ConfigError, before anything runs."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError):
        raise ConfigError(f"Ray address {address} does not answer (is the cluster up?)") from None


def start_local_ray(num_cpus: int, num_gpus: int = 0, **init: Any) -> None:
    """Start a private local Ray instance with its dashboard, whose workers find its state API.

    The dashboard must stay on: Ray Train's placement-group cleaner asks the state API whether
    a trial's Train controller is still alive, and without that answer the workers of trials
    that ASHA stopped keep their resources and the next trial hangs (Ray issue #54305). Where
    several Ray instances run on one machine, a worker would find the state API through
    /tmp/ray/ray_current_cluster, which may name another instance: every worker is told the
    address (RAY_API_SERVER_ADDRESS).
    """
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime_env = dict(init.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {
        **runtime_env.get("env_vars", {}),
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
    }
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_port=port,
        runtime_env=runtime_env,
        **init,
    )


def _start_ray(config: Config, settings: TuneSettings) -> bool:
    """Join `train.ray_address`, or start a local Ray big enough for the concurrent trials."""
    import ray

    if ray.is_initialized():
        return False
    t, address = config.train, config.train.ray_address
    quiet = {"logging_level": logging.WARNING, "log_to_driver": log.isEnabledFor(logging.INFO)}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            need = 0 if t.strategy == "single" else 1 + t.num_workers * t.cpus_per_worker
            cpus = max(os.cpu_count() or 1, math.ceil(settings.max_concurrent * need))
            gpus = math.ceil(settings.max_concurrent * t.num_workers * t.gpus_per_worker)
            start_local_ray(cpus, gpus, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot join Ray at {address or 'local'}: {exc}") from None
    return True


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
    setup = {
        "config": config.to_dict(),
        "experiment": str(experiment),
        "metric": settings.metric,
        "score_at": scoring_epochs(t.epochs, settings),
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
        param_space=search_space(settings),
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


def n_trials(settings: TuneSettings) -> int:
    """How many trials the search runs."""
    grid = math.prod(map(len, settings.space.values())) if settings.search == "grid" else 1
    return grid * settings.num_samples


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


def trial_rows(experiment: Path, settings: TuneSettings, epochs: int) -> list[dict[str, Any]]:
    """One row per trial: parameters, objective, epochs run, state."""
    from ray.tune import ExperimentAnalysis

    rows = []
    for trial in ExperimentAnalysis(str(experiment)).trials:
        last = trial.last_result or {}
        done = last.get(EPOCH, 0)
        if trial.status == "ERROR":
            state = "error"
        elif trial.status != "TERMINATED":
            state = trial.status.lower()
        else:
            state = "completed" if done >= epochs else "stopped early"
        rows.append(
            {
                "trial_id": trial.trial_id,
                **{name: trial.config.get(name) for name in settings.space},
                settings.metric: last.get(OBJECTIVE),
                "epochs": done,
                "state": state,
                "val_loss": last.get("val_loss"),
                **{f"tuning_{k}": last.get(f"tuning_{k}") for k in OBJECTIVES},
                # The trial's wall clock in its actor (Ray's time_total_s): set-up, epochs,
                # scoring on the tuning split.
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


def finish_best(base: Config, settings: TuneSettings, best: dict[str, Any]) -> tuple[Path, dict]:
    """Copy the best trial's run to a new run folder, train it to the end if ASHA stopped it,
    and evaluate it once on the test split."""
    from vtadl.evaluation import evaluate_run
    from vtadl.runs import train_and_evaluate

    config = trial_config(base, {k: best[k] for k in settings.space})
    run_dir = new_run_dir(config)
    # Ray Train's own storage (ddp, deepspeed) names absolute paths of the trial: not copied.
    shutil.copytree(best["run_dir"], run_dir, ignore=shutil.ignore_patterns("ray", "workers"))
    if best["epochs"] >= config.train.epochs:
        return run_dir, evaluate_run(run_dir)
    log.info("the best trial stopped after %d epochs; training it to the end", best["epochs"])
    return train_and_evaluate(config, run_dir=run_dir)


def latest_experiment(root: Path, name: str = "") -> Path:
    """The newest resumable experiment under `root`, or the one called `name`."""
    from ray.tune import Tuner

    pattern = f"{name or '*'}/{SETTINGS_FILE}"
    found = sorted(p.parent for p in root.glob(pattern) if Tuner.can_restore(p.parent))
    if not found:
        raise RunError(f"no Tune experiment to resume under {root}")
    return found[-1]


def _absolute(config: Config) -> Config:
    """Trials run in their own working folders: every path becomes absolute."""
    d, t = config.data, config.train
    out = Path(t.out).resolve()
    return config.override(
        train={
            "out": str(out),
            "deepspeed_config": str(Path(t.deepspeed_config).resolve())
            if t.deepspeed_config
            else "",
        },
        data={
            "root": str(Path(d.root).resolve()),
            "pack_cache": str(Path(d.pack_cache or out / "packs").resolve()),
            "pack": d.pack if d.pack in ("auto", "none") else str(Path(d.pack).resolve()),
        },
    )


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
    base = _absolute(searchable(validate(base_config), settings))
    check_ray_address(base.train.ray_address)
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
        split = tuning_split(base, settings.defects_per_kind)  # packs the category once
        experiment.mkdir(parents=True, exist_ok=True)
        split.save(experiment / SPLIT_FILE)
        (experiment / SETTINGS_FILE).write_text(
            json.dumps(
                {"settings": asdict(settings), "config": base.to_dict(), "split": split.describe()},
                indent=2,
            )
        )

    started = _start_ray(base, settings)
    try:
        trainable = _trainable(base, settings, experiment)
        with _quiet_tune():
            _tuner(base, settings, experiment, trainable, resume).fit()
        rows = trial_rows(experiment, settings, base.train.epochs)
        write_results(experiment / RESULTS_FILE, rows)
        if len(rows) < n_trials(settings) or any(r["state"] not in FINISHED for r in rows):
            raise KeyboardInterrupt  # Tune caught Ctrl-C and saved the experiment
        best = best_trial(rows, settings.metric)
        run_dir, test_metrics = finish_best(base, settings, best)
    finally:
        if started:
            import ray

            ray.shutdown()
    summary = {
        "experiment": str(experiment),
        "metric": settings.metric,
        "objective_split": f"validation images with synthetic defects ({', '.join(KINDS)})",
        "trials": rows,
        "best": best,
        "best_run": str(run_dir),
        "test_metrics": test_metrics,
    }
    (experiment / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
