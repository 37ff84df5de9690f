"""Turning a trained run's images into anomaly maps and image scores.

`mixtures` holds the mixture fitted after training (EM, a kernel, a kernel by position) as
an object that scores tokens, `mixture_fit` fits it to a checkpoint's training tokens (its
kernel centres chosen by `coreset`), `neighbours` finds an image's nearest training image,
`grids` shifts the patch grid, `raw` computes the raw scores of a batch, `maps` turns them
into maps and image scores, `calibration` holds what the validation images say is normal,
and `scorer` ties them to a run folder. Nothing here reads the test split:
`vtadl.evaluation` does.
"""
