"""Memories of past features: MoCo's queue of keys and NPID's memory bank of every training image.

Both keep their contents in registered buffers, so they are saved in checkpoints and restored on resume, and
both are updated with the *global* batch (``selfsup.distributed.all_gather``): every rank applies the same
update to the same contents, so the copies of the memory on different ranks stay identical. Their initial
contents are drawn from torch's global RNG at construction (as MoCo and MMSelfSup do); the trainer seeds it
identically on every rank before building the model, so the ranks start from the same contents too. In one
process the gathers are the identity.

Mixed precision: features are stored and updated in float32, whatever the dtype of the incoming features
(bf16/fp16 under autocast), so the memory does not lose precision step after step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.errors import ConfigError


def _positive_int(value: int, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner} needs {name} >= 1 (an integer), got {value!r}")
    return value


def _random_unit_rows(n: int, dim: int) -> Tensor:
    """[n, dim] L2-normalised standard-normal rows from the global RNG (MoCo's and MMSelfSup's initialisation)."""
    return F.normalize(torch.randn(n, dim), dim=1)


class Queue(nn.Module):
    """MoCo's dictionary as a queue (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning", Sec. 3.1 "Dictionary as a queue"): the keys of the most recent mini-batches, first in, first out.

    Buffers (in ``state_dict``, so they survive a resume):
        ``features`` [size, dim] float32: the keys, initialised with L2-normalised ``randn`` from the global RNG
            (MoCo's ``normalize(randn(dim, K))``, stored transposed here: one key per row);
        ``ptr`` long scalar: the row the next key is written to; rows ``ptr, ptr+1, ...`` (mod size) are the
            oldest.

    ``enqueue(keys)`` all-gathers the keys of every rank (rank order), writes them at ``ptr`` and advances it,
    so the newest ``size`` keys of the global stream are kept. Official MoCo requires ``size`` to be a multiple
    of the global batch (``assert K % batch_size == 0``); here any size works: a batch that runs past the end
    wraps around to row 0, and a batch larger than the queue leaves its last ``size`` keys. Rows are slots,
    not ages: the contrastive loss does not depend on the order of its negatives.

    ``forward()`` returns a copy of the contents (MoCo's ``queue.clone().detach()``): the logits against the
    queue keep it for the backward pass, and ``enqueue`` before ``backward()`` would otherwise modify a tensor
    autograd saved. ``.features`` is the buffer itself.
    """

    features: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        _positive_int(size, "size", "Queue")
        _positive_int(dim, "dim", "Queue")
        self.register_buffer("features", _random_unit_rows(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def forward(self) -> Tensor:
        """The current contents [size, dim], a detached copy (safe to use in a loss before the next enqueue)."""
        return self.features.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Append the global batch of ``keys`` ([n, dim] on every rank, the same n on every rank), oldest rows
        overwritten first. Keys are stored as given (MoCo L2-normalises them before), detached, as float32
        (bf16/fp16 keys are converted exactly)."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"Queue.enqueue expects keys of shape [n, {self.dim}] (one key per row), got {tuple(keys.shape)}"
            )
        keys = distributed.all_gather(keys.detach().to(device=self.features.device, dtype=torch.float32))
        n, size = keys.shape[0], self.size
        if n == 0:
            return
        keep = min(n, size)  # of a batch longer than the queue, only the last `size` keys survive
        slots = (self.ptr + (n - keep) + torch.arange(keep, device=self.ptr.device)) % size
        self.features.index_copy_(0, slots, keys[n - keep :].to(self.features.dtype))
        self.ptr.copy_((self.ptr + n) % size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


class MemoryBank(nn.Module):
    """NPID's memory bank (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", Sec. 3.1 "Learning with a memory bank"): one L2-normalised feature per training image,
    the non-parametric class prototypes that the instance-discrimination loss compares against.

    Update of the entries ``i`` of a batch with features ``f_i`` (MMSelfSup's ``SimpleMemory``)::

        v_i <- L2norm((1 - momentum) * v_i + momentum * L2norm(f_i))

    ``momentum`` weighs the NEW feature. NPID's own code (lemniscate.pytorch, ``--nce-m 0.5``; the paper
    writes the plain replacement f_i -> v_i in Sec. 3.1 and stabilises training with a proximal term in the
    loss, Sec. 3.3) uses the opposite convention, ``v_i <- L2norm(m * v_i + (1 - m) * f_i)`` where ``m`` weighs
    the OLD entry: NPID's m is ``1 - momentum`` here. At the default 0.5 both are the same; momentum = 1
    replaces the entry with the new feature, momentum = 0 never changes it.

    Buffer (in ``state_dict``): ``features`` [num_samples, dim] float32, initialised with L2-normalised
    ``randn`` from the global RNG (MMSelfSup; NPID draws "random unit vectors" too).
    """

    features: Tensor

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        _positive_int(num_samples, "num_samples", "MemoryBank")
        _positive_int(dim, "dim", "MemoryBank")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ConfigError(
                f"MemoryBank momentum={momentum!r} must be in [0, 1]; it weighs the new feature: "
                "v <- L2norm((1 - momentum) * v + momentum * f) (NPID/MMSelfSup use 0.5)"
            )
        self.momentum = float(momentum)
        self.register_buffer("features", _random_unit_rows(num_samples, dim))

    @property
    def num_samples(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @torch.no_grad()
    def update(self, index: Tensor, features: Tensor) -> None:
        """Momentum-update the entries ``index`` ([n] dataset indices) with ``features`` ([n, dim], any float
        dtype) of this rank's batch, after gathering index and features from every rank (the same n on every
        rank). Computed in float32 with autocast off. An index that occurs more than once in the global batch
        (e.g. DistributedSampler padding) is updated once, from the old entry and its last feature in rank
        order, so every rank writes the same values.

        Raises:
            ValueError: ``index`` is not a 1-D integer tensor, ``features`` is not [len(index), dim], or an
                index (of any rank) is outside [0, num_samples).
        """
        if index.dim() != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(
                f"MemoryBank.update expects index as a 1-D integer tensor of dataset indices, got shape "
                f"{tuple(index.shape)} and dtype {index.dtype}"
            )
        if features.dim() != 2 or features.shape != (index.shape[0], self.dim):
            raise ValueError(
                f"MemoryBank.update expects features of shape [len(index), dim] = [{index.shape[0]}, {self.dim}], "
                f"got {tuple(features.shape)}"
            )
        device = self.features.device
        index = distributed.all_gather(index.to(device=device, dtype=torch.long))
        features = distributed.all_gather(features.detach().to(device=device, dtype=torch.float32))
        if index.numel() == 0:
            return
        lo, hi = int(index.min()), int(index.max())  # checked after the gather: every rank raises together
        if lo < 0 or hi >= self.num_samples:
            raise ValueError(
                f"MemoryBank.update got dataset index {lo if lo < 0 else hi} outside [0, {self.num_samples}); "
                "the bank needs one row per training image: build it with num_samples=len(train set) and pass "
                "the dataset indices of the batch"
            )
        with torch.autocast(device_type=device.type, enabled=False):
            unique, inverse = torch.unique(index, return_inverse=True)
            if len(unique) < len(index):  # keep the last occurrence of each index
                order = torch.arange(len(index), device=device)
                last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, order, reduce="amax")
                index, features = unique, features[last]
            new = F.normalize(features, dim=1)
            mixed = (1.0 - self.momentum) * self.features[index] + self.momentum * new
            self.features[index] = F.normalize(mixed, dim=1)

    def sample_negatives(self, num: int, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Indices [batch, num] of negatives drawn uniformly (with replacement) over the bank with torch's RNG
        (``generator``, else the global one): NPID's uniform noise distribution P_n = 1/N (Sec. 3.2), as
        MMSelfSup's ``torch.randint``. A draw may hit the sample itself (probability 1/N per draw; NPID and
        MMSelfSup do not exclude it either). On the bank's device.

        Raises:
            ConfigError: ``num < 1``.
            ValueError: ``batch < 0``.
        """
        _positive_int(num, "num (negatives per sample)", "MemoryBank.sample_negatives")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ValueError(f"MemoryBank.sample_negatives needs batch >= 0 (the batch size), got {batch!r}")
        device = generator.device if generator is not None else self.features.device
        idx = torch.randint(self.num_samples, (batch, num), generator=generator, device=device)
        return idx.to(self.features.device)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, dim={self.dim}, momentum={self.momentum}"
