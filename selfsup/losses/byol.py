"""BYOL's regression loss between the online prediction and the target projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BYOLLoss(nn.Module):
    """Normalised mean squared error (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, Eq. 2).

    For the online prediction q and the target projection z' of the other view, both L2-normalised::

        L(q, z') = || q / |q| - z' / |z'| ||^2 = 2 - 2 * <q, z'> / (|q| |z'|)

    averaged over the batch. BYOL symmetrises it over the two views (the algorithm adds
    ``L(q1, z'2) + L(q2, z'1)``, Eq. 3). No gradient flows into z' (the target is a momentum copy).
    MMSelfSup 1.x computes ``2 * (-cos_1 - cos_2)``: the same gradient, 4 lower in value.

    Computed in float32 outside autocast (the cosine of bf16 inputs would be rounded to 3 digits).

    Args:
        eps: added to the norms (as ``F.normalize``).
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """prediction, target: [n, d] (row i of both = the same image in the two views)."""
        if prediction.shape != target.shape or prediction.dim() != 2:
            raise ValueError(
                f"expected prediction and target of the same [n, d] shape, got {prediction.shape}, {target.shape}"
            )
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            q = F.normalize(prediction.float(), dim=1, eps=self.eps)
            z = F.normalize(target.detach().float(), dim=1, eps=self.eps)
            return (2 - 2 * (q * z).sum(dim=1)).mean()
