"""The greedy k-center order (vtadl.scoring.coreset) against the literal greedy selection and
the properties the kernel mixture relies on: nested in k, seeded, never a token twice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vtadl.scoring.coreset import (
    DIM,
    greedy_order,
    greedy_order_by_position,
    principal_axes,
    start_index,
)


def _tokens(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Tokens far from zero, as a network's are."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * 3 + 20).astype(np.float32)


def _literal(points: np.ndarray, k: int, start: int) -> np.ndarray:
    """Greedy farthest-point selection as written in the papers, in float64."""
    points = points.astype(np.float64)
    mind = np.full(len(points), np.inf)
    order = [start]
    for _ in range(k - 1):
        mind = np.minimum(mind, ((points - points[order[-1]]) ** 2).sum(1))
        mind[order] = -1
        order.append(int(mind.argmax()))
    return np.array(order)


def _radius(points: np.ndarray, centres: np.ndarray) -> float:
    """The largest distance from a point to its nearest centre."""
    diff = points[:, None, :].astype(np.float64) - points[centres][None]
    return float(np.sqrt((diff**2).sum(-1).min(1).max()))


@pytest.mark.parametrize(("n", "d"), [(40, 6), (400, 16), (600, 200)])
def test_the_order_is_the_literal_greedy_order_on_the_projected_tokens(n: int, d: int) -> None:
    """Exact but for float rounding, with and without a projection (d = 200 > DIM), with few
    candidates (n = 600: many refreshes) or all of them (n = 40)."""
    tokens = _tokens(n, d) * np.geomspace(1, 0.05, d, dtype=np.float32)  # flat, as a network's
    axes = principal_axes(tokens, DIM)
    projected = tokens if axes is None else tokens @ axes.numpy()
    order = greedy_order(tokens, n // 2, seed=3)
    assert order.dtype == np.int64 and order[0] == start_index(n, 3)
    np.testing.assert_array_equal(order, _literal(projected, n // 2, order[0]))


def test_the_order_is_nested_in_k() -> None:
    tokens = _tokens(500, 40)
    longest = greedy_order(tokens, 300, seed=1)
    for k in (1, 10, 100, 299):
        np.testing.assert_array_equal(greedy_order(tokens, k, seed=1), longest[:k])


def test_the_order_is_seeded() -> None:
    tokens = _tokens(300, 160)
    first = greedy_order(tokens, 50, seed=7)
    np.testing.assert_array_equal(greedy_order(tokens, 50, seed=7), first)
    assert not np.array_equal(greedy_order(tokens, 50, seed=8), first)


def test_no_token_is_picked_twice_even_among_duplicates() -> None:
    distinct = _tokens(5, 8)
    tokens = np.repeat(distinct, 60, axis=0)  # 300 tokens, 5 distinct
    order = greedy_order(tokens, 300, seed=0)
    assert sorted(order.tolist()) == list(range(300))
    # The five distinct tokens come first, then the copies.
    assert len({tuple(row) for row in tokens[order[:5]]}) == 5


def test_k_beyond_the_tokens_gives_every_token_once() -> None:
    order = greedy_order(_tokens(30, 4), 1000, seed=0)
    assert sorted(order.tolist()) == list(range(30))


def test_the_first_picks_land_in_different_clusters() -> None:
    rng = np.random.default_rng(0)
    clusters = 7
    centres = rng.standard_normal((clusters, 32)) * 100
    label = rng.integers(0, clusters, 700)
    tokens = (centres[label] + rng.standard_normal((700, 32))).astype(np.float32)
    order = greedy_order(tokens, clusters, seed=2)
    assert sorted(label[order].tolist()) == list(range(clusters))


def test_the_radius_is_within_twice_the_best_and_shrinks_with_k() -> None:
    points = _tokens(12, 2, seed=4)
    order = greedy_order(points, 12, seed=0)
    radii = [_radius(points, order[:k]) for k in range(1, 13)]
    assert all(a >= b for a, b in itertools.pairwise(radii)) and radii[-1] == 0
    for k in range(1, 5):
        best = min(_radius(points, np.array(c)) for c in itertools.combinations(range(12), k))
        assert radii[k - 1] <= 2 * best + 1e-5


def test_by_position_is_the_order_of_each_position() -> None:
    """60 images: 32 candidates, so positions refresh at different picks."""
    gen = np.random.default_rng(5)
    tokens = (gen.standard_normal((60, 9, 200)) * (1 + np.arange(9)[:, None])).astype(np.float32)
    orders = greedy_order_by_position(tokens, 40, seed=4)
    assert orders.shape == (9, 40) and orders.dtype == np.int64
    axes = principal_axes(tokens, DIM).numpy()  # of all positions' tokens together
    for p in range(9):
        np.testing.assert_array_equal(orders[p], _literal(tokens[:, p] @ axes, 40, orders[p, 0]))
    assert len(set(orders[:, 0].tolist())) == 1  # one start image for all
    np.testing.assert_array_equal(greedy_order_by_position(tokens, 15, seed=4), orders[:, :15])
    assert greedy_order_by_position(tokens, 100, seed=4).shape == (9, 60)


def test_the_projection_is_onto_the_axes_of_most_variance() -> None:
    """Tokens near a 5-dimensional subspace of 64: its 5 axes are found, as by scikit-learn's
    PCA, orthonormal; tokens of at most `dim` dimensions are not projected."""
    from sklearn.decomposition import PCA

    gen = np.random.default_rng(2)
    basis = np.linalg.qr(gen.standard_normal((64, 5)))[0]
    tokens = gen.standard_normal((3000, 5)) * [9, 7, 5, 4, 3] @ basis.T + 20
    tokens = (tokens + 0.05 * gen.standard_normal((3000, 64))).astype(np.float32)
    assert principal_axes(tokens, 64) is None and principal_axes(tokens[:, :8], 8) is None
    axes = principal_axes(tokens, 5).numpy().astype(np.float64)
    assert axes.shape == (64, 5)
    np.testing.assert_allclose(axes.T @ axes, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(axes @ axes.T, basis @ basis.T, atol=0.01)
    reference = PCA(n_components=2).fit(tokens).components_.T
    np.testing.assert_allclose(np.abs(axes[:, :2].T @ reference), np.eye(2), atol=1e-4)
    # the same tokens in another order and chunking give the same axes
    again = principal_axes(tokens[::-1].copy(), 5).numpy().astype(np.float64)
    np.testing.assert_allclose(again @ again.T, axes @ axes.T, atol=1e-5)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_a_k_below_one_or_not_whole_is_refused(k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        greedy_order(_tokens(10, 4), k, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        greedy_order_by_position(_tokens(10, 4)[:, None], k, seed=0)  # type: ignore[arg-type]


def test_tokens_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="2-d"):
        greedy_order(_tokens(10, 4)[None], 3, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        greedy_order(np.zeros((0, 4), np.float32), 3, seed=0)
    with pytest.raises(ValueError, match="3-d"):
        greedy_order_by_position(_tokens(10, 4), 3, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_device_gives_the_same_order() -> None:
    tokens = _tokens(3000, 192)
    np.testing.assert_array_equal(
        greedy_order(tokens, 500, seed=0, device="cuda"), greedy_order(tokens, 500, seed=0)
    )
    by_position = tokens.reshape(300, 10, 192)
    np.testing.assert_array_equal(
        greedy_order_by_position(by_position, 50, seed=0, device="cuda"),
        greedy_order_by_position(by_position, 50, seed=0),
    )
