"""One trial of a search: its config, the tuning split and its scores, reporting to Tune.

A trial is a training run of the base config with the trial's parameters (`run_trial`, Tune's
function trainable). It scores its best checkpoint on the tuning split at the epochs where the
scheduler decides (`scoring_epochs`) and reports the objective to Tune (`_Reporter`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from vtadl import metrics
from vtadl.checkpoints import BEST
from vtadl.config import Config, load_stored_config
from vtadl.data.synthetic import TuningSplit, make_tuning_split
from vtadl.training import Callbacks
from vtadl.tune.settings import EPOCH, OBJECTIVE, PARAMS, SPLIT_FILE, TuneSettings, grace_period

log = logging.getLogger(__name__)

# Between scoring epochs a trial reports to Tune at most this often (see _Reporter).
REPORT_EVERY_S = 10.0


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters."""
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
    from vtadl.scoring.scorer import Scorer

    # An explicit override makes the Scorer calibrate afresh without writing calibration.json
    # (which belongs to the run's final evaluation).
    config = load_stored_config(Path(run_dir) / "config.yaml")
    scorer = Scorer(run_dir, checkpoint=checkpoint, eval_overrides={"score": config.eval.score})
    raws = scorer.raw(split.images).split(range(1, len(split.images)))
    shape = split.images.shape[1:3]
    maps, scores = zip(*(scorer.scored(raw, None, shape) for raw in raws))
    return metrics.headline(scores, split.labels, list(maps), list(split.masks))


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
    """Tune's folder of a trial (its TensorBoard files) in the experiment."""
    return f"trial_{trial.trial_id}"
