"""VICReg's variance-invariance-covariance loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed


class VICRegLoss(nn.Module):
    """Variance-Invariance-Covariance Regularization (Bardes, Ponce & LeCun, "VICReg", ICLR 2022,
    Eq. 1-6 and Algorithm 1; weights and averages as the official ``main_vicreg.py``).

    For the embeddings z1, z2 [N, D] of two views of N images::

        s = mean_{i,k} (z1_ik - z2_ik)^2                                  invariance (MSE)
        v = mean_k relu(1 - sqrt(Var(z1_k) + eps)) / 2  +  same for z2    variance hinge (unbiased Var)
        c = sum_{k != l} Cov(z1)_kl^2 / D  +  same for z2                 covariance, Cov = zc^T zc / (N - 1)
        L = sim_coeff * s + std_coeff * v + cov_coeff * c                 (25, 25, 1)

    where zc is z centred per column. (The paper's Eq. 6 sums v(Z) + v(Z'); the official code halves it,
    which is what its published coefficients were tuned with.)

    Distributed: the variance and covariance are over the *global* batch: every rank gathers all
    embeddings with gradients (``all_gather_with_grad``, the official ``FullGatherLayer``) and computes the
    same v and c; the invariance term is each rank's mean over its own n images (as the official code),
    whose average over ranks is the global mean. So the mean over ranks of the losses is the 1-process
    loss and, after DDP's averaging, the gradients are the 1-process ones.

    Computed in at least float32, outside autocast.

    Args:
        sim_coeff, std_coeff, cov_coeff: the weights lambda, mu, nu (paper: 25, 25, 1).
        eps: added to the variance inside the square root (paper: 1e-4).
        gather_distributed: variance and covariance over the global batch (default) or each rank's own.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (a weight of the loss), got {value}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.eps = eps
        self.gather_distributed = gather_distributed

    def variance(self, z: Tensor) -> Tensor:
        """mean over the D columns of relu(1 - std), std = sqrt(unbiased variance + eps)."""
        std = torch.sqrt(z.var(dim=0) + self.eps)
        return F.relu(1 - std).mean()

    @staticmethod
    def covariance(z: Tensor) -> Tensor:
        """Sum of the squared off-diagonal entries of the [D, D] covariance matrix, divided by D."""
        n, d = z.shape
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (n - 1)
        cov2 = cov.pow(2)
        return (cov2.sum() - cov2.diagonal().sum()) / d

    def terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        """The unweighted invariance, variance and covariance terms (s, v, c above)."""
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two [n, D] tensors of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
        dtype = torch.promote_types(z1.dtype, torch.float32)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.to(dtype), z2.to(dtype)
            invariance = F.mse_loss(z1, z2)  # this rank's images
            if self.gather_distributed:
                z1, z2 = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
            if z1.shape[0] < 2:
                raise ValueError(f"VICReg needs at least 2 images in the batch for its statistics, got {z1.shape[0]}")
            variance = self.variance(z1) / 2 + self.variance(z2) / 2
            covariance = self.covariance(z1) + self.covariance(z2)
        return {"invariance": invariance, "variance": variance, "covariance": covariance}

    def weigh(self, terms: dict[str, Tensor]) -> Tensor:
        """The loss from the terms: ``sim_coeff * s + std_coeff * v + cov_coeff * c``."""
        return (
            self.sim_coeff * terms["invariance"]
            + self.std_coeff * terms["variance"]
            + self.cov_coeff * terms["covariance"]
        )

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: [n, D] embeddings of the two views of the same n images (row i <-> row i)."""
        return self.weigh(self.terms(z1, z2))
