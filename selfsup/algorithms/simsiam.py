"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021), as the official
code (facebookresearch/simsiam) and MMSelfSup run it.

    encoder f = projector g o backbone                 g: 3 layers of 2048, BN on each (output BN without affine)
    predictor h: 2048 -> 512 -> 2048                   (BN + ReLU on the hidden layer, none on the output)
    for a batch of images, two views x1, x2 (MoCo v2 augmentation):
        z1, z2 = f(x1), f(x2)                          # [N, 2048] each; one pass per view (BN per view)
        p1, p2 = h(z1), h(z2)                          # [N, 2048]
        loss = D(p1, z2) / 2 + D(p2, z1) / 2           # D(p, z) = -cos(p, stopgrad(z)), Eq. 1-4
    optimizer: SGD 0.05 x batch / 256, wd 1e-4, momentum 0.9, cosine decay, except the predictor,
    whose lr stays fixed (``algo.optimizer.paramwise.predictor.fixed_lr``; Sec. 4.2 / MMSelfSup's SimSiamHook).

No momentum encoder, no negatives: the stop-gradient alone prevents collapse (Sec. 4.1). The stop-gradient
is in :class:`~selfsup.losses.simsiam.SimSiamLoss`.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.algorithms.base import Algorithm, Batch, feature_dim
from selfsup.losses.simsiam import SimSiamLoss
from selfsup.models.necks import MLPNeck


class SimSiamProjectionHead(MLPNeck):
    """SimSiam's projector (Sec. 3, "Baseline settings"): 3 Linear layers without biases, each followed by BN,
    ReLU between; the output BN has no affine parameters (official ``BatchNorm1d(dim, affine=False)``;
    MMSelfSup ``NonLinearNeck(num_layers=3, with_last_bn_affine=False)``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=3, last_bn=True)
        self.mlp[-1] = nn.BatchNorm1d(out_dim, affine=False)


class SimSiamPredictionHead(MLPNeck):
    """SimSiam's predictor h (Sec. 3): Linear(512, no bias) -> BN -> ReLU -> Linear(2048, with bias); a
    bottleneck with no BN on the output (official builder.py)."""

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=2, last_bn=False)


class SimSiam(Algorithm):
    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        out_dim: int = 2048,
        pred_hidden_dim: int = 512,
    ) -> None:
        super().__init__(backbone)
        self.projector = SimSiamProjectionHead(feature_dim(backbone), hidden_dim, out_dim)
        self.predictor = SimSiamPredictionHead(out_dim, pred_hidden_dim, out_dim)
        self.loss_fn = SimSiamLoss()

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x1, x2 = batch["views"]
        z1 = self.projector(self.backbone(x1))  # [N, out_dim]
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {"loss": self.loss_fn(p1, z2) / 2 + self.loss_fn(p2, z1) / 2}  # the loss stops z's gradient
