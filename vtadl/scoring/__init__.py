"""Turning a trained run's images into anomaly maps and image scores.

`mixture_fit` fits the token mixture after training (EM or a kernel), `kernel` scores a kernel
mixture fast, `neighbours` finds an image's nearest training image, `grids` shifts the patch
grid, `raw` computes the raw scores of a batch, `maps` turns them into maps and image scores,
`calibration` holds what the validation images say is normal, and `scorer` ties them to a
run folder. Nothing here reads the test split: `vtadl.evaluation` does.
"""
