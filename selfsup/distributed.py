"""Process-group set-up and the collectives the algorithms use.

``init`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
starts ``torch.distributed`` (nccl on CUDA, gloo on CPU); without those variables it is a plain
single process. Every collective below is a no-op (or the identity) when there is one process, so
algorithms with memory banks or clustering (ODC) run unchanged in one process, on CPU or one GPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from selfsup.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device} but CUDA is not available (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use device=cpu or device=auto"
            )
        return torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    raise ConfigError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")


def init(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Start the process group if launched by torchrun (or SLURM via torchrun); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (same shape on every rank); no gradient."""
    if get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    torch has this as ``torch.distributed.nn.functional.all_gather`` (deprecated in 2.14) and as
    private ``_functional_collectives`` helpers whose names change between releases; this uses
    only the stable ``all_gather`` / ``all_reduce``, which every backend (nccl, gloo) supports.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (same shape on every rank) with gradients flowing back to every rank.

    The backward pass sums the incoming gradients over ranks, so with DDP's gradient averaging a
    loss averaged over ranks gets exactly the single-process gradient of the same global batch.
    """
    if get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s copy (in place)."""
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


@torch.no_grad()
def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or average with op="mean") ``tensor`` over ranks, in place."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= get_world_size()
    return tensor


# ---------------------------------------------------------------------------------------------- shuffling BN
def batch_shuffle(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffling BN (He et al. 2020, Sec. 3.3; official ``_batch_shuffle_ddp``): this rank's slice of
    the global batch permuted by one random permutation, and the index that undoes it.

    The local batches ``x`` [n, ...] of all ranks are gathered in rank order into the global batch [world * n, ...];
    one permutation ``perm`` of the global batch is drawn with ``torch.randperm`` (``generator``, else torch's
    global RNG) and rank 0's is broadcast, so every rank uses the same one (every rank draws, as the official code
    does, so the RNG streams of all ranks advance alike); rank r returns rows ``perm[r * n : (r + 1) * n]`` of the
    global batch and ``argsort(perm)`` [world * n], to pass to :func:`batch_unshuffle`. Batch statistics computed on
    the shuffled slices then mix samples of different ranks, so the key encoder's BatchNorm cannot leak which
    query/key pair sits on which device. In one process: ``(x[perm], argsort(perm))`` for a permutation of x's rows.

    Requires the same local batch size n on every rank (a DistributedSampler with drop_last, as MoCo uses):
    the gather cannot check it without an extra collective. Gradients flow back to each rank's rows
    (:func:`all_gather_with_grad`); MoCo applies it to the momentum encoder, under no_grad.

    Raises:
        ValueError: ``x`` is a 0-d tensor.
    """
    if x.dim() == 0:
        raise ValueError("batch_shuffle expects a batch [n, ...] with the samples along dim 0, got a 0-d tensor")
    n, rank = x.shape[0], get_rank()
    gathered = all_gather_with_grad(x)
    device = generator.device if generator is not None else x.device
    perm = torch.randperm(gathered.shape[0], generator=generator, device=device).to(x.device)
    broadcast_(perm, src=0)
    return gathered[perm[rank * n : (rank + 1) * n]], torch.argsort(perm)


def batch_unshuffle(x: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`batch_shuffle` (MoCo's ``_batch_unshuffle_ddp``): gathers the shuffled slices of every
    rank [world * n, ...] and returns rank r the rows ``unshuffle_index[r * n : (r + 1) * n]``, i.e. the outputs
    that belong to its original samples, in their original order. ``x`` is [n, ...] on every rank (the same n),
    typically the key encoder's output for the shuffled inputs; ``unshuffle_index`` is the second value that
    ``batch_shuffle`` returned. Gradients flow as in :func:`all_gather_with_grad`.

    Raises:
        ValueError: ``x`` is 0-d, or ``unshuffle_index`` is not a 1-D integer tensor of world_size * n entries.
    """
    if x.dim() == 0:
        raise ValueError("batch_unshuffle expects a batch [n, ...] with the samples along dim 0, got a 0-d tensor")
    n, world, rank = x.shape[0], get_world_size(), get_rank()
    if unshuffle_index.dim() != 1 or unshuffle_index.numel() != world * n or unshuffle_index.is_floating_point():
        raise ValueError(
            f"batch_unshuffle expects the unshuffle index that batch_shuffle returned: an integer tensor of "
            f"world_size * n = {world} * {n} = {world * n} entries, got shape {tuple(unshuffle_index.shape)} and dtype "
            f"{unshuffle_index.dtype}; pass x with the same number of rows that was shuffled"
        )
    gathered = all_gather_with_grad(x)
    return gathered[unshuffle_index.to(x.device)[rank * n : (rank + 1) * n]]


@dataclass
class DistConfig:
    """``dist``: the process group's backend and how long a collective may wait."""

    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"dist.backend={self.backend!r} must be auto, nccl or gloo")
        if not self.timeout_s >= 1:
            raise ConfigError(f"dist.timeout_s must be >= 1 (seconds a collective may wait), got {self.timeout_s}")
