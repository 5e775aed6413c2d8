"""Rotation-Pred (Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018), with MMSelfSup's network (``rotation_pred.py``, ``ClsHead``).

    view (algo.views: rotations [0, 90, 180, 270]): each image at the four rotations, targets 0..3
    for a batch of B images:
        x = cat(rot_0(v), rot_90(v), rot_180(v), rot_270(v))   # [4B, 3, H, W]  all four rotations of
                                                               # an image in the same batch (paper Sec. 2.2)
        h = backbone(x)                                        # [4B, C]  one pass
        loss = CE(head(h), rotation index)                     # 4-way linear head (MMSelfSup ClsHead)

The rotations are made by the view declaration (``torch.rot90``: counter-clockwise), the targets come
with the batch (``view_targets``), so the head learns whatever convention the views use.

Nothing is gathered, reduced or shuffled across ranks (each rank's loss is on its own images; DDP
averages the gradients; MMSelfSup's recipe uses SyncBN, ``sync_bn: true``), so there is no 2-process
test; no discrete state either (nothing to check under bf16).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.algorithms.base import Algorithm, Batch, feature_dim
from selfsup.errors import ConfigError
from selfsup.losses import ClassWeightedCrossEntropy


class RotationPred(Algorithm):
    num_views = 4  # the default num_rotations; an instance takes num_rotations views

    def __init__(self, backbone: nn.Module, num_rotations: int = 4) -> None:
        """
        Args:
            num_rotations: how many rotations the views declare (``rotations: [...]``, targets
                0..num_rotations-1) and the head tells apart; the paper's choice is 4 (0, 90, 180, 270
                degrees), which beat 2 and 8 rotations in its Table 2.
        """
        super().__init__(backbone)
        if num_rotations < 2:
            raise ConfigError(f"RotationPred: algo.model.num_rotations must be >= 2, got {num_rotations}")
        self.num_views = num_rotations
        self.head = nn.Linear(feature_dim(backbone), num_rotations)  # ClsHead: Linear ~ N(0, 0.01), zero bias
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.loss_fn = ClassWeightedCrossEntropy()  # without class weights: the mean cross entropy

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        views, targets = batch["views"], batch["view_targets"]  # 4 x [B, 3, H, W], [B, 4]
        if len(views) != self.num_views or targets.shape[1] != self.num_views:
            raise ValueError(f"RotationPred expects {self.num_views} rotated views per image, got {len(views)}")
        logits = self.head(self.backbone(torch.cat(views)))  # [4B, 4], view-major
        labels = targets.T.reshape(-1)  # [4B], the same order
        loss = self.loss_fn(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}
