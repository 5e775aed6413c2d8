"""Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021), as the official code (facebookresearch/barlowtwins) and MMSelfSup run it.

    projector g: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, 8192 wide, no biases
    for a batch of N images (N = the global batch over all GPUs), two views x1, x2 (BYOL's augmentations):
        z1, z2 = g(backbone(x1)), g(backbone(x2))       # [N, 8192] each; one pass per view (BN per view)
        zA, zB = BN(z1), BN(z2)                          # standardised per dimension over the global batch
        C = zA^T zB / N                                  # [8192, 8192] cross-correlation
        loss = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2          (lambd = 0.0051), Algorithm 1
    optimizer: LARS, lr 0.2 x batch / 256 for the weights and 0.0048 x batch / 256 (lr_mult 0.024) for
    biases and BN parameters, which get no weight decay and no LARS adaptation; wd 1e-6; batch 2048;
    10 warm-up epochs, cosine to 0.001 x lr.

The batch statistics and C are over the global batch, computed on every rank from embeddings gathered
with gradients (:class:`~selfsup.losses.barlowtwins.BarlowTwinsLoss`): 2 processes x n images train
exactly like 1 process x 2n.
"""

from __future__ import annotations

from torch import nn

from selfsup.algorithms.base import TwinEmbedding, feature_dim
from selfsup.losses.barlowtwins import BarlowTwinsLoss
from selfsup.models.necks import MLPNeck


class BarlowTwinsProjectionHead(MLPNeck):
    """Barlow Twins' projector (Sec. 2 / official ``--projector 8192-8192-8192``): ``num_layers`` Linear layers
    without biases, BN + ReLU after all but the last (MMSelfSup ``NonLinearNeck(with_last_bn=False)``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192, num_layers: int = 3) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=num_layers, last_bn=False, bias=False)


class BarlowTwins(TwinEmbedding):
    """Barlow Twins' projector and loss on :class:`~selfsup.algorithms.base.TwinEmbedding`."""

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 8192,
        out_dim: int = 8192,
        num_layers: int = 3,
        lambd: float = 0.0051,
    ) -> None:
        projector = BarlowTwinsProjectionHead(feature_dim(backbone), hidden_dim, out_dim, num_layers)
        super().__init__(backbone, projector, BarlowTwinsLoss(lambd))
