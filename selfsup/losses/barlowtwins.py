"""Barlow Twins' redundancy-reduction loss on the cross-correlation of two views' embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup import distributed


class BarlowTwinsLoss(nn.Module):
    """Cross-correlation loss (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021, Eq. 1-2 and Algorithm 1).

    For the embeddings z1, z2 [N, D] of the two views of N images, each dimension standardised over the
    batch (a BatchNorm without affine parameters: mean 0, biased variance, ``eps`` 1e-5)::

        zA = (z1 - mean(z1)) / sqrt(var(z1) + eps)         zB likewise from z2      (per column)
        C = zA^T zB / N                                    [D, D], C_ij in [-1, 1] (up to eps)
        L = sum_i (1 - C_ii)^2  +  lambd * sum_i sum_{j != i} C_ij^2

    Distributed: N is the *global* batch. Every rank gathers all embeddings with gradients
    (``all_gather_with_grad``) and computes the same L on the global batch, so its statistics and C are
    those of one process with the whole batch, and after DDP's gradient averaging the gradients are
    exactly the 1-process ones (the gather's backward sums the W identical losses' gradients, DDP divides
    by W). The official code instead runs a SyncBatchNorm, divides its local C by N and all-reduces it
    without a gradient, which leaves the gradient 1/W of the exact one (LARS cancels most of that scale,
    except on the biases and BN parameters it excludes). Gathering costs every rank the full D x D x N
    product, which is small next to the backbone's step.

    No loss scale: the official code's early ``--scale-loss 0.024`` became its bias/BN learning rate
    (0.0048 = 0.024 x 0.2), as in MMSelfSup's ``lr_mult=0.024`` on biases and BN; MMSelfSup 1.x's
    ``CrossCorrelationLoss`` has only ``lambd``.

    Computed in at least float32, outside autocast (C is a sum over the batch of products of
    standardised values; in bf16 its entries would keep ~3 digits).

    Args:
        lambd: weight of the off-diagonal (redundancy-reduction) term; 0.0051, the official code's and
            MMSelfSup's default.
        eps: added to the variance (BatchNorm1d's default).
        gather_distributed: statistics and C over the global batch (default) or each rank's own batch.
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5, gather_distributed: bool = True) -> None:
        super().__init__()
        if not lambd >= 0:
            raise ValueError(f"lambd must be >= 0 (the weight of the off-diagonal term), got {lambd}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.lambd = lambd
        self.eps = eps
        self.gather_distributed = gather_distributed

    def standardize(self, z: Tensor) -> Tensor:
        """Each column to mean 0 and (biased) variance 1 over the rows: BatchNorm1d(affine=False), training."""
        mean = z.mean(dim=0)
        var = z.var(dim=0, unbiased=False)
        return (z - mean) / torch.sqrt(var + self.eps)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: [n, D] embeddings of the two views of the same n images (row i <-> row i)."""
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two [n, D] tensors of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
        dtype = torch.promote_types(z1.dtype, torch.float32)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.to(dtype), z2.to(dtype)
            if self.gather_distributed:
                z1, z2 = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
            n = z1.shape[0]
            if n < 2:
                raise ValueError(f"Barlow Twins needs at least 2 images in the batch for its statistics, got {n}")
            c = self.standardize(z1).T @ self.standardize(z2) / n  # [D, D]
            on_diag = (1 - c.diagonal()).pow(2).sum()
            c2 = c.pow(2)
            off_diag = c2.sum() - c2.diagonal().sum()
            return on_diag + self.lambd * off_diag
