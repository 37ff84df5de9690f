from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vtadl.losses import LOG_VAR_MAX, LOG_VAR_MIN, mixture_nll, reference_nll, ssim, vtadl_loss
from vtadl.model import Mixture


def gauss(x: float, mu: float, var: float) -> float:
    """The 1-D Gaussian density, written out: exp(-(x - mu)^2 / (2 var)) / sqrt(2 pi var)."""
    return math.exp(-((x - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def _mixture(pi: list[float], mu: list[list[float]], log_var: list[list[float]]) -> Mixture:
    """One token (B = N = 1) with K components of dimension D."""
    return Mixture(
        log_pi=torch.log(torch.tensor(pi, dtype=torch.float64))[None, None],
        mu=torch.tensor(mu, dtype=torch.float64)[None, None],
        log_var=torch.tensor(log_var, dtype=torch.float64)[None, None],
    )


def _token(x: list[float]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)[None, None]


def _random_mixture(
    b: int, n: int, k: int, d: int, seed: int, log_var_scale: float = 1.0
) -> tuple[torch.Tensor, Mixture]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen)
    mix = Mixture(
        log_pi=torch.log_softmax(torch.randn(b, n, k, generator=gen), -1),
        mu=torch.randn(b, n, k, d, generator=gen),
        log_var=torch.randn(b, n, k, d, generator=gen) * log_var_scale,
    )
    return x, mix


# ---------------------------------------------------------------- mixture NLL by hand


def test_mixture_nll_by_hand_1d() -> None:
    # x = 0; components N(0, 1) with weight 1/4 and N(1, 4) with weight 3/4:
    #   N_1(0) = 1 / sqrt(2 pi)
    #   N_2(0) = exp(-1 / 8) / sqrt(8 pi)
    #   NLL = -log(0.25 * 0.39894 + 0.75 * 0.17603) = -log(0.23176) = 1.4621...
    n1 = math.exp(0.0) / math.sqrt(2 * math.pi)
    n2 = math.exp(-1 / 8) / math.sqrt(2 * math.pi * 4)
    expected = -math.log(0.25 * n1 + 0.75 * n2)
    assert expected == pytest.approx(1.4621, abs=1e-4)
    mix = _mixture([0.25, 0.75], [[0.0], [1.0]], [[0.0], [math.log(4)]])
    got = mixture_nll(_token([0.0]), mix)
    assert got.shape == (1, 1)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_mixture_nll_by_hand_2d() -> None:
    # x = (1, -1); equal weights.
    # Component 1: mu (0, 0), variances (1, 1):
    #   N_1 = exp(-1/2)/sqrt(2 pi) * exp(-1/2)/sqrt(2 pi) = exp(-1) / (2 pi)
    # Component 2: mu (1, 1), variances (2, 1/2):
    #   dim 1: x - mu = 0  -> 1 / sqrt(4 pi)
    #   dim 2: x - mu = -2 -> exp(-4 / (2 * 1/2)) / sqrt(pi) = exp(-4) / sqrt(pi)
    #   N_2 = exp(-4) / (2 pi)
    # NLL = -log(1/2 N_1 + 1/2 N_2) = log(4 pi) - log(exp(-1) + exp(-4))
    expected = -math.log(0.5 * math.exp(-1) / (2 * math.pi) + 0.5 * math.exp(-4) / (2 * math.pi))
    assert expected == pytest.approx(math.log(4 * math.pi) - math.log(math.exp(-1) + math.exp(-4)))
    # The same numbers from the 1-D density, dimension by dimension:
    n1 = gauss(1, 0, 1) * gauss(-1, 0, 1)
    n2 = gauss(1, 1, 2) * gauss(-1, 1, 0.5)
    assert expected == pytest.approx(-math.log(0.5 * n1 + 0.5 * n2), rel=1e-12)
    mix = _mixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [math.log(2), math.log(0.5)]])
    assert float(mixture_nll(_token([1.0, -1.0]), mix)) == pytest.approx(expected, rel=1e-9)


def test_reference_nll_by_hand_uses_softplus_log_variance() -> None:
    # Raw log variances 0 and 1 become softplus(0) = log 2 and softplus(1) = log(1 + e),
    # i.e. variances 2 and 1 + e. x = 0, mu = (0, 1), weights (1/4, 3/4):
    #   -log N_1 = 1/2 (0 / 2 + log 2 + log 2 pi)
    #   -log N_2 = 1/2 (1 / (1 + e) + log(1 + e) + log 2 pi)
    #   reference = 1/4 (-log N_1) + 3/4 (-log N_2)
    var1, var2 = 2.0, 1 + math.e
    expected = 0.25 * -math.log(gauss(0, 0, var1)) + 0.75 * -math.log(gauss(0, 1, var2))
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    assert expected == pytest.approx(
        0.25 * (0.5 * math.log(2) + half_log_2pi)
        + 0.75 * (0.5 / (1 + math.e) + 0.5 * math.log(1 + math.e) + half_log_2pi)
    )
    mix = _mixture([0.25, 0.75], [[0.0], [1.0]], [[0.0], [1.0]])
    assert float(reference_nll(_token([0.0]), mix)) == pytest.approx(expected, rel=1e-9)
    # The true mixture NLL of the same raw numbers is a different value (variances 1 and e).
    exact = -math.log(0.25 * gauss(0, 0, 1) + 0.75 * gauss(0, 1, math.e))
    assert float(mixture_nll(_token([0.0]), mix)) == pytest.approx(exact, rel=1e-9)


