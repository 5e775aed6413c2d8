"""SwAV's swapped-prediction loss: predict the code of one crop from the prototype scores of another."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwAVLoss(nn.Module):
    """Swapped prediction (Caron et al., "Unsupervised Learning of Visual Features by Contrasting
    Cluster Assignments", NeurIPS 2020, Eq. 1-2; official ``main_swav.py``, MMSelfSup ``SwAVLoss``).

    For V crops of a batch of B images with prototype scores p_v = C^T z_v ([B, K], z and the
    prototypes c_k L2-normalised) and the codes q_i ([B, K], rows summing to 1, Sinkhorn-Knopp) of
    the assignment crops i in ``crops_for_assign``::

        l(p_v, q_i) = -(1/B) sum_b sum_k q_i[b, k] log softmax(p_v[b] / T)_k
        L = 1/|A| sum_{i in A} 1/(V - 1) sum_{v != i} l(p_v, q_i)

    (official: ``subloss / (sum(nmb_crops) - 1)``, then ``loss / len(crops_for_assign)``). A crop never
    predicts its own code. No gradient flows into the codes. Computed in float32 outside autocast.

    Args:
        temperature: T of the softmax over prototypes (paper: 0.1).
        crops_for_assign: indices of the crops whose codes are predicted (paper: the two global crops).
    """

    def __init__(self, temperature: float = 0.1, crops_for_assign: Sequence[int] = (0, 1)) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"SwAVLoss temperature must be > 0, got {temperature}")
        crops = [int(c) for c in crops_for_assign]
        if not crops or min(crops) < 0 or len(set(crops)) != len(crops):
            raise ValueError(
                f"SwAVLoss crops_for_assign must be distinct crop indices >= 0, got {list(crops_for_assign)}"
            )
        self.temperature = float(temperature)
        self.crops_for_assign = crops

    def forward(self, scores: Tensor, codes: Tensor) -> Tensor:
        """scores: [V, B, K] prototype scores of every crop; codes: [A, B, K] codes of crops_for_assign[a]."""
        num_assign = len(self.crops_for_assign)
        if scores.dim() != 3 or codes.shape != (num_assign, *scores.shape[1:]):
            raise ValueError(
                f"expected scores [V, B, K] and codes [{num_assign}, B, K] (one per assignment crop), "
                f"got {tuple(scores.shape)} and {tuple(codes.shape)}"
            )
        num_crops = scores.shape[0]
        if num_crops < 2 or max(self.crops_for_assign) >= num_crops:
            raise ValueError(
                f"SwAVLoss needs >= 2 crops including crops_for_assign={self.crops_for_assign}, got {num_crops} crops"
            )
        with torch.autocast(device_type=scores.device.type, enabled=False):
            log_p = F.log_softmax(scores.float() / self.temperature, dim=-1)  # [V, B, K]
            q = codes.detach().float()
            # ce[a, v] = l(p_v, q_a): cross-entropy of every code with every crop's prediction
            ce = -torch.einsum("abk,vbk->av", q, log_p) / scores.shape[1]
            other = torch.ones_like(ce, dtype=torch.bool)
            other[list(range(num_assign)), self.crops_for_assign] = False  # v != i
            return (ce * other).sum(dim=1).div(num_crops - 1).mean()
