"""NT-Xent, the contrastive loss of SimCLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (Chen et al., "A Simple Framework for
    Contrastive Learning of Visual Representations", ICML 2020, Eq. 1 and Algorithm 1).

    For a batch of N images seen in two views, let z_1..z_2N be the embeddings and
    ``s_ij = z_i . z_j / (|z_i| |z_j|)``. For a positive pair (i, j)::

        l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) )
        L = 1 / (2N) * sum over the 2N anchors i of l(i, pos(i))

    Every other embedding of the batch (2N - 2 of them) is a negative.

    Distributed: the N images are the *global* batch. Each rank gathers all embeddings with
    gradients (``all_gather_with_grad``) and averages ``l`` over its own 2n anchors; DDP's average
    of those per-rank losses is L, and its averaged gradients equal the single-process gradients.
    With one process this is plain SimCLR. (MMSelfSup's ``GatherLayer`` returns only the local slice
    of the gradient, so after DDP's averaging its gradient is dL/N for N processes; the official
    SimCLR code's is 2 dL. LARS cancels most of that scale, except on the BN weights and biases it
    excludes from adaptation; selfsup keeps the exact gradient.)

    Args:
        temperature: t > 0 (SimCLR: 0.1 for large batches, 0.5 for CIFAR-size runs).
        gather_distributed: use negatives from every rank (default) or only the local batch.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: [n, d] embeddings of the two views of the same n images (row i <-> row i)."""
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two [n, d] tensors of the same shape, got {z1.shape}, {z2.shape}")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1 = F.normalize(z1.float(), dim=1)
            z2 = F.normalize(z2.float(), dim=1)
            n = z1.shape[0]
            if self.gather_distributed:
                z1_all = distributed.all_gather_with_grad(z1)
                z2_all = distributed.all_gather_with_grad(z2)
                offset = distributed.get_rank() * n
            else:
                z1_all, z2_all, offset = z1, z2, 0
            big_n = z1_all.shape[0]
            anchors = torch.cat([z1, z2])  # [2n, d]
            candidates = torch.cat([z1_all, z2_all])  # [2N, d]
            logits = anchors @ candidates.T / self.temperature  # [2n, 2N]
            local = torch.arange(n, device=z1.device) + offset
            self_idx = torch.cat([local, local + big_n])
            pos_idx = torch.cat([local + big_n, local])
            rows = torch.arange(2 * n, device=z1.device)
            logits[rows, self_idx] = float("-inf")  # an anchor is not its own negative
            return F.cross_entropy(logits, pos_idx)
