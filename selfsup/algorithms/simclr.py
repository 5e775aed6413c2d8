"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020).

    for a batch of N images:
        x1, x2 = two strong augmentations of each image       # crop, flip, colour, grey, blur
        h = backbone(cat(x1, x2))                             # [2N, C]  one pass, shared BN stats
        z1, z2 = split(neck(h))                               # [N, 128] projection MLP
        loss = NT-Xent(z1, z2, temperature)                   # negatives from every GPU
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.algorithms.base import Algorithm, Batch, feature_dim
from selfsup.losses import NTXentLoss
from selfsup.models.necks import SimCLRProjectionHead


class SimCLR(Algorithm):
    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 2,
        temperature: float = 0.1,
    ) -> None:
        super().__init__(backbone)
        self.neck = SimCLRProjectionHead(feature_dim(backbone), hidden_dim, out_dim, num_layers)
        self.loss_fn = NTXentLoss(temperature)

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.neck]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x1, x2 = batch["views"]
        z = self.neck(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        return {"loss": self.loss_fn(z1, z2)}
