"""The mixture fitted after training: as a kernel density over every training token
(`train.mixture_fit: kernel`, the default) or by EM (`em`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

import vtadl.losses
from vtadl.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from vtadl.config import Config, default_config, kernel_scope, upgrade_stored
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import ConfigError
from vtadl.losses import mixture_nll, reference_nll
from vtadl.model import Mixture, create_model
from vtadl.scoring.kernel import Kernel
from vtadl.scoring.mixture_fit import apply_mixture, fit_mixture, kernel_mixture, training_tokens
from vtadl.scoring.scorer import Scorer
from vtadl.training import fit, loss_terms


@pytest.mark.parametrize("positions", [1, 5], ids=["global", "per-position"])
def test_a_shared_mixture_takes_the_product_form_and_matches_the_elementwise_one(positions):
    # One mixture for every token, or one per position that the batch shares; means far
    # from zero, as a kernel's are.
    gen = torch.Generator().manual_seed(positions)
    x = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) + 10
    mu = torch.randn(1, positions, 3, 7, generator=gen, dtype=torch.float64) + 10
    log_var = torch.randn(1, positions, 3, 7, generator=gen, dtype=torch.float64)
    logits = torch.randn(1, positions, 3, generator=gen, dtype=torch.float64)
    log_pi = torch.log_softmax(logits, -1)
    shared = mixture_nll(x, Mixture(log_pi, mu, log_var))
    each = mixture_nll(
        x, Mixture(log_pi.expand(2, 5, 3), mu.expand(2, 5, 3, 7), log_var.expand(2, 5, 3, 7))
    )
    torch.testing.assert_close(shared, each)


@pytest.mark.parametrize("positions", [1, 5], ids=["global", "per-position"])
@pytest.mark.parametrize("loss", [mixture_nll, reference_nll])
def test_a_kernel_is_scored_in_slices_as_if_whole(positions, loss, monkeypatch) -> None:
    # Many components with one variance (a kernel), scored without a gradient a few
    # components at a time (the log-sum kept running), against the elementwise form of the
    # whole mixture in float64. Most components are hundreds of nats away from each token,
    # as a kernel's are: their terms are far below the log-sum's floor.
    monkeypatch.setattr(vtadl.losses, "CHUNK_PAIRS", 2 * 5 * 7)  # 7 components a slice
    gen = torch.Generator().manual_seed(positions)
    x = torch.randn(2, 5, 6, generator=gen) + 10
    mu = torch.randn(1, positions, 40, 6, generator=gen) * 8 + 10
    near = [1, 12, 30]  # components near tokens of the first image, in three slices
    if positions == 1:
        mu[0, 0, near] = x[0, :3] + 0.1
    else:
        mu[0][:, near] = x[0, :, None] + 0.1
    log_var = torch.full((1, positions, 40, 6), -1.0)
    log_pi = torch.full((1, positions, 40), -math.log(40))
    with torch.no_grad():
        sliced = loss(x, Mixture(log_pi, mu, log_var))
    whole = loss(
        x.double(),
        Mixture(*(t.double().expand(2, 5, *t.shape[2:]) for t in (log_pi, mu, log_var))),
    )
    assert sliced.shape == (2, 5)
    torch.testing.assert_close(sliced.double(), whole, rtol=1e-5, atol=1e-4)


def test_a_prepared_kernel_scores_the_mixture_nll(monkeypatch) -> None:
    # The scoring path of a kernel (whitened once, per-component constants after the
    # log-sum) against the elementwise form of the whole mixture in float64: tokens near
    # a component, in several slices, and tokens far from all of them.
    monkeypatch.setattr(vtadl.losses, "CHUNK_PAIRS", 2 * 5 * 7)  # 7 components a slice
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=gen) * 3 + 10
    mu = torch.randn(1, 1, 40, 6, generator=gen) * 3 + 10
    mu[0, 0, [1, 12, 30]] = x[0, :3] + 0.1
    log_var = torch.log(torch.rand(6, generator=gen) + 0.05).expand(1, 1, 40, 6)
    log_pi = torch.full((1, 1, 40), -math.log(40))
    mixture = Mixture(log_pi, mu, log_var)
    assert Kernel.fits(mixture)
    got = Kernel(mixture).nll(x)
    whole = mixture_nll(
        x.double(),
        Mixture(*(t.double().expand(2, 5, *t.shape[2:]) for t in (log_pi, mu, log_var))),
    )
    assert got.shape == (2, 5)
    torch.testing.assert_close(got.double(), whole, rtol=1e-5, atol=1e-4)
    # Unequal weights or variances (an EM fit) are not a kernel; nor one mixture per position.
    assert not Kernel.fits(Mixture(torch.log_softmax(torch.randn(1, 1, 40), -1), mu, log_var))
    assert not Kernel.fits(Mixture(log_pi, mu, log_var + torch.rand(1, 1, 40, 1)))
    # Log variances beyond the bounds are clamped as mixture_nll clamps them.
    wild = Mixture(log_pi, mu, torch.tensor([-12.0, 11.0, 0.5, -9.5, 9.5, 1.0]).expand(1, 1, 40, 6))
    torch.testing.assert_close(
        Kernel(wild).nll(x).double(),
        mixture_nll(
            x.double(),
            wild._replace(mu=mu.double(), log_var=wild.log_var.double(), log_pi=log_pi.double()),
        ),
        rtol=1e-3,
        atol=1e-3,
    )
    per_position = Mixture(
        log_pi.expand(1, 5, 40), mu.expand(1, 5, 40, 6), log_var.expand(1, 5, 40, 6)
    )
    assert not Kernel.fits(per_position)


def test_a_kernel_run_is_scored_by_the_prepared_kernel_as_by_the_mixture(em_run: Path) -> None:
    from vtadl.scoring.raw import raw_scores

    scorer = Scorer(em_run, mixture_fit="kernel")
    assert isinstance(scorer.kernel, Kernel)
    assert Scorer(em_run).kernel is None  # its EM fit is scored as a mixture
    src = scorer.source
    images = np.concatenate([src.model_input("test", i)[0] for i in range(3)])
    nll, rec, _ = raw_scores(scorer.model, images, scorer.config, scorer.device)
    fast_nll, fast_rec, _ = raw_scores(
        scorer.model, images, scorer.config, scorer.device, kernel=scorer.kernel
    )
    np.testing.assert_allclose(fast_nll, nll, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(fast_rec, rec)


def test_the_log_sum_is_exact_with_terms_far_below_its_largest() -> None:
    # Terms hundreds of nats apart (whose exp() alone would be subnormal or zero) and a row
    # of -inf: as torch.logsumexp, to float32 precision.
    a = torch.tensor([[0.0, -90.0, -500.0, -1e4], [-300.0, -300.5, -1e9, -1e9]])
    a = torch.cat([a, torch.full((1, 4), -math.inf)])
    got = vtadl.losses.floored_logsumexp(a)
    torch.testing.assert_close(got[:2], torch.logsumexp(a[:2].double(), -1).float())
    assert got[2] == -math.inf


def test_the_head_carries_the_em_fit_exactly() -> None:
    # Tokens from two well separated Gaussians: EM finds them, and the head, given the fit,
    # scores every token with the fitted mixture's own log likelihood.
    rng = np.random.default_rng(0)
    d = 32  # vtadl_tiny's token width
    tokens = np.concatenate([rng.normal(-2, 0.5, (300, d)), rng.normal(3, 1.0, (100, d))]).astype(
        np.float32
    )
    params = fit_mixture(tokens, 2, seed=0)
    assert sorted(np.exp(params["log_pi"]).round(2)) == [0.25, 0.75]
    model = create_model("vtadl_tiny", n_gaussians=2, mdn_condition="global").eval()
    apply_mixture(model, params)
    x = torch.from_numpy(tokens)[None]
    with torch.no_grad():
        nll = mixture_nll(x, model.mdn(x))[0].numpy()
    reference = GaussianMixture(2, covariance_type="diag", reg_covar=1e-4, random_state=0)
    expected = -reference.fit(tokens).score_samples(tokens)
    np.testing.assert_allclose(nll, expected, rtol=1e-4, atol=1e-3)
    # An image's own tokens do not change the head's mixture.
    other = model.mdn(torch.randn(1, 4, d))
    torch.testing.assert_close(other.mu[0, 0], torch.from_numpy(params["mu"]))
    # The global head is the mixture's numbers, not maps from a context to them.
    assert sum(p.numel() for p in model.mdn.parameters()) == 2 * (2 * d + 1)


@pytest.fixture(scope="module")
def em_run(demo_root: Path, tmp_path_factory) -> Path:
    config = default_config("vtadl_tiny").override(
        data={"root": str(demo_root), "category": "brick"},
        train={
            "epochs": 2,
            "batch_size": 4,
            "out": str(tmp_path_factory.mktemp("em")),
            "mixture_fit": "em",
        },
        eval={"grid_shifts": 1},
    )
    assert config.model.mdn_detach and config.model.mdn_condition == "global"  # the defaults
    return fit(config)


def test_the_default_is_a_kernel_mixture_on_the_interleaved_grids() -> None:
    for variant in ("vtadl_paper", "vtadl_small", "vtadl_tiny"):
        config = default_config(variant)
        assert config.train.mixture_fit == "kernel" and config.eval.grid_shifts == 4
        assert config.model.mdn_detach and config.model.mdn_condition == "global"


def test_training_leaves_the_mixture_to_em(em_run: Path) -> None:
    history = [json.loads(line) for line in (em_run / "history.jsonl").read_text().splitlines()]
    assert all(h["nll"] == 0 for h in history)  # not in the loss
    config, model, _ = model_from_checkpoint(em_run / "checkpoints" / "best.pt")
    model.train()
    loss_terms(model, torch.rand(2, 3, 32, 32), config).total.backward()
    assert all(p.grad is None for p in model.mdn.parameters())  # the head is not trained
    assert any(p.grad is not None and p.grad.any() for p in model.encoder.parameters())
    sgd = config.override(train={"mixture_fit": "sgd"})
    model.zero_grad(set_to_none=True)
    loss_terms(model, torch.rand(2, 3, 32, 32), sgd).total.backward()
    assert model.mdn.means.grad is not None and model.mdn.means.grad.any()


def test_evaluation_fits_once_per_checkpoint_and_scores_with_the_fit(em_run: Path) -> None:
    result = evaluate_run(em_run)
    cache = em_run / "mixture_best.npz"
    assert cache.is_file()
    assert 0 <= result["pixel_auroc"] <= 1 and result["score"] == "nll"
    stamp = cache.stat().st_mtime_ns
    scorer = Scorer(em_run)
    assert cache.stat().st_mtime_ns == stamp  # reused, not fitted again
    with np.load(cache) as fitted:
        torch.testing.assert_close(
            scorer.model.mdn.means[: len(fitted["mu"])].cpu(),
            torch.from_numpy(fitted["mu"]),
        )
        assert int(fitted["epoch"]) == scorer.state["epoch"]
    # Another checkpoint epoch (a resumed run) is fitted afresh.
    best = em_run / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    save_checkpoint(best, **{**state, "epoch": state["epoch"] + 5})
    Scorer(em_run)
    with np.load(cache) as fitted:
        assert int(fitted["epoch"]) == state["epoch"] + 5
    save_checkpoint(best, **state)


def test_em_needs_a_global_mixture_and_its_likelihood() -> None:
    config = default_config("vtadl_tiny")
    with pytest.raises(ConfigError, match="mixture_fit kernel needs mdn_condition global"):
        config.override(model={"mdn_condition": "token"})
    with pytest.raises(ConfigError, match="mixture_fit em needs mdn_condition global"):
        config.override(model={"mdn_condition": "token"}, train={"mixture_fit": "em"})
    with pytest.raises(ConfigError, match="needs mixture_fit sgd"):
        config.override(train={"mdn_loss": "reference"})
    sgd = config.override(model={"mdn_condition": "token"}, train={"mixture_fit": "sgd"})
    assert sgd.train.mixture_fit == "sgd"


def test_runs_of_earlier_versions_keep_their_sgd_mixture() -> None:
    raw = default_config("vtadl_tiny").to_dict()
    raw["model"].update(mdn_condition="token", mdn_detach=False)
    del raw["train"]["mixture_fit"]
    del raw["eval"]["grid_shifts"], raw["eval"]["kernel_scope"], raw["eval"]["peak_patches"]
    config = Config.from_dict(upgrade_stored(raw))
    assert config.train.mixture_fit == "sgd" and config.model.mdn_condition == "token"
    assert config.eval.grid_shifts == 1  # scored on one grid, as then
    assert config.eval.kernel_scope == "image"  # a kernel then took every training token
    assert config.eval.peak_patches == 1  # the peak was the single highest patch score


def test_a_kernel_mixture_keeps_every_token_and_scores_like_a_nearest_neighbour() -> None:
    # Two clusters, one of them rare: a kernel mixture has a Gaussian on every token, so a
    # token of the rare cluster scores as low as one of the common cluster, while a token
    # far from both scores high; the head grows to hold it.
    rng = np.random.default_rng(1)
    d = 32
    common = rng.normal(0, 1, (400, d))
    rare = rng.normal(0, 1, (4, d)) + 6
    tokens = np.concatenate([common, rare]).astype(np.float32)
    params = kernel_mixture(tokens, bandwidth=0.3)
    assert np.allclose(np.exp(params["log_pi"]), 1 / len(tokens))
    np.testing.assert_array_equal(params["mu"], tokens)
    var = (0.3 * tokens.std(0)) ** 2 + 1e-4
    np.testing.assert_allclose(np.exp(params["log_var"][7]), var, rtol=1e-5)
    model = create_model("vtadl_tiny", n_gaussians=4, mdn_condition="global").eval()
    apply_mixture(model, params)
    assert model.mdn.means.shape == (len(tokens), d)
    # The one variance is held once, viewed for every component, not copied 404 times.
    assert model.mdn.log_vars.shape == (len(tokens), d)
    assert model.mdn.log_vars.untyped_storage().nbytes() == d * 4
    np.testing.assert_allclose(model.mdn.log_vars[-1].detach().numpy(), np.log(var), rtol=1e-5)
    held = model.mdn.means
    seen = np.stack([common[5], rare[2]]) + rng.normal(0, 0.05, (2, d))
    unseen = rng.normal(0, 1, (1, d)) + 3  # between the clusters, near no token
    x = torch.from_numpy(np.concatenate([seen, unseen]).astype(np.float32))[None]
    with torch.no_grad():
        nll = mixture_nll(x, model.mdn(x))[0].numpy()
    assert abs(nll[0] - nll[1]) < 0.2 * (nll[2] - nll[0])  # rare but seen ~ common
    assert nll[2] > nll[0] and nll[2] > nll[1]
    # The same head can take an EM fit afterwards (the viewed variance is replaced).
    em = fit_mixture(tokens, 4, seed=0)
    apply_mixture(model, em)
    assert model.mdn.means is not held and model.mdn.n_gaussians == 4
    np.testing.assert_array_equal(model.mdn.log_vars.detach().numpy(), em["log_var"])


def test_the_mixture_is_fitted_at_the_grid_shifts_it_is_scored_at(
    em_run: Path, monkeypatch
) -> None:
    from vtadl.scoring import mixture_fit

    sizes = []
    fit_real = mixture_fit.fit_mixture

    def counting(tokens, k, seed):
        sizes.append(len(tokens))
        return fit_real(tokens, k, seed)

    monkeypatch.setattr(mixture_fit, "fit_mixture", counting)
    Scorer(em_run, eval_overrides={"grid_shifts": 2})
    assert (em_run / "mixture_best_shifts2.npz").is_file()
    (em_run / "mixture_best.npz").unlink(missing_ok=True)
    Scorer(em_run)
    assert sizes[0] == 4 * sizes[1]  # every training image at 2 x 2 offsets


def test_a_kernel_keeps_up_to_its_own_cap_of_tokens_and_em_fewer(em_run: Path, monkeypatch) -> None:
    from vtadl.scoring import mixture_fit

    scorer = Scorer(em_run)
    model, source, device = scorer.model, scorer.source, scorer.device
    every = training_tokens(model, source, device, 0, 2, most=10**9)
    n = len(every)
    assert n == 4 * 16 * len(source.items("train"))  # 2 x 2 grids of 4 x 4 tokens
    monkeypatch.setattr(mixture_fit, "MAX_TOKENS", n // 4)
    monkeypatch.setattr(mixture_fit, "MAX_KERNEL_TOKENS", n // 2)

    def kernel() -> np.ndarray:
        args = (model, em_run, "best.pt", 0, source, device, 0)
        return mixture_fit.fitted_mixture(*args, how="kernel", shifts=2)["mu"]

    assert len(kernel()) == n // 2
    assert len(training_tokens(model, source, device, 0, 2)) == n // 4  # what EM is fitted to
    monkeypatch.setattr(mixture_fit, "MAX_KERNEL_TOKENS", n)
    np.testing.assert_array_equal(kernel(), every)  # all of them, in order


def test_a_run_refits_its_mixture_as_a_kernel_and_records_it(em_run: Path) -> None:
    em = evaluate_run(em_run)
    calibration = (em_run / "calibration.json").read_text()
    kernel = evaluate_run(em_run, mixture_fit="kernel")
    assert kernel["mixture_fit"] == "kernel" and em["mixture_fit"] == "em"
    assert kernel["grid_shifts"] == em["grid_shifts"] == 1  # the run's own grid
    assert kernel["pixel_auroc"] != em["pixel_auroc"]
    # The run's own calibration stays the EM mixture's.
    assert (em_run / "calibration.json").read_text() == calibration
    assert json.loads((em_run / "metrics.json").read_text())["mixture_fit"] == "kernel"


def test_a_mixture_trained_with_the_network_cannot_be_refitted(tmp_path: Path) -> None:
    from vtadl.scoring.scorer import refit

    sgd = default_config("vtadl_tiny").override(train={"mixture_fit": "sgd"})
    with pytest.raises(ConfigError, match="fitted by sgd"):
        refit(sgd, "kernel")
    assert refit(default_config("vtadl_tiny"), "kernel").train.mixture_fit == "kernel"


def test_a_kernel_by_position_scores_each_token_against_its_own_position_only() -> None:
    # Six images, two shifted grids of four positions, position p's tokens around 3 * p: a
    # token is scored by the Gaussians of its own grid and position, so the same value is
    # normal where it was seen and anomalous where it was not.
    rng = np.random.default_rng(2)
    n, grids, cells, d = 6, 2, 4, 32
    centres = 3.0 * np.arange(grids * cells)[None, :, None]
    tokens = (centres + rng.normal(0, 1, (n, grids * cells, d))).astype(np.float32)
    params = kernel_mixture(tokens, bandwidth=0.3)
    assert params["mu"].shape == (grids * cells, n, d) and params["log_pi"].shape == (8, n)
    model = create_model("vtadl_tiny", n_gaussians=4, mdn_condition="global").eval()
    apply_mixture(model, params)
    x = torch.from_numpy(tokens[0, cells:] + rng.normal(0, 0.05, (cells, d)).astype(np.float32))
    x = x[None]  # grid 1's tokens of image 0, slightly moved
    with torch.no_grad():
        nll = mixture_nll(x, model.mdn(x, grid=1))[0].numpy().astype(np.float64)
    var = np.exp(params["log_var"][0, 0].astype(np.float64))
    for cell in range(cells):
        mu = tokens[:, cells + cell].astype(np.float64)  # (n, d): this grid and cell only
        log_n = -0.5 * (
            ((x[0, cell].numpy() - mu) ** 2 / var).sum(1) + np.log(2 * np.pi * var).sum()
        )
        expected = -(np.logaddexp.reduce(log_n) - np.log(n))
        np.testing.assert_allclose(nll[cell], expected, rtol=1e-4)
    # Grid 1's cell 2 value, shown at cell 0: normal there (it is grid 1's cell 2 of image 0,
    # nearly), anomalous here.
    moved = x.clone()
    moved[0, 0] = x[0, 2]
    with torch.no_grad():
        again = mixture_nll(moved, model.mdn(moved, grid=1))[0].numpy()
    assert again[0] > nll[0] + 100 and abs(again[2] - nll[2]) < 1e-3


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """One epoch on scikit-learn's 3s (MNIST files: 1000 training digits, 80 test)."""
    from sklearn.datasets import load_digits

    from vtadl.data.mnist import MNIST_FILES, write_idx

    tmp = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    parts = {"train": slice(0, 1000), "test": slice(1000, 1080)}
    for split, rows in parts.items():
        write_idx(tmp / MNIST_FILES[f"{split}_images"], images[rows])
        write_idx(tmp / MNIST_FILES[f"{split}_labels"], labels[rows])
    config = default_config("vtadl_tiny").override(
        data={"root": str(tmp), "dataset": "mnist"},
        train={"epochs": 1, "batch_size": 8, "out": str(tmp / "runs")},
    )
    return fit(config.override(data={"category": "3"}))


def test_digits_are_scored_by_position_by_default(digits_run: Path) -> None:
    own = evaluate_run(digits_run)
    assert own["kernel_scope"] == "position" and own["mixture_fit"] == "kernel"
    assert own["image_auroc"] > 0.5
    anywhere = evaluate_run(digits_run, eval_overrides={"kernel_scope": "image"})
    assert anywhere["kernel_scope"] == "image"
    assert anywhere["image_auroc"] != own["image_auroc"]
    config = Scorer(digits_run).config
    assert kernel_scope(config.override(train={"mixture_fit": "em"})) is None  # kernel only


def test_kernel_scope_is_checked() -> None:
    config = default_config("vtadl_tiny")
    assert config.eval.kernel_scope == "auto"
    with pytest.raises(ConfigError, match="kernel_scope must be one of"):
        config.override(eval={"kernel_scope": "pixel"})
    with pytest.raises(ConfigError, match="kernel_scope position needs mixture_fit kernel"):
        config.override(eval={"kernel_scope": "position"}, train={"mixture_fit": "em"})
