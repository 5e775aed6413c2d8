"""InfoNCE, the contrastive loss of MoCo, DenseCL and NPID-style memories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InfoNCELoss(nn.Module):
    """InfoNCE with one positive and explicit negatives (van den Oord et al., "Representation Learning
    with Contrastive Predictive Coding", 2018, Eq. 4; He et al., "Momentum Contrast for Unsupervised
    Visual Representation Learning", CVPR 2020, Eq. 1).

    For a query q_i, its positive key k_i and negatives n_1..n_K (all L2-normalised by the caller)::

        L_i = -log( exp(q_i . k_i / T) / (exp(q_i . k_i / T) + sum_j exp(q_i . n_j / T)) )
        L   = mean_i L_i

    i.e. cross-entropy over the K + 1 logits ``[q.k, q.n_1, ..., q.n_K] / T`` with the positive at index 0
    (MoCo's Algorithm 1). The negatives are either shared by every query (MoCo's queue, [K, d]) or drawn per
    query ([n, K, d], NPID's sampled memory-bank entries). Gradients flow into every input that requires
    them; a caller whose keys must not be trained (MoCo's momentum keys and queue) passes them detached.

    Computed in float32 with autocast off (logits of bf16 inputs would be rounded to 3 digits, and 1/T
    of 14 amplifies that).

    Args:
        temperature: T > 0 (MoCo v1 and NPID: 0.07; MoCo v2 and DenseCL: 0.2).
    """

    def __init__(self, temperature: float) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"InfoNCELoss temperature must be a number > 0 (MoCo: 0.07 or 0.2), got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, q: Tensor, k: Tensor, negatives: Tensor) -> Tensor:
        """q, k: [n, d] queries and their positive keys (row i <-> row i); negatives: [K, d] shared by all
        queries, or [n, K, d] per query. Returns the mean loss over the n queries (a scalar)."""
        if q.dim() != 2 or k.shape != q.shape:
            raise ValueError(
                f"InfoNCELoss expects queries and positive keys of the same [n, d] shape, got {tuple(q.shape)} "
                f"and {tuple(k.shape)}"
            )
        n, d = q.shape
        shared = negatives.dim() == 2 and negatives.shape[1] == d
        per_query = negatives.dim() == 3 and negatives.shape[0] == n and negatives.shape[2] == d
        if not (shared or per_query):
            raise ValueError(
                f"InfoNCELoss expects negatives of shape [K, {d}] (shared) or [{n}, K, {d}] (per query), "
                f"got {tuple(negatives.shape)}"
            )
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            positive = (q * k).sum(dim=1, keepdim=True)  # [n, 1]
            if shared:
                negative = q @ negatives.T  # [n, K]
            else:
                negative = torch.bmm(negatives, q.unsqueeze(2)).squeeze(2)  # [n, K]
            logits = torch.cat([positive, negative], dim=1) / self.temperature
            target = torch.zeros(n, dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, target)