def test_reference_nll_by_hand_2d() -> None:
    # One component (weight 1), x = (1, 2), mu = (0, 0), raw log variances (-20, 20):
    # softplus(-20) = log(1 + e^-20) ~ 2.06e-9 (variance ~ 1), softplus(20) ~ 20 (variance e^20).
    sp = [math.log1p(math.exp(-20)), 20 + math.log1p(math.exp(-20))]
    expected = -math.log(gauss(1, 0, math.exp(sp[0]))) - math.log(gauss(2, 0, math.exp(sp[1])))
    mix = _mixture([1.0], [[0.0, 0.0]], [[-20.0, 20.0]])
    assert float(reference_nll(_token([1.0, 2.0]), mix)) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_is_an_upper_bound_on_the_mixture_nll(seed: int) -> None:
    # Jensen: -log sum_k pi_k N_k <= sum_k pi_k (-log N_k) for the same components. The
    # reference form reads the raw log variances through softplus, so the true mixture is
    # given softplus(raw) to compare the two on the same Gaussians.
    x, mix = _random_mixture(3, 5, 4, 6, seed)
    same = Mixture(mix.log_pi, mix.mu, F.softplus(mix.log_var))
    exact = mixture_nll(x, same)
    upper = reference_nll(x, mix)
    assert exact.shape == upper.shape == (3, 5)
    assert (exact <= upper + 1e-5).all()
    # The bound is strict somewhere when the components disagree.
    assert (upper - exact).max() > 1e-3


