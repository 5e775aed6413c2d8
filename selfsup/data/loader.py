"""The training loader: shuffled and sharded over ranks, each item augmented with its own seed.

Item i of epoch e is augmented with seed f(seed, e, i) whatever the process, the DataLoader worker,
the number of workers or an interruption in between, so resumed runs and runs with another number
of workers see exactly the same views.
"""

from __future__ import annotations

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


class SeededSampler(DistributedSampler):
    """DistributedSampler (shuffle by seed + epoch, drop the tail so every rank gets the same
    number of distinct images) that also hands each item its own augmentation seed."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in super().__iter__():
            yield i, (base + i) % 2**63


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
    if workers is not None:
        if workers < 0:
            raise ConfigError(f"loader.num_workers must be >= 0 or null (auto), got {workers}")
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
) -> DataLoader:
    """The loader of ``epoch``: this rank's shard of a seeded permutation, whole batches only."""
    sampler = SeededSampler(views, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
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
