"""One trial of a search: its config, the tuning split and its scores, reporting to Tune.

A trial is a training run of the base config with the trial's parameters (`run_trial`, Tune's
function trainable). It scores its best checkpoint on the tuning split at the epochs where the
scheduler decides (`scoring_epochs`) and reports the objective to Tune (`_Reporter`).

A trial trains one distinct network. When the number of Gaussians does not change training
(a mixture fitted after training, em or kernel, with mdn_detach: `fitted_after_training`),
the values of K searched are not trials of their own, which would train the same network
once per K: each trial fits every K to its checkpoint and scores each, and reports the best
to the scheduler; the results have a row per K (`vtadl.tune.driver.trial_rows`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vtadl import metrics
from vtadl.checkpoints import BEST
from vtadl.config import Config, load_stored_config
from vtadl.data.synthetic import TuningSplit, make_tuning_split
from vtadl.training import Callbacks, trains_without_mixture
from vtadl.tune.settings import (
    EPOCH,
    OBJECTIVE,
    OBJECTIVES,
    PARAMS,
    SPLIT_FILE,
    TuneSettings,
    default_space,
    grace_period,
)

log = logging.getLogger(__name__)

# Between scoring epochs a trial reports to Tune at most this often (see _Reporter).
REPORT_EVERY_S = 10.0


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters."""
    sections: dict[str, dict] = {}
    for name, value in params.items():
        sections.setdefault(PARAMS[name][0], {})[name] = value
    return base.override(**sections)


def settings_for(config: Config, settings: TuneSettings) -> TuneSettings:
    """The settings with the default space where none is given (K under the config's own
    fit, and the noise), every searched value checked against the config (K "all" is for a
    kernel, ...): a ConfigError names the first that does not fit."""
    if not settings.space:
        settings = replace(settings, space=default_space(config.train.mixture_fit))
    for name, values in settings.space.items():
        for value in values:
            trial_config(config, {name: value})
    return settings


def fitted_after_training(config: Config, settings: TuneSettings) -> tuple[str, ...]:
    """The searched parameters that do not change training, fitted by each trial to its own
    checkpoint instead of training a trial each: K, for a mixture fitted after training
    (em, kernel) that the encoder does not learn from (mdn_detach)."""
    if "n_gaussians" in settings.space and trains_without_mixture(config):
        return ("n_gaussians",)
    return ()


def k_key(k: int | str, name: str) -> str:
    """The key of one K's score in a trial's report to Tune, e.g. k150_au_pro, kall_au_pro."""
    return f"k{k}_{name}"


def tuning_split(config: Config, per_kind: int) -> TuningSplit:
    """Model inputs of the validation split (every tile, when tiling) with synthetic defects."""
    from vtadl.data.source import category_source

    src = category_source(config)
    n = len(src.items("val"))
    inputs = np.concatenate([src.model_input("val", i)[0] for i in range(n)])
    return make_tuning_split(inputs, per_kind=per_kind, seed=config.train.seed)


def tuning_scores(
    run_dir: str | Path,
    split: TuningSplit,
    ks: list[int | str] | None = None,
    checkpoint: str = BEST,
) -> list[dict]:
    """Image AUROC, pixel AUROC and AU-PRO of a run's checkpoint on the tuning split: one
    dict for the run as it is, or one for each K of `ks`, its mixture refitted with that K
    (the training tokens, the validation and the tuning images encoded once for all K).

    The run's own score and calibration (from its validation images) are used, as in
    `evaluate_run`; nothing is written to the run folder but the mixtures' caches.
    """
    from vtadl.scoring.scorer import Scorer, raw_each, scorers_for_ks

    # An explicit override makes the Scorer calibrate afresh without writing calibration.json
    # (which belongs to the run's final evaluation).
    config = load_stored_config(Path(run_dir) / "config.yaml")
    keep = {"score": config.eval.score}
    scorers = (
        scorers_for_ks(run_dir, checkpoint, keep, ks) if ks else [Scorer(run_dir, checkpoint, keep)]
    )
    images = list(split.images[:, None])
    return [
        _split_scores(scorer, raws, split)
        for scorer, raws in zip(scorers, raw_each(scorers, images))
    ]


