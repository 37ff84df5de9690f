"""Ray Tune searches over a run's settings (number of Gaussians, noise level, learning rate).

`vtadl.tune.driver.tune(base_config, options)` runs one Tune experiment for one category:

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

Modules, each importing only those above it: `settings` (the options, the search space, file
names), `trial` (one trial: its config, the tuning split and its scores, reporting to Tune),
`driver` (`tune()`: the Tuner, the trials' results, the best run).
"""
