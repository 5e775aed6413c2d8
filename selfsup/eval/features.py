"""Feature extraction over a whole dataset, sharded over ranks and gathered back in order."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from selfsup import distributed
from selfsup.data.datasets import ImageDataset
from selfsup.data.views import MultiViewDataset, Normalize


@torch.no_grad()
def extract_features(
    fn: Callable[[Tensor], Tensor],
    dataset: ImageDataset,
    normalize: Normalize,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> tuple[Tensor, Tensor]:
    """(features [N, D] float32, labels [N]) on the device, row i = dataset item i, on every rank.

    Images go through the dataset's deterministic ``eval_transform``. Each rank processes its shard;
    the shards are all-gathered with their indices (DistributedSampler's padding repeats a few
    items, which land on the same rows).
    """
    views = MultiViewDataset(dataset, [dataset.eval_transform()])
    world = distributed.get_world_size()
    sampler = DistributedSampler(views, shuffle=False, drop_last=False) if world > 1 else SequentialSampler(views)
    loader = DataLoader(
        views, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=torch.Generator()
    )
    feats: Tensor | None = None
    labels = torch.full((len(dataset),), -1, dtype=torch.long, device=normalize.device)
    for batch in loader:
        with autocast() if autocast is not None else nullcontext():
            f = fn(normalize(batch["views"][0])).float()
        index = distributed.all_gather(batch["index"].to(normalize.device))
        f = distributed.all_gather(f)
        if feats is None:
            feats = torch.zeros(len(dataset), f.shape[1], device=normalize.device)
        feats[index] = f
        labels[index] = distributed.all_gather(batch["label"].to(normalize.device))
    if feats is None:
        raise ValueError("cannot extract features of an empty dataset")
    return feats, labels