def _split_scores(scorer, raws, split: TuningSplit) -> dict:
    shape = split.images.shape[1:3]
    maps, scores = zip(*(scorer.scored(raw, None, shape) for raw in raws))
    return metrics.headline(scores, split.labels, list(maps), list(split.masks))


def deciding_epochs(epochs: int, settings: TuneSettings) -> list[int]:
    """Epochs at whose report the scheduler decides on a trial: the last, and under ASHA its
    rungs (grace * factor^k). FIFO decides on the last report only."""
    marks = {epochs}
    if settings.scheduler == "asha":
        rung = grace_period(settings, epochs)
        while rung < epochs:
            marks.add(rung)
            rung *= settings.reduction_factor
    return sorted(marks)


def scoring_epochs(epochs: int, settings: TuneSettings) -> list[int]:
    """Epochs at which a trial scores its best checkpoint on the tuning split: where the
    scheduler decides, and the first (Tune wants the objective in every report); scoring in
    between would only cost time."""
    return sorted({1, *deciding_epochs(epochs, settings)})


def cheapest(ks: list[int | str]) -> int | str:
    """The K of `ks` that costs least to fit and score: the fewest Gaussians."""
    return min(ks, key=lambda k: math.inf if k == "all" else k)


class _Reporter(Callbacks):
    """Scores the best checkpoint on the tuning split at the scoring epochs (if it changed)
    and reports to Tune then, and in between at most every `every` seconds, with the
    objective of the last scoring. With `ks`, every K is scored, each K's scores are
    reported under `k_key`, and the objective is the best K's; at a scoring epoch where the
    scheduler decides nothing (`decide_at`: the first epoch, which is scored only because
    Tune wants the objective in every report) only the cheapest K is fitted and scored, and
    all of them at the next deciding epoch.

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
        ks: list[int | str] | None = None,
        every: float = REPORT_EVERY_S,
        decide_at: list[int] | None = None,
    ):
        self.run_dir, self.split, self.metric, self.ks = run_dir, split, metric, ks
        self.score_at, self.every = set(score_at), every
        self.decide_at = set(score_at if decide_at is None else decide_at)
        self.result: dict | None = None
        self.stale = True
        self.partial = False  # whether the result holds the cheapest K only
        self.reported_at = -math.inf

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        from ray import tune

        self.stale = self.stale or bool(record.get("best"))
        due = record["epoch"] in self.score_at
        deciding = record["epoch"] in self.decide_at
        if self.result is None or (due and (self.stale or (deciding and self.partial))):
            self.partial = bool(self.ks) and len(self.ks) > 1 and not deciding
            self.result = self._scored([cheapest(self.ks)] if self.partial else self.ks)
            self.stale = False
        elif not due and time.monotonic() - self.reported_at < self.every:
            return
        tune.report({EPOCH: record["epoch"], "val_loss": record["val_loss"], **self.result})
        self.reported_at = time.monotonic()

    def _scored(self, ks: list[int | str] | None) -> dict[str, Any]:
        """The objective and the tuning scores to report (each K's, with `ks`)."""
        found = tuning_scores(self.run_dir, self.split, ks)
        if not ks:
            return {
                OBJECTIVE: found[0][self.metric],
                **{f"tuning_{k}": v for k, v in found[0].items()},
            }
        by_k = {k_key(k, name): s[name] for k, s in zip(ks, found) for name in OBJECTIVES}
        return {OBJECTIVE: max(s[self.metric] for s in found), **by_k}


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: a training run of the base config with `params`, reporting per epoch
    (and fitting each of `setup["ks"]`, when K is fitted after training).

    The run folder is named by the trial id, so a restarted trial continues its run.
    """
    from ray import tune

    from vtadl.runs import fit

    config = trial_config(Config.from_dict(setup["config"]), params)
    run_dir = Path(setup["experiment"]) / "trials" / tune.get_context().get_trial_id()
    split = TuningSplit.load(Path(setup["experiment"]) / SPLIT_FILE)
    reporter = _Reporter(
        run_dir,
        split,
        setup["metric"],
        setup["score_at"],
        setup.get("ks"),
        decide_at=setup.get("decide_at"),
    )
    fit(config, run_dir=run_dir, callbacks=reporter)


def trial_dirname(trial) -> str:
    """Tune's folder of a trial (its TensorBoard files) in the experiment."""
    return f"trial_{trial.trial_id}"
