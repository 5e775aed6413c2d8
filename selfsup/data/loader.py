"""The training loader: shuffled and sharded over ranks, each item augmented with its own seed.

Item i of epoch e is augmented with seed f(seed, e, i) whatever the process, the DataLoader worker,
the number of workers or an interruption in between, so resumed runs and runs with another number
of workers see exactly the same views.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from selfsup.data.batched import BatchedViews
from selfsup.data.datasets import Cache, InMemoryImages
from selfsup.data.views import MultiViewDataset
from selfsup.errors import ConfigError, DataError


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


class Executor(str, Enum):
    """Who builds the views: torchvision per image in the loader (the reference), or
    :class:`~selfsup.data.batched.BatchedViews` on whole batches on the device."""

    per_sample = "per_sample"
    batched = "batched"


class Decode(str, Enum):
    """Where the JPEGs of an image folder read through workers (``dataset.cache=none``) are decoded: by PIL in
    the workers, or as a batch by ``torchvision.io.decode_jpeg`` on the training device (nvJPEG on CUDA), the
    workers only reading the files' bytes."""

    cpu = "cpu"
    device = "device"


@dataclass
class DataConfig:
    """``data``: how the training views are made (``dataset.cache``: where the images live)."""

    executor: Executor = Executor.batched
    decode: Decode = Decode.cpu


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


class SeededCrops(Dataset):
    """``data.executor=batched`` with ``dataset.cache=none``: a worker decodes item i and cuts each of its views
    to the view's size (the geometric part of :class:`~selfsup.data.batched.BatchedViews`, drawn from the same
    per-image streams), which shrinks what crosses to the device; the device runs the rest on the batch.
    Takes ``(index, seed)`` keys from :class:`SeededSampler`; item = {"crops": [uint8 [3, s, s] per view run],
    "seeds": seed, "index": i, "label": label}."""

    def __init__(self, base: Any, executor: BatchedViews) -> None:
        self.base, self.executor = base, executor

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        i, seed = key
        image, label, index = self.base[i]
        return {"crops": self.executor.crops(image, seed), "seeds": seed, "index": index, "label": label}


class SeededFiles(Dataset):
    """``data.decode=device``: a worker only reads item i's file (its bytes, uint8 [n]); the device decodes the
    batch and the batched executor cuts and colours the views there. Item = {"data", "seeds", "index", "label"};
    batch them with :func:`collate_files` (files differ in length)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        from torchvision.io import read_file

        i, seed = key
        path, label = self.base.samples[i]
        return {"data": read_file(path), "seeds": seed, "index": i, "label": label}


def collate_files(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`SeededFiles` items: the files' bytes end to end in one uint8 tensor ("data", split it
    with "lengths"), the rest as tensors. One block per batch crosses from a worker, and a copy: the tensors of
    ``read_file`` are backed by the file itself and cannot be shared with another process."""
    return {
        "data": torch.cat([r["data"] for r in rows]),
        "lengths": torch.tensor([len(r["data"]) for r in rows], dtype=torch.long),
        "seeds": torch.tensor([r["seeds"] for r in rows], dtype=torch.long),
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),
    }


def decode_files(data: list[Tensor], device: torch.device, path_of: Callable[[int], str]) -> list[Tensor]:
    """uint8 [3, H, W] RGB images on ``device`` from JPEG bytes (one ``decode_jpeg`` call for the batch).
    ``path_of(i)`` names the batch's i-th file; it is asked only when a file cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        for i, d in enumerate(data):  # name the file
            try:
                decode_jpeg(d, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise DataError(
                    f"data.decode=device decodes JPEG files only and cannot read {path_of(i)} ({e}); convert it to "
                    "JPEG, remove it, or use data.decode=cpu"
                ) from None
        raise


class ResidentLoader:
    """``dataset.cache=memory|device``: the epoch's batches straight from one uint8 tensor [N, 3, S, S] (in RAM or
    on the device): the sampler's (index, seed) pairs in groups of ``batch_size`` (whole batches only), no
    workers, no decoding. Batch = {"images": uint8 [B, 3, S, S], "seeds": int64 [B], "index", "label"}."""

    def __init__(self, images: Tensor, labels: Tensor, sampler: SeededSampler, batch_size: int) -> None:
        self.images, self.labels, self.sampler, self.batch_size = images, labels, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        keys = iter(self.sampler)
        while True:
            chunk = list(itertools.islice(keys, self.batch_size))
            if len(chunk) < self.batch_size:
                return
            index = torch.tensor([i for i, _ in chunk], dtype=torch.long)
            seeds = torch.tensor([s for _, s in chunk], dtype=torch.long)
            rows = index
            if self.images.is_cuda:  # pinned, so that the copies do not wait for the GPU's queue
                index, seeds = index.pin_memory(), seeds.pin_memory()
                rows = index.to(self.images.device, non_blocking=True)
            yield {"images": self.images[rows], "seeds": seeds, "index": index, "label": self.labels[rows]}


def resolve_cache(cache: Cache, dataset: Any, device: torch.device, executor: Executor) -> Cache:
    """``dataset.cache`` made concrete: ``auto`` keeps a dataset that is in memory anyway there (on the device on
    CUDA) and reads others through workers; ``device`` on the CPU is ``memory``. The per-sample executor reads
    through the DataLoader only."""
    if cache is Cache.auto:
        if executor is Executor.per_sample or not isinstance(dataset, InMemoryImages):
            return Cache.none
        return Cache.device if device.type == "cuda" else Cache.memory
    if executor is Executor.per_sample and cache is not Cache.none:
        raise ConfigError(
            f"dataset.cache={cache.value} needs data.executor=batched (the per-sample executor augments in "
            "DataLoader workers); use data.executor=batched or dataset.cache=none"
        )
    return Cache.memory if cache is Cache.device and device.type != "cuda" else cache


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Loader processes per rank: as configured, or 0 on the CPU (the CPU is busy computing) and
    min(8, cores per local process - 1) on a GPU."""
    if workers is not None:  # >= 0: LoaderConfig
        return int(workers)
    if device.type == "cpu":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


def epoch_sampler(
    num_samples: int,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    skip_batches: int = 0,
    order: torch.Tensor | None = None,
) -> SeededSampler:
    """This rank's (index, seed) keys of ``epoch``: a shard of a seeded permutation (or of the algorithm's
    ``order``), from batch ``skip_batches`` on."""
    sampler = SeededSampler(
        range(num_samples),  # only its length is used
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
        start=skip_batches * batch_size,
        order=order,
    )
    sampler.set_epoch(epoch)
    return sampler


def train_loader(
    views: Dataset,
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
    collate_fn: Any = None,
) -> DataLoader:
    """The loader of ``epoch`` over a dataset taking ``(index, seed)`` keys (:class:`SeededViews`,
    :class:`SeededCrops`, :class:`SeededFiles` with ``collate_fn=collate_files``): this rank's shard of a
    seeded permutation (or of the algorithm's ``order``), whole batches only, from batch ``skip_batches`` on
    (the same batches and views an uninterrupted epoch would have had)."""
    sampler = epoch_sampler(len(views), batch_size, epoch, seed, rank, world_size, skip_batches, order)  # type: ignore[arg-type]
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
        collate_fn=collate_fn,
    )
