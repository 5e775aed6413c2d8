"""SimSiam's negative cosine similarity with a stop-gradient on the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SimSiamLoss(nn.Module):
    """Negative cosine similarity (Chen & He, "Exploring Simple Siamese Representation Learning",
    CVPR 2021, Eq. 1 and Algorithm 1)::

        D(p, z) = - < p / |p|, stopgrad(z) / |z| >        averaged over the batch; in [-1, 1]

    The algorithm symmetrises it, ``D(p1, z2) / 2 + D(p2, z1) / 2`` (Eq. 2-4). The stop-gradient is
    here, and only here: no gradient flows into ``target``, which is what keeps SimSiam from collapsing
    (Sec. 4.1, Fig. 2). MMSelfSup 1.x's ``CosineSimilarityLoss`` is the same function.

    Not :class:`~selfsup.losses.byol.BYOLLoss`: that is ``2 - 2 cos = 2 + 2 D``, twice the gradient
    (which an SGD recipe such as SimSiam's 0.05 per 256 would feel) and a value offset by 2.

    Computed in at least float32, outside autocast (the cosine of bf16 inputs is rounded to 3 digits).

    Args:
        eps: added to the norms (as ``F.normalize``).
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """prediction p, target z: [n, d] (row i of both = the same image, seen in two views)."""
        if prediction.shape != target.shape or prediction.dim() != 2:
            raise ValueError(
                f"expected prediction and target of the same [n, d] shape, got {tuple(prediction.shape)}, "
                f"{tuple(target.shape)}"
            )
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            p = F.normalize(prediction.to(dtype), dim=1, eps=self.eps)
            z = F.normalize(target.detach().to(dtype), dim=1, eps=self.eps)
            return -(p * z).sum(dim=1).mean()
