"""The whole-image token neighbour (vtadl.scoring.neighbours) against a brute-force distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from vtadl.scoring.mixture_fit import fit_em, fit_kernel, fit_position_kernel
from vtadl.scoring.neighbours import ImageNeighbours

GRIDS, CELLS, DIM, IMAGES = 3, 4, 5, 7


def _by_position(gen: torch.Generator) -> torch.Tensor:
    """Training tokens (images, S * L, D), far from zero as a network's are."""
    return torch.randn(IMAGES, GRIDS * CELLS, DIM, generator=gen) * 3 + 20


def test_the_distance_is_to_the_nearest_image_over_all_grids_at_once() -> None:
    gen = torch.Generator().manual_seed(0)
    train = _by_position(gen)
    means = train.transpose(0, 1).contiguous()  # a kernel by position's (S * L, images, D)
    neighbours = ImageNeighbours(means, CELLS)
    # Queries: near training images 2 and 5, and one far from all.
    queries = torch.stack(
        [train[2] + 0.01, train[5] - 0.2 * torch.randn(GRIDS * CELLS, DIM, generator=gen)]
        + [torch.randn(GRIDS * CELLS, DIM, generator=gen) * 3 + 20]
    )
    grids = list(queries.split(CELLS, dim=1))  # grid k's (B, L, D)
    got = neighbours.distance(grids).numpy()
    flat = lambda t: t.reshape(len(t), -1).double().numpy()  # noqa: E731
    expected = cdist(flat(queries), flat(train))
    np.testing.assert_allclose(got, expected.min(1), rtol=1e-12)
    assert expected.argmin(1)[:2].tolist() == [2, 5]
    # Each grid counts: a query whose tokens on one grid alone are another image's is not
    # at distance zero from either.
    mixed = torch.cat([train[1, :CELLS], train[4, CELLS:]])[None]
    assert neighbours.distance(list(mixed.split(CELLS, dim=1)))[0] > 1.0


def test_a_wrong_number_of_grids_is_refused() -> None:
    gen = torch.Generator().manual_seed(1)
    neighbours = ImageNeighbours(_by_position(gen).transpose(0, 1), CELLS)
    with pytest.raises(ValueError, match="2 grids of tokens, the neighbours hold 3"):
        neighbours.distance([torch.zeros(1, CELLS, DIM)] * 2)
    with pytest.raises(ValueError, match="do not hold grids of 5 tokens"):
        ImageNeighbours(torch.zeros(12, 2, DIM), 5)


def test_only_a_kernel_by_position_makes_neighbours() -> None:
    tokens = np.random.default_rng(0).normal(size=(6, 16 * 4, 8)).astype(np.float32)
    flat = tokens.reshape(-1, 8)
    assert fit_em(flat, 2, seed=0).neighbours() is None  # one mixture for every token
    assert fit_kernel(flat, "all").neighbours() is None
    # By position, whatever its K: every training image's tokens, 16 grids of 4 cells.
    for k in ("all", 2):
        order = np.tile(np.arange(6), (64, 1))
        neighbours = fit_position_kernel(tokens, k, grids=16, order=order).neighbours()
        assert neighbours is not None and neighbours.grids == 16
        assert neighbours.tokens.shape == (64, 6, 8)
