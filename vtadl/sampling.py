"""What a training step draws: the batches of an epoch, the flips and the token noise, all
drawn for the global batch from the seed, so that a run's numbers do not depend on the
number of workers it is spread over."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from vtadl.devices import to_device


class EpochBatches(Sampler[list[int]]):
    """Global batches of a seeded permutation per epoch; each worker takes its slice.

    Worker r of w gets items r, r+w, ... of each global batch, so the workers of a
    distributed run see exactly the global batches a single process would see, whatever
    their number. Call `set_epoch` before iterating.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        # A last partial batch is dropped, unless it is the only one.
        self.n_batches = max(1, n // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen)
        return [
            perm[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.n_batches)
        ]

    def __iter__(self):
        for batch in self.batches():
            yield batch[self.rank :: self.world].tolist()

    def __len__(self) -> int:
        return self.n_batches


def _step_generator(seed: int, epoch: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_019 + epoch * 10_007 + step + (stream << 40))


def flips(seed: int, epoch: int, step: int, batch: int, rank: int, world: int) -> torch.Tensor:
    """Horizontal and vertical flip decisions (2, local batch) for one step, drawn for the
    global batch so that they do not depend on the number of workers."""
    gen = _step_generator(seed, epoch, step, stream=0)
    return (torch.rand(2, batch, generator=gen) < 0.5)[:, rank::world]


def token_noise(
    shape: tuple[int, int], seed: int, epoch: int, step: int, batch: int, rank: int, world: int
) -> torch.Tensor:
    """Standard normal noise (local batch, tokens, dim) for the tokens of one step, drawn for
    the global batch like the flips: worker r of w takes rows r, r+w, ..."""
    gen = _step_generator(seed, epoch, step, stream=1)
    return torch.randn(batch, *shape, generator=gen)[rank::world]


def augment(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    flips = to_device(flips[:, : len(images), None, None, None], images.device)
    images = torch.where(flips[0], images.flip(3), images)
    return torch.where(flips[1], images.flip(2), images)
