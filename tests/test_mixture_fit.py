"""The mixture fitted after training, an object beside the trained network: a kernel density
over K training tokens chosen by a coreset (`train.mixture_fit: kernel`, the default), or K
Gaussians fitted by EM (`em`); K honoured in every fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.mixture import GaussianMixture as GaussianMixture_

import vtadl.losses
import vtadl.scoring.mixtures
from vtadl.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from vtadl.config import Config, default_config, kernel_scope, upgrade_stored
from vtadl.evaluation import evaluate_run
from vtadl.exceptions import ConfigError
from vtadl.losses import mixture_nll, reference_nll
from vtadl.model import Mixture
from vtadl.scoring.mixture_fit import (
    fit_em,
    fit_kernel,
    fit_position_kernel,
    fitted_mixtures,
    training_tokens,
)
from vtadl.scoring.mixtures import GaussianMixture, KernelDensity, PositionKernel, load_mixture
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


def test_a_kernel_scores_the_mixture_nll(monkeypatch) -> None:
    # The scoring path of a kernel (whitened once, per-component constants after the
    # log-sum) against the elementwise form of the whole mixture in float64: tokens near
    # a component, in several slices, and tokens far from all of them.
    monkeypatch.setattr(vtadl.scoring.mixtures, "CHUNK_PAIRS", 2 * 5 * 7)  # 7 a slice
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=gen) * 3 + 10
    mu = torch.randn(40, 6, generator=gen) * 3 + 10
    mu[[1, 12, 30]] = x[0, :3] + 0.1
    log_var = torch.log(torch.rand(6, generator=gen) + 0.05)
    got = KernelDensity(mu, log_var).nll(x)
    whole = mixture_nll(x.double(), _whole(mu, log_var))
    assert got.shape == (2, 5)
    torch.testing.assert_close(got.double(), whole, rtol=1e-5, atol=1e-4)
    # Log variances beyond the bounds are clamped as mixture_nll clamps them.
    wild = torch.tensor([-12.0, 11.0, 0.5, -9.5, 9.5, 1.0])
    torch.testing.assert_close(
        KernelDensity(mu, wild).nll(x).double(),
        mixture_nll(x.double(), _whole(mu, wild)),
        rtol=1e-3,
        atol=1e-3,
    )


def _whole(mu: torch.Tensor, log_var: torch.Tensor) -> Mixture:
    """A kernel's Gaussians as a mixture of every token's own, in float64 (2 x 5 tokens)."""
    k, d = mu.shape
    return Mixture(
        torch.full((2, 5, k), -math.log(k), dtype=torch.float64),
        mu.double().expand(2, 5, k, d),
        log_var.double().expand(2, 5, k, d),
    )


def test_a_kernel_run_is_scored_by_its_kernel_as_by_the_same_gaussians(em_run: Path) -> None:
    from vtadl.scoring.raw import raw_scores

    scorer = Scorer(em_run, mixture_fit="kernel", n_gaussians=20)
    kernel = scorer.mixture
    assert isinstance(kernel, KernelDensity) and kernel.n_gaussians == 20
    assert isinstance(Scorer(em_run).mixture, GaussianMixture)  # its own EM fit
    same = GaussianMixture(
        torch.full((20,), -math.log(20)), kernel.centres, kernel.log_var.expand(20, -1)
    )
    src = scorer.source
    images = np.concatenate([src.model_input("test", i)[0] for i in range(3)])
    args = (scorer.model, images, scorer.config, scorer.device)
    nll, rec, _ = raw_scores(*args, mixture=same)
    fast_nll, fast_rec, _ = raw_scores(*args, mixture=kernel)
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


def test_the_em_fit_scores_its_own_likelihood() -> None:
    # Tokens from two well separated Gaussians: EM finds them, and the fitted mixture scores
    # every token with scikit-learn's own log likelihood of the fit.
    rng = np.random.default_rng(0)
    d = 32  # vtadl_tiny's token width
    tokens = np.concatenate([rng.normal(-2, 0.5, (300, d)), rng.normal(3, 1.0, (100, d))]).astype(
        np.float32
    )
    mixture = fit_em(tokens, 2, seed=0)
    assert mixture.n_gaussians == 2
    assert sorted(mixture.log_pi.exp().numpy().round(2)) == [0.25, 0.75]
    nll = mixture.nll(torch.from_numpy(tokens)[None])[0].numpy()
    reference = GaussianMixture_(2, covariance_type="diag", reg_covar=1e-4, random_state=0)
    expected = -reference.fit(tokens).score_samples(tokens)
    np.testing.assert_allclose(nll, expected, rtol=1e-4, atol=1e-3)
    # More Gaussians than tokens: one per token at most, and K records it.
    assert fit_em(tokens[:5], 8, seed=0).n_gaussians == 5


@pytest.mark.parametrize("kind", ["em", "kernel", "position"])
def test_a_mixture_saves_and_loads_unchanged(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tokens = rng.normal(size=(6, 8, 4)).astype(np.float32)
    mixture = {
        "em": lambda: fit_em(tokens.reshape(-1, 4), 3, seed=0),
        "kernel": lambda: fit_kernel(tokens.reshape(-1, 4), "all"),
        "position": lambda: fit_position_kernel(tokens, "all", grids=2),
    }[kind]()
    mixture.save(tmp_path / "m.npz", epoch=7)
    loaded, meta = load_mixture(tmp_path / "m.npz")
    assert type(loaded) is type(mixture) and meta == {"epoch": 7}
    x = torch.from_numpy(tokens[:2, :4])
    torch.testing.assert_close(loaded.nll(x, grid=1), mixture.nll(x, grid=1))


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
    cache = em_run / "mixture_best_em4.npz"  # vtadl_tiny's K for em, on one grid
    assert cache.is_file()
    assert 0 <= result["pixel_auroc"] <= 1 and result["score"] == "nll"
    assert result["mixture_fit"] == "em" and result["n_gaussians"] == 4
    stamp = cache.stat().st_mtime_ns
    scorer = Scorer(em_run)
    assert cache.stat().st_mtime_ns == stamp  # reused, not fitted again
    fitted, meta = load_mixture(cache)
    torch.testing.assert_close(scorer.mixture.mu.cpu(), fitted.mu)
    assert meta["epoch"] == scorer.state["epoch"]
    # The network stays as trained: its head is the untrained placeholder of one component.
    assert scorer.model.mdn.n_gaussians == 1
    # Another checkpoint epoch (a resumed run) is fitted afresh.
    best = em_run / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    save_checkpoint(best, **{**state, "epoch": state["epoch"] + 5})
    Scorer(em_run)
    assert load_mixture(cache)[1]["epoch"] == state["epoch"] + 5
    save_checkpoint(best, **state)


@pytest.mark.parametrize("fit", ["em", "kernel"])
def test_k_is_honoured_in_every_fit_and_refitted_without_retraining(em_run: Path, fit) -> None:
    best = em_run / "checkpoints" / "best.pt"
    weights = best.read_bytes()
    for k in (3, 7):
        result = evaluate_run(em_run, mixture_fit=fit, n_gaussians=k)
        assert result["mixture_fit"] == fit and result["n_gaussians"] == k
        scorer = Scorer(em_run, mixture_fit=fit, n_gaussians=k)
        assert scorer.mixture.n_gaussians == k and scorer.n_gaussians == k
    assert best.read_bytes() == weights  # refitted, not retrained
    if fit == "kernel":  # every token kept: as many Gaussians as training tokens
        tokens = len(Scorer(em_run).source.items("train")) * 16  # 4 x 4 tokens, one grid
        assert (
            evaluate_run(em_run, mixture_fit="kernel", n_gaussians="all")["n_gaussians"] == tokens
        )


def test_a_coreset_of_several_k_is_selected_once_and_nested(em_run: Path, monkeypatch) -> None:
    from vtadl.scoring import mixture_fit

    calls = []
    real = mixture_fit.greedy_order
    monkeypatch.setattr(
        mixture_fit, "greedy_order", lambda x, k, seed: calls.append(k) or real(x, k, seed)
    )
    scorer = Scorer(em_run)
    args = (scorer.model, em_run, "nested.pt", 0, scorer.source, scorer.device, 0)
    small, large = fitted_mixtures(*args, how="kernel", ks=[5, 12])
    assert calls == [12]
    rows = lambda m: {tuple(r) for r in m.centres.cpu().numpy().round(5)}  # noqa: E731
    assert rows(small) < rows(large) and len(rows(small)) == 5


def test_k_does_not_change_the_network_that_is_trained(demo_root: Path, tmp_path: Path) -> None:
    # With the mixture fitted after training and detached, K is not part of training.
    runs = []
    for how, k in (("em", 2), ("kernel", 50)):
        config = default_config("vtadl_tiny").override(
            data={"root": str(demo_root), "category": "brick"},
            model={"n_gaussians": k},
            train={"epochs": 1, "batch_size": 4, "out": str(tmp_path / how), "mixture_fit": how},
        )
        runs.append(load_checkpoint(fit(config) / "checkpoints" / "best.pt")["model"])
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0)


def test_stored_kernels_of_earlier_versions_keep_every_token() -> None:
    raw = default_config("vtadl_small").to_dict()
    raw["model"]["n_gaussians"] = 400  # the variant's then, unused by a kernel
    del raw["preset"]  # written before presets
    assert Config.from_dict(upgrade_stored(raw)).model.n_gaussians == "all"
    raw["train"]["mixture_fit"] = "em"
    assert Config.from_dict(upgrade_stored(raw)).model.n_gaussians == 400
    fresh = default_config("vtadl_small").override(model={"n_gaussians": 400}).to_dict()
    assert Config.from_dict(upgrade_stored(fresh)).model.n_gaussians == 400  # K as asked


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


def test_a_kernel_covers_rare_normal_tokens_and_scores_like_a_nearest_neighbour() -> None:
    # Two clusters, one of them rare: the coreset of a kernel puts centres on the rare cluster
    # too (it is far from the common one), so a token of the rare cluster scores as low as
    # one of the common cluster, while a token far from both scores high.
    rng = np.random.default_rng(1)
    d = 32
    common = rng.normal(0, 1, (400, d))
    rare = rng.normal(0, 1, (4, d)) + 6
    tokens = np.concatenate([common, rare]).astype(np.float32)
    every = fit_kernel(tokens, "all")
    np.testing.assert_array_equal(every.centres.numpy(), tokens)
    var = (0.3 * tokens.std(0)) ** 2 + 1e-4
    np.testing.assert_allclose(every.log_var.exp().numpy(), var, rtol=1e-5)
    from vtadl.scoring.coreset import greedy_order

    some = fit_kernel(tokens, 40, greedy_order(tokens, 40, 0))
    assert some.n_gaussians == 40
    assert (some.centres.numpy()[:, 0] > 3).sum() >= 1  # a rare token among the centres
    np.testing.assert_allclose(some.log_var.numpy(), every.log_var.numpy())  # all tokens' spread
    seen = np.stack([common[5], rare[2]]) + rng.normal(0, 0.05, (2, d))
    unseen = rng.normal(0, 1, (1, d)) + 3  # between the clusters, near no token
    x = torch.from_numpy(np.concatenate([seen, unseen]).astype(np.float32))[None]
    for kernel in (every, some):
        nll = kernel.nll(x)[0].numpy()
        assert nll[2] > nll[0] and nll[2] > nll[1]
    nll = every.nll(x)[0].numpy()
    assert abs(nll[0] - nll[1]) < 0.2 * (nll[2] - nll[0])  # rare but seen ~ common


def test_the_mixture_is_fitted_at_the_grid_shifts_it_is_scored_at(
    em_run: Path, monkeypatch
) -> None:
    from vtadl.scoring import mixture_fit

    sizes = []
    fit_real = mixture_fit.fit_em

    def counting(tokens, k, seed):
        sizes.append(len(tokens))
        return fit_real(tokens, k, seed)

    monkeypatch.setattr(mixture_fit, "fit_em", counting)
    Scorer(em_run, eval_overrides={"grid_shifts": 2})
    assert (em_run / "mixture_best_shifts2_em4.npz").is_file()
    (em_run / "mixture_best_em4.npz").unlink(missing_ok=True)
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
        return fitted_mixtures(*args, how="kernel", ks=["all"], shifts=2)[0].centres.numpy()

    assert len(kernel()) == n // 2
    assert len(training_tokens(model, source, device, 0, 2)) == n // 4  # what EM is fitted to
    monkeypatch.setattr(mixture_fit, "MAX_KERNEL_TOKENS", n)
    np.testing.assert_array_equal(kernel(), every)  # all of them, in order


def test_a_run_refits_its_mixture_as_a_kernel_and_records_it(em_run: Path) -> None:
    em = evaluate_run(em_run)
    calibration = (em_run / "calibration.json").read_text()
    kernel = evaluate_run(em_run, mixture_fit="kernel")
    assert kernel["mixture_fit"] == "kernel" and em["mixture_fit"] == "em"
    assert kernel["n_gaussians"] > em["n_gaussians"] == 4  # each fit's own default K
    assert kernel["grid_shifts"] == em["grid_shifts"] == 1  # the run's own grid
    assert kernel["pixel_auroc"] != em["pixel_auroc"]
    # The run's own calibration stays the EM mixture's.
    assert (em_run / "calibration.json").read_text() == calibration
    assert json.loads((em_run / "metrics.json").read_text())["mixture_fit"] == "kernel"


def test_a_mixture_trained_with_the_network_keeps_its_k_but_the_network_can_be_fitted() -> None:
    from vtadl.scoring.scorer import refit

    sgd = default_config("vtadl_tiny").override(
        model={"mdn_condition": "token"}, train={"mixture_fit": "sgd", "mdn_loss": "reference"}
    )
    with pytest.raises(ConfigError, match="fitted by sgd; its K is part of the training"):
        refit(sgd, None, 8)
    with pytest.raises(ConfigError, match="fitted by sgd; its K"):
        refit(sgd, "sgd", 8)
    with pytest.raises(ConfigError, match="refitted as em or kernel only, got 'sgd'"):
        refit(default_config("vtadl_tiny"), "sgd")
    kernel = refit(sgd, "kernel", 8)
    assert (kernel.train.mixture_fit, kernel.model.n_gaussians) == ("kernel", 8)
    assert (kernel.model.mdn_condition, kernel.train.mdn_loss) == ("global", "mixture")
    assert refit(sgd, "em").model.n_gaussians == "auto"  # the fit's own default K
    assert refit(default_config("vtadl_tiny"), "kernel").train.mixture_fit == "kernel"


def test_a_kernel_by_position_scores_each_token_against_its_own_position_only() -> None:
    # Six images, two shifted grids of four positions, position p's tokens around 3 * p: a
    # token is scored by the Gaussians of its own grid and position, so the same value is
    # normal where it was seen and anomalous where it was not.
    rng = np.random.default_rng(2)
    n, grids, cells, d = 6, 2, 4, 32
    centres = 3.0 * np.arange(grids * cells)[None, :, None]
    tokens = (centres + rng.normal(0, 1, (n, grids * cells, d))).astype(np.float32)
    kernel = fit_position_kernel(tokens, "all", grids=grids)
    assert isinstance(kernel, PositionKernel) and kernel.centres.shape == (8, n, d)
    x = torch.from_numpy(tokens[0, cells:] + rng.normal(0, 0.05, (cells, d)).astype(np.float32))
    x = x[None]  # grid 1's tokens of image 0, slightly moved
    nll = kernel.nll(x, grid=1)[0].numpy().astype(np.float64)
    var = kernel.log_var.exp().numpy().astype(np.float64)
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
    again = kernel.nll(moved, grid=1)[0].numpy()
    assert again[0] > nll[0] + 100 and abs(again[2] - nll[2]) < 1e-3
    # K per position: the first K of each position's own coreset order.
    order = np.tile(np.arange(n)[::-1], (grids * cells, 1))
    two = fit_position_kernel(tokens, 2, grids=grids, order=order)
    assert two.n_gaussians == 2 and two.centres.shape == (8, 2, d)
    np.testing.assert_array_equal(two.centres[3].numpy(), tokens[[4, 5], 3])


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


def test_a_kernel_run_of_an_earlier_version_resumes(demo_root: Path, tmp_path: Path) -> None:
    # Before K counted in the kernel, the unused head had the variant's K components and the
    # stored config no preset; such a run resumes (its kernel read as all) and scores.
    config = default_config("vtadl_tiny").override(
        data={"root": str(demo_root), "category": "brick"},
        train={"epochs": 1, "batch_size": 4, "out": str(tmp_path)},
        eval={"grid_shifts": 1},
    )
    run = fit(config)
    for name in ("last.pt", "best.pt"):
        path = run / "checkpoints" / name
        state = load_checkpoint(path)
        old = {k: v for k, v in state["config"].items() if k != "preset"}
        old["model"] = {**old["model"], "n_gaussians": 4}
        weights = dict(state["model"])
        weights["mdn.logits"], weights["mdn.means"] = torch.zeros(4), torch.randn(4, 32)
        weights["mdn.log_vars"] = torch.zeros(4, 32)
        save_checkpoint(path, **{**state, "config": old, "model": weights})
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    from vtadl.runs import train_config

    stored, run_dir = train_config(
        overrides={"data": {"category": "brick"}, "train": {"out": str(tmp_path), "epochs": 2}},
        resume=True,
    )
    assert run_dir == run and stored.model.n_gaussians == "all"
    resumed = fit(stored, run_dir=run)
    assert len((resumed / "history.jsonl").read_text().splitlines()) == 2
    scorer = Scorer(resumed)
    assert scorer.config.model.n_gaussians == "all"
    assert isinstance(scorer.mixture, KernelDensity)


def test_a_search_scores_every_k_from_one_encoding_as_each_k_alone(
    em_run: Path, monkeypatch
) -> None:
    from vtadl.scoring import raw
    from vtadl.tune.trial import _split_scores, tuning_scores, tuning_split

    config = Scorer(em_run).config
    split = tuning_split(config, per_kind=1)
    keep = {"score": config.eval.score}
    alone = []
    for k in (2, 5):  # each K its own scorer, calibration and forward passes
        scorer = Scorer(em_run, eval_overrides=keep, n_gaussians=k)
        raws = [scorer.raw(image[None]) for image in split.images]
        alone.append(_split_scores(scorer, raws, split))
    passes = []
    real = raw.patch_nll_each
    monkeypatch.setattr(raw, "patch_nll_each", lambda *a: passes.append(1) or real(*a))
    for shared, own in zip(tuning_scores(em_run, split, ks=[2, 5]), alone, strict=True):
        assert shared == pytest.approx(own, abs=1e-9)
    assert alone[0] != alone[1]  # each K scored with its own mixture
    once = len(passes)
    passes.clear()
    tuning_scores(em_run, split, ks=[2])
    assert once == len(passes)  # two K cost the forward passes of one
