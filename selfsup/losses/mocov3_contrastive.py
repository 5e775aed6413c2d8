"""MoCo v3's contrastive (InfoNCE) loss between predictions and momentum keys of the other view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed


class MoCoV3ContrastiveLoss(nn.Module):
    """InfoNCE with in-batch keys (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
    Transformers", ICCV 2021, Algorithm 1; official ``MoCo.contrastive_loss``).

    For the n predictions q of this rank and the keys k of the *global* batch (N = world x n rows, from the
    momentum encoder, gathered from every rank in rank order, no gradient), both L2-normalised::

        logits_ij = q_i . k_j / T                                    [n, N]
        L(q, k)   = 2T * mean_i CE(logits_i, label_i),    label_i = i + rank * n

    so the positive of q_i is the key of the same image (row ``rank * n + i`` of the gathered keys) and the
    other N - 1 keys are its negatives. The factor 2T is the paper's (it makes the gradient's scale
    independent of T). MoCo v3 symmetrises over the two views: ``L(q1, k2) + L(q2, k1)``.

    Distributed: the keys carry no gradient, so each rank's loss only differentiates its own q; DDP's average
    of the per-rank means is the mean over the global batch, and its gradients equal those of one process
    holding the whole batch.

    Computed in float32 outside autocast (the softmax over N keys in bf16 would round the logits to 3 digits).

    Args:
        temperature: T > 0 (paper: 1.0 for ResNet-50, 0.2 for ViT).
        gather_distributed: keys from every rank (the paper) or only this rank's.
    """

    def __init__(self, temperature: float = 1.0, gather_distributed: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """query: [n, d] predictions of one view; key: [n, d] momentum-encoder outputs of the other view
        (row i of both = the same image)."""
        if query.shape != key.shape or query.dim() != 2:
            raise ValueError(f"expected query and key of the same [n, d] shape, got {query.shape}, {key.shape}")
        with torch.autocast(device_type=query.device.type, enabled=False):
            q = F.normalize(query.float(), dim=1)
            k = F.normalize(key.detach().float(), dim=1)
            n = q.shape[0]
            if self.gather_distributed:
                k, offset = distributed.all_gather(k), distributed.get_rank() * n
            else:
                offset = 0
            logits = q @ k.T / self.temperature  # [n, N]
            labels = torch.arange(n, device=q.device) + offset
            return F.cross_entropy(logits, labels) * (2.0 * self.temperature)
