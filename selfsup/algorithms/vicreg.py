"""VICReg (Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022), as the official code (facebookresearch/vicreg) runs it.

    expander h: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, 8192 wide (Sec. 4.1; official
                ``Projector``: biases on the hidden Linear layers, none on the last)
    for a batch of N images (N = the global batch over all GPUs), two views x1, x2 (BYOL's augmentations):
        z1, z2 = h(backbone(x1)), h(backbone(x2))                  # [N, 8192] each; one pass per view
        s = MSE(z1, z2)                                             # invariance
        v = mean_j relu(1 - sqrt(Var(z1_j) + 1e-4)) / 2 + same for z2     # variance (unbiased, global batch)
        c = sum_{j != k} Cov(z1)_jk^2 / 8192 + same for z2          # covariance (global batch)
        loss = 25 s + 25 v + 1 c                                    # Algorithm 1, official main_vicreg.py
    optimizer: LARS, lr 0.2 x batch / 256, wd 1e-6, biases and BN without weight decay and LARS adaptation;
    batch 2048; 10 warm-up epochs, cosine to 0.001 x lr; 1000 epochs.

The variance and covariance terms are over the global batch, on embeddings gathered with gradients
(:class:`~selfsup.losses.vicreg.VICRegLoss`, the official ``FullGatherLayer``): 2 processes x n images
train exactly like 1 process x 2n. The three unweighted terms are logged.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.algorithms.base import Batch, TwinEmbedding, feature_dim
from selfsup.losses.vicreg import VICRegLoss
from selfsup.models.necks import MLPNeck


class VICRegExpander(MLPNeck):
    """VICReg's expander (official ``Projector``, ``--mlp 8192-8192-8192``): ``num_layers`` Linear layers,
    BN + ReLU after all but the last; the hidden Linear layers have biases (inert before a BN, kept for
    the official parameter set), the last has none."""

    def __init__(self, in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192, num_layers: int = 3) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=num_layers, last_bn=False, bias=True)
        last: nn.Linear = self.mlp[-1]  # type: ignore[assignment]
        self.mlp[-1] = nn.Linear(last.in_features, out_dim, bias=False)


class VICReg(TwinEmbedding):
    """VICReg's expander and loss on :class:`~selfsup.algorithms.base.TwinEmbedding`; logs the three terms."""

    loss_fn: VICRegLoss

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 8192,
        out_dim: int = 8192,
        num_layers: int = 3,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
    ) -> None:
        projector = VICRegExpander(feature_dim(backbone), hidden_dim, out_dim, num_layers)
        super().__init__(backbone, projector, VICRegLoss(sim_coeff, std_coeff, cov_coeff))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        terms = self.loss_fn.terms(*self.embed(batch))  # variance and covariance over the global batch
        return {"loss": self.loss_fn.weigh(terms), **{k: v.detach() for k, v in terms.items()}}
