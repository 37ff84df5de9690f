"""How raw scores become anomaly maps: scaling, standardisation and shifted patch grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vtadl.inference.maps import standardised
from vtadl.scoring.calibration import Calibration, Part
from vtadl.scoring.grids import grid_offsets, nll_map


def test_part_standardises_validation_scores() -> None:
    rng = np.random.default_rng(0)
    raw = rng.gamma(2.0, 3.0, size=(6, 8, 8)) + 20.0
    for scale in ("log", "linear"):
        part = Part.fit(raw, scale, float(np.median(raw)), float(raw.std()))
        z = part.apply(raw, scale)
        assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-4


def test_log_scale_is_monotone_and_flat_below_the_floor() -> None:
    part = Part(floor=10.0, spread=2.0, mean=0.0, std=1.0)
    raw = np.array([0.0, 5.0, 10.0, 12.0, 20.0, 1000.0])
    out = part.apply(raw, "log")
    np.testing.assert_allclose(out[:3], 0.0)
    assert np.all(np.diff(out[2:]) > 0)
    np.testing.assert_allclose(out[3], np.log(2.0))  # one spread above the floor
    # The tail is compressed: 1000 is 495 spreads above the floor, log1p(495) = 6.2.
    assert out[-1] < 7
    np.testing.assert_allclose(part.apply(raw, "linear"), raw)


def test_log_scale_keeps_an_extreme_patch_from_swamping_its_neighbours() -> None:
    # One patch 100x the normal spread next to a mildly abnormal one: after upsampling and
    # smoothing on the linear scale the extreme patch's halo outscores the mild patch; on
    # the log scale the mild patch stays above the halo.
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    val = rng.normal(10.0, 1.0, size=(4, 1, 8, 8))
    test = rng.normal(10.0, 1.0, size=(1, 1, 8, 8))
    test[0, 0, 2, 2] = 110.0
    test[0, 0, 2, 5] = 16.0
    halo = (20, 28)  # a pixel one patch below the extreme one (patch 8 px)
    mild = (20, 44)
    out = {}
    for scale in ("linear", "log"):
        cal = Calibration.fit(val, np.ones((4, 64, 64)), scale)
        amap = gaussian_filter(standardised(test, np.ones((1, 64, 64)), cal, "nll")[0], 4)
        out[scale] = amap[halo], amap[mild]
    assert out["linear"][0] > out["linear"][1]
    assert out["log"][0] < out["log"][1]


def test_calibration_round_trips_through_a_dict() -> None:
    rng = np.random.default_rng(2)
    cal = Calibration.fit(rng.normal(size=(3, 1, 4, 4)), rng.random((3, 32, 32)), "log")
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_grid_offsets() -> None:
    assert grid_offsets(8, 1) == [(0, 0)]
    assert grid_offsets(8, 2) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert len(grid_offsets(16, 3)) == 9 and grid_offsets(16, 3)[1] == (0, 5)


def _patch_means(image: torch.Tensor, p: int, dy: int, dx: int) -> np.ndarray:
    """What a model that scores each patch by its mean would give for the shifted image."""
    h, w = image.shape[-2:]
    moved = F.pad(image[None, None], (dx, 0, dy, 0), mode="reflect")[..., :h, :w]
    return F.avg_pool2d(moved, p)[0, 0].numpy()


@pytest.mark.parametrize("shifts", [1, 2, 4])
def test_shifted_grids_are_put_back_in_place(shifts: int) -> None:
    # A bright 8x8 square at rows 16-23, columns 8-15 of a 32x32 image, patch 8: whatever
    # the grid offsets, the assembled map peaks on the square.
    image = torch.zeros(32, 32)
    image[16:24, 8:16] = 1.0
    grids = np.stack([_patch_means(image, 8, dy, dx) for dy, dx in grid_offsets(8, shifts)])
    amap = nll_map(grids[None], (32, 32))[0]
    ys, xs = np.nonzero(amap >= amap.max() - 1e-6)
    assert 14 <= ys.mean() <= 22 and 6 <= xs.mean() <= 14
    rows = amap.sum(1)
    assert abs(float((rows * np.arange(32)).sum() / rows.sum()) - 19.5) < 2.0
    if shifts == 1:
        up = F.interpolate(torch.from_numpy(grids[None]), size=(32, 32), mode="bilinear")
        np.testing.assert_allclose(amap, up[0, 0].numpy(), rtol=1e-6)


def test_grid_shifts_must_divide_the_patch() -> None:
    from vtadl.config import default_config
    from vtadl.exceptions import ConfigError

    config = default_config("vtadl_tiny")  # 8-pixel patches
    assert config.override(eval={"grid_shifts": 4}).eval.grid_shifts == 4
    with pytest.raises(ConfigError, match="grid_shifts must divide the patch size 8"):
        config.override(eval={"grid_shifts": 3})


def test_the_default_image_score_adds_whole_image_evidence_for_digits_only() -> None:
    from vtadl.config import default_config, resolved_image_score
    from vtadl.exceptions import ConfigError

    config = default_config("vtadl_small")
    assert config.eval.image_score == "auto" and config.eval.peak_patches == 10
    assert resolved_image_score(config) == "peak"
    digits = "peak+recon+neighbour"
    for dataset, resolved in (("mnist", digits), ("btad", "peak"), ("folder", "peak")):
        assert resolved_image_score(config.override(data={"dataset": dataset})) == resolved
    # The neighbour term needs the kernel by position (the digits' default); without one,
    # the reconstruction error is what the digits' score adds.
    for change, resolved in (
        ({"eval": {"kernel_scope": "image"}}, "peak+recon"),
        ({"train": {"mixture_fit": "em"}}, "peak+recon"),
        ({"eval": {"image_score": "peak"}}, "peak"),
        ({"eval": {"neighbour_weight": 0}}, "peak+recon"),
    ):
        chosen = config.override(data={"dataset": "mnist"}, **change)
        assert resolved_image_score(chosen) == resolved
    with pytest.raises(ConfigError, match="recon_weight must not be negative"):
        config.override(eval={"recon_weight": -1})
    with pytest.raises(ConfigError, match="neighbour_weight must not be negative"):
        config.override(eval={"neighbour_weight": -0.5})
    with pytest.raises(ConfigError, match="needs a kernel by position"):
        config.override(eval={"image_score": digits})  # photographs: a kernel by image
    chosen = config.override(eval={"image_score": digits, "kernel_scope": "position"})
    assert resolved_image_score(chosen) == digits
    # A run stored before the neighbour term keeps the score it was made with.
    from vtadl.config import Config, upgrade_stored

    stored = config.override(data={"dataset": "mnist"}).to_dict()
    del stored["eval"]["neighbour_weight"]
    old = Config.from_dict(upgrade_stored(stored))
    assert old.eval.neighbour_weight == 0 and resolved_image_score(old) == "peak+recon"


@pytest.mark.parametrize(
    ("small", "size"), [((16, 16), (128, 128)), ((7, 9), (100, 33)), ((50, 40), (20, 30))]
)
def test_the_numpy_resize_is_torch_s_bilinear(small, size) -> None:
    import torch
    import torch.nn.functional as F

    from vtadl.inference.maps import resize_bilinear

    a = np.random.default_rng(0).normal(size=(2, *small)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(a)[:, None], size=size, mode="bilinear")[:, 0]
    assert np.abs(resize_bilinear(a, size) - want.numpy()).max() < 2e-5


@pytest.mark.parametrize(("sigma", "shape"), [(4.0, (128, 96)), (1.5, (33, 20)), (8.0, (10, 12))])
def test_the_numpy_smoothing_is_scipy_s_gaussian_filter(sigma, shape) -> None:
    from scipy.ndimage import gaussian_filter

    from vtadl.inference.maps import smooth

    a = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    assert np.abs(smooth(a, sigma) - gaussian_filter(a, sigma)).max() < 1e-6


def test_shifted_grids_run_the_encoder_alone_under_a_fitted_mixture() -> None:
    """The reconstruction error is read on the unshifted grid only: under a mixture fitted
    after training the decoder runs once per batch, not once per grid, and the scores are
    those of whole forward passes; under the trained head every grid runs the whole model."""
    from vtadl.config import default_config
    from vtadl.data.prepare import to_float
    from vtadl.model import build_model
    from vtadl.scoring.grids import shift_images
    from vtadl.scoring.mixtures import KernelDensity
    from vtadl.scoring.raw import batch_scores, patch_nll_each

    config = default_config("vtadl_tiny").override(eval={"grid_shifts": 2})
    m = config.model
    torch.manual_seed(0)
    model = build_model(m, 4).eval()
    kernel = KernelDensity(torch.randn(16, m.embed_dim), torch.zeros(m.embed_dim))
    images = torch.randint(0, 256, (3, m.img_size, m.img_size, 3), dtype=torch.uint8)
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    (nlls,), rec, _ = batch_scores(model, images, config, [(kernel, None)])
    assert len(calls) == 1 and nlls.shape[1] == 4 and rec.shape == (3, m.img_size, m.img_size)
    x = to_float(images).permute(0, 3, 1, 2)
    for k, (dy, dx) in enumerate(grid_offsets(m.patch_size, 2)):
        (whole,), r, _ = patch_nll_each(model, shift_images(x, dy, dx), config, k, [kernel])
        torch.testing.assert_close(nlls[:, k], whole)
        if not (dy or dx):
            torch.testing.assert_close(rec, r)
    calls.clear()
    batch_scores(model, images, config, [(None, None)])
    assert len(calls) == 4
