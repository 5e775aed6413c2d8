"""Weighted cosine k-nearest-neighbour classification of features (Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018, Sec. 3.4).

For an L2-normalised query q and its k most similar bank features f_i (cosine s_i = q . f_i)::

    score(c) = sum_{i in top-k, y_i = c} exp(s_i / T)          prediction = argmax_c score(c)

Defaults k = 20, T = 0.07 as in InstDisc and MMSelfSup's kNN benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_scores(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores [Q, num_classes] of each query."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(bank))
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    out = []
    for q in queries.split(chunk):
        sims, idx = (q @ bank.T).topk(k, dim=1)  # [q, k]
        weights = (sims / temperature).exp()
        scores = torch.zeros(len(q), num_classes, device=q.device, dtype=weights.dtype)
        out.append(scores.scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(
    queries: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy of weighted kNN."""
    scores = knn_scores(queries, bank, bank_labels.to(bank.device), num_classes, k, temperature)
    ranked = scores.argsort(dim=1, descending=True)
    labels = query_labels.to(ranked.device)
    result = {"top1": (ranked[:, 0] == labels).float().mean().item()}
    if num_classes > 5:
        result["top5"] = (ranked[:, :5] == labels[:, None]).any(dim=1).float().mean().item()
    return result
