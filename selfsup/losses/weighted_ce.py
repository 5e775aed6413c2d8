"""Class-reweighted cross entropy of ODC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClassWeightedCrossEntropy(nn.Module):
    """Cross entropy with per-class weights, as ODC uses against cluster imbalance (Zhan et al.,
    "Online Deep Clustering for Unsupervised Representation Learning", CVPR 2020, Sec. 3.3
    "Loss re-weighting").

    For logits x_i, pseudo-labels y_i and class weights w::

        L = sum_i w_{y_i} * (-log softmax(x_i)_{y_i})  /  sum_i w_{y_i}

    ODC sets ``w_c proportional to count_c ** -0.5`` from the cluster sizes in its memory (the
    scale of w cancels). Without weights this is the plain mean cross entropy.

    The normaliser is ``sum_i w_{y_i}`` (torch's weighted mean), as in MMSelfSup 0.x, whose
    ``ClsHead`` called ``F.cross_entropy(..., weight=w)`` and which trained the published ODC model.
    MMSelfSup 1.x's ``CrossEntropyLoss`` with ``class_weight`` divides by the batch size instead;
    the two differ by the factor ``mean_i w_{y_i}``, which changes the effective learning rate as the
    clusters' sizes change. selfsup keeps 0.x.
    """

    def forward(self, logits: Tensor, labels: Tensor, class_weight: Tensor | None = None) -> Tensor:
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"expected logits [B, K] and labels [B], got {logits.shape}, {labels.shape}")
        if class_weight is not None and class_weight.shape != logits.shape[1:]:
            raise ValueError(f"class_weight must be [K={logits.shape[1]}], got {tuple(class_weight.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            weight = None if class_weight is None else class_weight.float()
            return F.cross_entropy(logits.float(), labels, weight=weight)
