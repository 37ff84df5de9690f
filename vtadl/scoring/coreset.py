"""A greedy k-center coreset: which training tokens to keep as the kernel mixture's centres.

Greedy farthest-point selection (Gonzalez 1985; PatchCore, Roth et al. 2022, selects its
memory bank this way) starts at one token and then repeatedly picks the token farthest from
everything picked so far. Its covering radius (the largest distance from a token to its
nearest pick) is within twice the best possible for that many centres, and the order is
nested: with the same start and projection, the first K picks are the K-point coreset, so one
selection at the largest K serves every smaller K of a search.

Distances are Euclidean after projecting the tokens onto their `dim` principal axes, and only
when the tokens have more than `dim` dimensions. A network's tokens are nearly flat: on a
`vtadl_small` checkpoint (192 dimensions) the first 64 axes hold 99.8% of the variance, so
the projection keeps the distances that matter, and better than a random projection to twice
as many (PatchCore's way, and vtadl's before session 25): on a demo category's 221,184 tokens
at K=32768, the largest distance from a token to its nearest pick, in all 192 dimensions, was
1.61 after 64 principal axes against 1.85 after a random projection to 128 (1.54 with no
projection; the mean distance within 2% for all three), for three quarters of the seconds. On
the photo benchmark's tuning seed the kernels scored as the random projection's did, within
the spread between two of its seeds; 32 axes were cheaper still but lost .04 of pixel AUROC
on `table` (benchmarks/HISTORY.md, session 25). The axes depend on the tokens only, so the
seed picks the start alone. The start is a seeded random token, as in PatchCore: any start
keeps the factor of two, and one that depends on the data (the token nearest the mean, say)
would cost a pass and favour no later pick.

Done literally, each pick is a pass over all n x dim projected values, k passes in all, and
each pass is bound by memory bandwidth, not arithmetic (320,000 x 64 floats is 82 MB per
pick). Here the same picks, exact but for float rounding, are found with the arithmetic
batched into matrix products. Each token's distance to the picked set is known as of a
"refresh"; the `width` farthest of them become candidates, whose distances are kept exact pick
by pick, and the rest are bounded by the distance of the farthest of them. While the farthest
candidate is at least that bound it is the true farthest token; when it is not, the picks made
since the refresh are applied to every token at once, as one matrix product, and candidates are
drawn again. The work is still about k passes of n x dim, but as matrix products: on two CPU
cores, some forty times faster than one pass per pick.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK = 1 << 22  # floats in one temporary of a refresh or a projection
DIM = 64  # principal axes the distances are measured along


def principal_axes(tokens: np.ndarray, dim: int) -> torch.Tensor | None:
    """The (D, dim) principal axes of tokens (..., D) of most variance, as columns, from their
    covariance (products in float32 chunks, summed in float64); None where D <= dim (the
    tokens are used as they are)."""
    d = tokens.shape[-1]
    if d <= dim:
        return None
    flat = tokens.reshape(-1, d)
    mean = flat.mean(0, dtype=np.float64).astype(np.float32)
    cov = np.zeros((d, d))
    rows = max(1, _CHUNK // d)
    for a in range(0, len(flat), rows):
        centred = flat[a : a + rows].astype(np.float32) - mean
        cov += centred.T @ centred
    _, vectors = np.linalg.eigh(cov / len(flat))  # ascending eigenvalues
    return torch.from_numpy(np.ascontiguousarray(vectors[:, ::-1][:, :dim], dtype=np.float32))


def start_index(n: int, seed: int) -> int:
    """The first pick among n tokens for `seed`."""
    return int(np.random.default_rng(seed).integers(n))


def greedy_order(
    tokens: np.ndarray, k: int, seed: int, dim: int = DIM, device: torch.device | str | None = None
) -> np.ndarray:
    """The first min(k, n) picks of greedy farthest-point selection among tokens (n, D):
    int64 indices, nested in k, the same for the same seed."""
    tokens = _checked(tokens, 2, k, dim)
    x = _projected(tokens[None], principal_axes(tokens, dim), device)
    return _greedy(x, min(int(k), len(tokens)), start_index(len(tokens), seed))[0].cpu().numpy()


def greedy_order_by_position(
    tokens: np.ndarray, k: int, seed: int, dim: int = DIM, device: torch.device | str | None = None
) -> np.ndarray:
    """At each position, the greedy order of the images' tokens there: tokens (images, P, D)
    give (P, min(k, images)) int64 indices. Row p is the greedy order of tokens[:, p] projected
    onto the principal axes of all the tokens (not of position p's alone, as
    `greedy_order(tokens[:, p], ...)` would take): one projection and one start image for all
    positions; positions advance together."""
    tokens = _checked(tokens, 3, k, dim)
    x = _projected(tokens.transpose(1, 0, 2), principal_axes(tokens, dim), device)
    images = tokens.shape[0]
    return _greedy(x, min(int(k), images), start_index(images, seed)).cpu().numpy()


def _checked(tokens: np.ndarray, ndim: int, k: int, dim: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != ndim or 0 in tokens.shape:
        raise ValueError(f"tokens must be a non-empty {ndim}-d array, got shape {tokens.shape}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim!r}")
    return tokens


def _projected(
    tokens: np.ndarray, axes: torch.Tensor | None, device: torch.device | str | None
) -> torch.Tensor:
    """Tokens (B, n, D), a numpy array or view, projected onto `axes` (D, m) chunk by chunk
    (None: kept as they are, m = D) and centred per set: (B, n, m) float32 on `device`."""
    b, n, d = tokens.shape
    proj = None if axes is None else axes.to(device)
    x = torch.empty(
        (b, n, d if proj is None else proj.shape[1]), dtype=torch.float32, device=device
    )
    rows = max(1, _CHUNK // (b * d))
    for a in range(0, n, rows):
        part = torch.as_tensor(np.ascontiguousarray(tokens[:, a : a + rows]), device=device)
        part = part.float()
        x[:, a : a + rows] = part if proj is None else part @ proj
    # Centred, the refresh's |x|^2 - 2 x.c + |c|^2 loses less to rounding.
    return x.sub_(x.mean(1, keepdim=True))


def _width(n: int) -> int:
    """How many candidates are followed pick by pick: more make refreshes rarer, and each pick
    dearer. Depends on n only, so that the picks do not depend on k."""
    return min(n, max(32, 2 * math.isqrt(n)))


def _greedy(x: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """The first k picks in each of B sets of points x (B, n, m): (B, k) int64."""
    run = _Run(x)
    rows = torch.arange(len(x), device=x.device)
    order = torch.empty((len(x), k), dtype=torch.long, device=x.device)
    order[:, 0] = start
    run.mind[:, start] = -1
    run.pending[:, 0] = start
    run.count[:] = 1
    run.refresh(rows)
    for t in range(1, k):
        far, best = run.cand_d.max(1)
        # The farthest candidate is the farthest point while no other can be farther. (Once
        # every candidate is picked, far = -1 < tau: an unpicked point is left outside.)
        stale = far < run.tau
        if bool(stale.any()):
            run.refresh(rows[stale])
            best = run.cand_d.argmax(1)
        order[:, t] = run.pick(rows, best)
    return order


class _Run:
    """The state of B greedy selections that advance one pick at a time together.

    `mind` (B, n) is each point's squared distance to the picks as of its set's last refresh,
    -1 once picked; `cand`, `cand_x` and `cand_d` are the `width` farthest points at that
    refresh with their coordinates and current distances, and `tau` bounds the distance of
    every other point. `pending` holds the `count` picks made since the refresh.
    """

    def __init__(self, x: torch.Tensor) -> None:
        b, n, m = x.shape
        width = _width(n)
        self.x, self.width = x, width
        self.sq = x.new_empty((b, n))
        step = max(1, _CHUNK // (b * m))
        for a in range(0, n, step):
            self.sq[:, a : a + step] = x[:, a : a + step].square().sum(-1)
        self.mind = x.new_full((b, n), math.inf)
        self.pending = torch.zeros((b, width + 1), dtype=torch.long, device=x.device)
        self.count = torch.zeros(b, dtype=torch.long, device=x.device)
        self.cand = torch.zeros((b, width), dtype=torch.long, device=x.device)
        self.cand_x = x.new_zeros((b, width, m))
        self.cand_sq = x.new_zeros((b, width, 1))
        self.cand_d = x.new_zeros((b, width))
        self.tau = x.new_zeros(b)
        self._dist = x.new_empty((b, width, 1))

    def pick(self, rows: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Pick every set's candidate `best` (B,) and bring the candidates' distances up to
        date with it: one (B, width, m) matrix-vector product, into a preallocated buffer.
        Returns the picked points' indices (B,)."""
        picked = self.cand[rows, best]
        self.cand_d[rows, best] = -1
        self.mind[rows, picked] = -1
        self.pending[rows, self.count] = picked
        self.count += 1
        centre = self.cand_x[rows, best][:, :, None]  # (B, m, 1)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, as in a refresh
        dist = torch.baddbmm(self.cand_sq, self.cand_x, centre, alpha=-2, out=self._dist)[..., 0]
        dist.add_(self.cand_sq[rows, best]).clamp_(min=0)
        torch.minimum(self.cand_d, dist, out=self.cand_d)
        return picked

    def refresh(self, rows: torch.Tensor) -> None:
        """Apply the sets' pending picks to all their points, as matrix products over chunks
        of points, and draw their candidates again."""
        x, mind = self.x, self.mind
        sel = slice(None) if len(rows) == len(x) else rows  # a view, not a copy, where it can
        r = int(self.count[rows].max())
        pend = self.pending[rows, :r]
        # Sets with fewer pending picks repeat their first one, which changes nothing.
        pend = torch.where(
            torch.arange(r, device=x.device) < self.count[rows, None], pend, pend[:, :1]
        )
        centres_t = x[rows[:, None], pend].transpose(1, 2)  # (S, m, r)
        c_sq = self.sq[rows[:, None], pend][:, None, :]  # (S, 1, r)
        step = max(1, _CHUNK // (len(rows) * max(r, x.shape[2])))
        for a in range(0, x.shape[1], step):
            part = x[sel, a : a + step]
            dist = torch.baddbmm(c_sq, part, centres_t, alpha=-2).amin(-1)
            dist = dist.add_(self.sq[sel, a : a + step]).clamp_(min=0)
            mind[sel, a : a + step] = torch.minimum(mind[sel, a : a + step], dist)
        self.count[rows] = 0
        self._draw(rows, sel)

    def _draw(self, rows: torch.Tensor, sel: slice | torch.Tensor) -> None:
        """The `width` farthest points of the sets `rows` become their candidates."""
        n, width = self.x.shape[1], self.width
        top = self.mind[sel].topk(min(width + 1, n), dim=1)
        self.cand[rows] = top.indices[:, :width]
        self.cand_d[rows] = top.values[:, :width]
        self.tau[rows] = top.values[:, width] if width < n else -math.inf
        self.cand_x[rows] = self.x[rows[:, None], self.cand[rows]]
        self.cand_sq[rows] = self.sq[rows[:, None], self.cand[rows], None]
