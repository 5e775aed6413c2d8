"""The training loader: shuffled and sharded over ranks, each item augmented with its own seed.

Item i of epoch e is augmented with seed f(seed, e, i) whatever the process, the DataLoader worker,
the number of workers or an interruption in between, so resumed runs and runs with another number
of workers see exactly the same views.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from selfsup.data.views import MultiViewDataset
from selfsup.errors import ConfigError


@dataclass
class LoaderConfig:
    """``loader``: DataLoader processes per rank and their buffering."""

    num_workers: int | None = None  # None = auto: 0 on the CPU, up to 8 per GPU process
    pin_memory: bool = True  # only used on CUDA
    persistent_workers: bool = True
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if self.num_workers is not None and not self.num_workers >= 0:
            raise ConfigError(f"loader.num_workers must be >= 0 or null (auto), got {self.num_workers}")
        if not self.prefetch_factor >= 1:
            raise ConfigError(
                f"loader.prefetch_factor must be >= 1 (batches buffered per worker), got {self.prefetch_factor}"
            )


class SeededSampler(DistributedSampler):
    """DistributedSampler (shuffle by seed + epoch, drop the tail so every rank gets the same
    number of distinct images) that also hands each item its own augmentation seed. ``start`` skips
    the first items of this rank's share of the epoch (a run resumed in the middle of an epoch).

    An algorithm may give the epoch's order itself (``order``, :meth:`Algorithm.epoch_indices`: N dataset
    indices, repeats allowed): it replaces the permutation, is sharded the same way (tail dropped to a
    multiple of the world size, rank r takes positions r, r + world, ...), and the item at global position
    p is seeded by (seed, epoch, p), so an image drawn twice in one epoch gets two different views."""

    def __init__(self, *args: Any, start: int = 0, order: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = start
        if order is not None:
            n = len(self.dataset)  # type: ignore[arg-type]
            if order.dim() != 1 or order.dtype != torch.long or len(order) != n:
                raise ValueError(
                    f"an epoch order must be a 1-D int64 tensor of {n} dataset indices (one per training image), "
                    f"got shape {tuple(order.shape)} and dtype {order.dtype}"
                )
            if n and (int(order.min()) < 0 or int(order.max()) >= n):
                raise ValueError(f"an epoch order holds indices outside [0, {n})")
        self.order = order

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        if self.order is None:
            for i in itertools.islice(super().__iter__(), self.start, None):
                yield i, (base + i) % 2**63
            return
        total = self.num_samples * self.num_replicas  # drop_last: a multiple of the world size
        positions = range(self.rank, total, self.num_replicas)
        order = self.order.tolist()
        for p in itertools.islice(positions, self.start, None):
            yield order[p], (base + (p + 1) * 1_000_000_007 + order[p]) % 2**63


class SeededViews(MultiViewDataset):
    """MultiViewDataset that takes ``(index, seed)`` keys from :class:`SeededSampler`."""

    def __getitem__(self, key: Any) -> dict[str, Any]:
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return super().__getitem__(i)


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Loader processes per rank: as configured, or 0 on the CPU (the CPU is busy computing) and
    min(8, cores per local process - 1) on a GPU."""
    if workers is not None:  # >= 0: LoaderConfig
        return int(workers)
    if device.type == "cpu":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


def train_loader(
    views: SeededViews,
    cfg: LoaderConfig,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    workers: int,
    device: torch.device,
    skip_batches: int = 0,
    order: torch.Tensor | None = None,
) -> DataLoader:
    """The loader of ``epoch``: this rank's shard of a seeded permutation (or of the algorithm's
    ``order``), whole batches only, from batch ``skip_batches`` on (the same batches and views an
    uninterrupted epoch would have had)."""
    sampler = SeededSampler(
        views,
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
        start=skip_batches * batch_size,
        order=order,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        views,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=cfg.pin_memory and device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed + epoch),
    )