def test_single_component_mixture_and_reference_agree() -> None:
    x, mix = _random_mixture(2, 3, 1, 4, seed=5)
    same = Mixture(mix.log_pi, mix.mu, F.softplus(mix.log_var))
    torch.testing.assert_close(mixture_nll(x, same), reference_nll(x, mix), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("log_var", [0.0, -100.0, 100.0])
@pytest.mark.parametrize("loss", [mixture_nll, reference_nll])
def test_huge_distances_are_finite(loss, log_var: float) -> None:
    _, mix = _random_mixture(2, 3, 4, 8, seed=3)
    mu = mix.mu.clone().requires_grad_(True)
    lv = torch.full_like(mix.log_var, log_var).requires_grad_(True)
    log_pi = mix.log_pi.clone().requires_grad_(True)
    x = (mu.detach()[:, :, 0] + 1e4).requires_grad_(True)  # x - mu_0 = 1e4 in every dimension
    nll = loss(x, Mixture(log_pi, mu, lv))
    assert torch.isfinite(nll).all()
    assert (nll > 100).all()  # far from every component: a large but finite NLL
    nll.sum().backward()
    for t in (x, mu, lv, log_pi):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("loss", [mixture_nll, reference_nll])
def test_negligible_components_get_exactly_zero_gradient(loss) -> None:
    # The far component's share of the gradient is about exp(-93), a subnormal float32
    # (slow in x86 matrix products); it is dropped, the near component's is kept.
    tiny = torch.finfo(torch.float32).tiny
    x = torch.full((1, 1, 4), 0.1)
    mu = torch.stack([torch.zeros(4), torch.full((4,), 6.9)]).view(1, 1, 2, 4).requires_grad_()
    far = -2 * 6.9**2 + 2 * 0.1**2  # log N_far - log N_near with unit variances
    log_pi = torch.log(torch.tensor([0.5, 0.5])).view(1, 1, 2)
    if loss is reference_nll:
        # The reference form weights components by pi, so make the far one's pi negligible.
        log_pi = torch.tensor([0.0, far]).view(1, 1, 2)
        log_var = torch.full((1, 1, 2, 4), -20.0)  # softplus(-20) ~ 2e-9: unit variances
    else:
        log_var = torch.zeros(1, 1, 2, 4)
    share = torch.softmax(torch.tensor([0.0, far]), 0)[1].item()
    assert 0 < share < tiny  # without the drop, the far gradient would be subnormal
    loss(x, Mixture(log_pi, mu, log_var)).sum().backward()
    grad = mu.grad[0, 0]
    assert torch.all(grad[1] == 0)
    torch.testing.assert_close(grad[0], torch.full((4,), -0.1), rtol=1e-5, atol=0)


def test_mixture_nll_clamps_log_variance() -> None:
    # One component, one dimension. Below the bound the variance is exp(LOG_VAR_MIN):
    #   x = mu = 0: NLL = -log(1 / sqrt(2 pi exp(-9))) = 1/2 (log 2 pi - 9)
    assert (LOG_VAR_MIN, LOG_VAR_MAX) == (-9.0, 9.0)
    low = -math.log(gauss(0, 0, math.exp(-9)))
    assert low == pytest.approx(0.5 * (math.log(2 * math.pi) - 9))
    lv = torch.tensor([[[[-50.0]]]], dtype=torch.float64, requires_grad=True)
    mix = Mixture(torch.zeros(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, 1).double(), lv)
    nll = mixture_nll(_token([0.0]), mix)
    assert float(nll.detach()) == pytest.approx(low, rel=1e-9)
    nll.sum().backward()
    assert float(lv.grad) == 0.0  # outside the bound the log variance gets no gradient

    # Above the bound the variance is exp(LOG_VAR_MAX); x - mu = 3.
    high = -math.log(gauss(3, 0, math.exp(9)))
    mix = _mixture([1.0], [[0.0]], [[50.0]])
    assert float(mixture_nll(_token([3.0]), mix)) == pytest.approx(high, rel=1e-9)
    # Inside the bounds nothing is clamped.
    mix = _mixture([1.0], [[0.0]], [[8.5]])
    inside = -math.log(gauss(3, 0, math.exp(8.5)))
    assert float(mixture_nll(_token([3.0]), mix)) == pytest.approx(inside, rel=1e-9)


# ---------------------------------------------------------------- SSIM


def _image_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, 32, 32, generator=gen)
    b = (a + 0.2 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    return a, b


def test_ssim_of_identical_images_is_one() -> None:
    a, _ = _image_pair()
    s = ssim(a, a)
    assert s.shape == (2,)
    torch.testing.assert_close(s, torch.ones(2), atol=1e-4, rtol=0)
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(ssim(flat, flat), torch.ones(1), atol=1e-4, rtol=0)


def test_ssim_of_different_images_is_below_one_and_symmetric() -> None:
    a, b = _image_pair()
    s = ssim(a, b)
    assert (s < 0.95).all()
    assert (s > -1).all()
    torch.testing.assert_close(s, ssim(b, a), atol=1e-6, rtol=0)
    # More noise, less similarity.
    worse = (a + 0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9))).clamp(0, 1)
    assert (ssim(a, worse) < s).all()


# ---------------------------------------------------------------- weighted total


@pytest.mark.parametrize("mdn_loss", ["mixture", "reference"])
def test_vtadl_loss_combines_weighted_terms(mdn_loss: str) -> None:
    images, rec = _image_pair(seed=4)
    rec = rec.requires_grad_(True)
    tokens, mix = _random_mixture(2, 4, 3, 8, seed=4)
    nll_fn = {"mixture": mixture_nll, "reference": reference_nll}[mdn_loss]

    mse = ((rec.detach() - images) ** 2).mean()
    sim = ssim(images, rec.detach()).mean()
    nll = nll_fn(tokens, mix).mean() / 8  # per token dimension

    terms = vtadl_loss(
        images, rec, tokens, mix, w_mse=2.0, w_ssim=3.0, w_nll=5.0, mdn_loss=mdn_loss
    )
    torch.testing.assert_close(terms.mse, mse)
    torch.testing.assert_close(terms.ssim, sim)
    torch.testing.assert_close(terms.nll, nll)
    torch.testing.assert_close(terms.total.detach(), 2 * mse + 3 * (1 - sim) + 5 * nll)
    assert terms.total.requires_grad and not terms.mse.requires_grad

    for weights, expected in [
        ((1.0, 0.0, 0.0), mse),
        ((0.0, 1.0, 0.0), 1 - sim),
        ((0.0, 0.0, 1.0), nll),
    ]:
        w_mse, w_ssim, w_nll = weights
        total = vtadl_loss(
            images, rec, tokens, mix, w_mse=w_mse, w_ssim=w_ssim, w_nll=w_nll, mdn_loss=mdn_loss
        ).total
        torch.testing.assert_close(total.detach(), expected)


def test_ssim_matches_a_direct_2d_gaussian_window() -> None:
    """The separable implementation equals the textbook 2-D window with zero padding."""

    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 20, 17), torch.rand(2, 3, 20, 17)
    x = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, w, padding=5, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    direct = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    assert torch.allclose(ssim(a, b), direct.flatten(1).mean(1), atol=1e-5)
