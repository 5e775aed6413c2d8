"""Process-group set-up and the collectives the algorithms use.

``init`` finds out who started this process and starts ``torch.distributed`` (nccl on CUDA, gloo on
CPU):

* **torchrun** (external, or ``launcher=torchrun``): its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT are used as they are.
* **SLURM** (``srun`` with several tasks, which is what ``launcher=slurm`` runs): rank, local rank and
  world size from SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS; the master is the first host of
  the job's node list; the port is ``dist.port``, else $PORT / $MASTER_PORT, else one derived from the
  job id in 20000-60000 (submitit's rule), so that two jobs on one node do not collide.
* otherwise a plain single process.

A master port that another process holds gives one line naming ``dist.port=`` as the fix. On CUDA the
local rank picks the GPU. Every collective below is a no-op (or the identity) when there is one
process, so algorithms with memory banks or clustering (ODC) run unchanged in one process.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
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
    launched_by: str = "local"  # local | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` as a torch device (``cuda`` = this process's local GPU)."""
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
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one process per GPU"
                )
            return torch.device(f"cuda:{local_rank}")
        return torch.device(device)
    raise ConfigError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, addr: str = "") -> bool:
    """Whether binding ``port`` here fails (another process listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr if addr not in ("localhost", "127.0.0.1") else "", port))
        except OSError:
            return True
    return False


def port_in_use_error(port: int | str) -> ConfigError:
    return ConfigError(
        f"port {port} is already in use (another job on this machine?); give this run its own port with "
        f"dist.port=<port>, e.g. dist.port={free_port()}"
    )


def configured_port(port: int | None) -> tuple[int | None, str]:
    """``dist.port``, else $PORT, else $MASTER_PORT (None if none is set), and where it came from."""
    if port is not None:
        return port, "dist.port"
    for name in ("PORT", "MASTER_PORT"):
        value = os.environ.get(name)
        if value:
            if not value.isdigit() or not 1 <= int(value) <= 65535:
                raise ConfigError(f"environment variable {name}={value!r} is not a port number (1-65535)")
            return int(value), f"${name}"
    return None, ""


def _slurm_world() -> int:
    """Tasks of this srun step (1 outside a step: a batch script's own shell, an interactive salloc)."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)


def slurm_job_port(job_id: str) -> int:
    """The port a SLURM job uses when none is set: drawn in 20000-60000 from the job id, the rule of
    submitit's ``TorchDistributedEnvironment``, so two jobs on one node (almost) never collide."""
    return random.Random(job_id).randint(20000, 60000)


def _export_slurm_env(addr: str | None, port: int | None) -> None:
    """Set torch's env:// variables from SLURM's, in any srun step (submitit's or the user's own);
    submitit parses the node list (``node[03-04]`` -> node03, node04)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    slurm = SlurmJobEnvironment()
    chosen, _ = configured_port(port)
    world = _slurm_world()
    nodes = int(os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1)
    os.environ.update(
        RANK=str(int(os.environ["SLURM_PROCID"])),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(int(os.environ.get("SLURM_LOCALID", "0"))),
        LOCAL_WORLD_SIZE=str(max(1, world // max(1, nodes))),
        MASTER_ADDR=addr or slurm.hostnames[0],
        MASTER_PORT=str(chosen if chosen is not None else slurm_job_port(slurm.job_id)),
    )


def launcher_of_this_process() -> str:
    """``torchrun`` when torchrun's variables are set, ``slurm`` inside an srun step of several tasks,
    else ``local``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and _slurm_world() > 1:
        return "slurm"
    return "local"


def init(
    device: str = "auto",
    backend: str = "auto",
    timeout_s: int = 1800,
    addr: str | None = None,
    port: int | None = None,
) -> DistEnv:
    """Start the process group if torchrun or SLURM started several processes; pick the device.

    ``addr`` / ``port`` (``dist.addr`` / ``dist.port``) only matter under SLURM: torchrun has already
    chosen its own (``launcher=torchrun`` passes them to it)."""
    launched_by = launcher_of_this_process()
    if launched_by == "slurm" and not dist.is_initialized():
        _export_slurm_env(addr, port)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if backend == "nccl" else None,
            )
        except dist.DistNetworkError as e:
            if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
                raise port_in_use_error(os.environ.get("MASTER_PORT", "?")) from None
            raise
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, launched_by=launched_by)


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
    """``dist``: the process group's backend, its rendezvous address and port, and how long a collective
    may wait."""

    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800
    # node 0's address for several machines (launcher=torchrun): None = $MASTER_ADDR, else this machine
    addr: str | None = None
    # this job's rendezvous port: None = $PORT or $MASTER_PORT, else picked (a free one locally, one
    # derived from the job id on SLURM); two jobs on one machine need different ports
    port: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"dist.backend={self.backend!r} must be auto, nccl or gloo")
        if not self.timeout_s >= 1:
            raise ConfigError(f"dist.timeout_s must be >= 1 (seconds a collective may wait), got {self.timeout_s}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError(f"dist.port must be a TCP port number in 1-65535, got {self.port}")
