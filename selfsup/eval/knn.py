"""Weighted cosine k-nearest-neighbour classification of features (Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018, Sec. 3.4).

For an L2-normalised query q and its k most similar bank features f_i (cosine s_i = q . f_i)::

    score(c) = sum_{i in top-k, y_i = c} exp(s_i / T)          prediction = argmax_c score(c)

Defaults k = 20, T = 0.07 as in InstDisc and MMSelfSup's kNN benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.datasets import ImageDataset
from selfsup.data.views import Normalize
from selfsup.eval.bench import BenchContext, Benchmark
from selfsup.eval.features import extract_features, top_k_accuracy


@dataclass
class KNNConfig:
    """``knn``: the weighted-kNN monitor of a training run."""

    enabled: bool = True  # before and after training, on the held-out split
    interval: int = 0  # also every N epochs (0 = only before and after training)
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # images per feature-extraction batch

    def __post_init__(self) -> None:
        from selfsup.errors import ConfigError

        if not self.interval >= 0:
            raise ConfigError(f"knn.interval must be >= 0 (0 = only before and after training), got {self.interval}")
        if not self.k >= 1:
            raise ConfigError(f"knn.k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"knn.temperature must be > 0, got {self.temperature}")
        if not self.batch_size >= 1:
            raise ConfigError(f"knn.batch_size must be >= 1, got {self.batch_size}")


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
    return top_k_accuracy(scores, query_labels, num_classes)


class KNNMonitor:
    """Weighted kNN top-1/top-5 of a model's evaluation features (``model.extract``, eval mode, the
    datasets' deterministic eval transform): the training split is the bank, the held-out split the
    queries. ``None`` when there is no labelled held-out split."""

    def __init__(
        self,
        cfg: KNNConfig,
        train_set: ImageDataset,
        val_set: ImageDataset | None,
        normalize: Normalize,
        autocast: Callable[[], AbstractContextManager] | None = None,
        num_workers: int = 0,
    ) -> None:
        self.cfg, self.train_set, self.val_set = cfg, train_set, val_set
        self.normalize, self.autocast, self.num_workers = normalize, autocast, num_workers

    def features(
        self, model: nn.Module, fn: Callable[[Tensor], Tensor], dataset: ImageDataset
    ) -> tuple[Tensor, Tensor]:
        """``fn`` over ``dataset`` with ``model`` in eval mode (its mode is restored afterwards)."""
        was_training = model.training
        model.eval()
        try:
            return extract_features(
                fn,
                dataset,
                self.normalize,
                batch_size=self.cfg.batch_size,
                num_workers=self.num_workers,
                autocast=self.autocast,
            )
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        extract: Callable[[Tensor], Tensor] = getattr(model, "extract")  # noqa: B009 - any model with .extract
        bank, bank_labels = self.features(model, extract, self.train_set)
        queries, query_labels = self.features(model, extract, self.val_set)
        return knn_accuracy(
            queries, query_labels, bank, bank_labels, self.train_set.num_classes, self.cfg.k, self.cfg.temperature
        )


class KNNBenchmark(Benchmark):
    """``bench=knn``: weighted cosine kNN of the frozen encoder's features (MMSelfSup's ``test_knn.py``):
    the training split is the bank, the held-out split the queries; top-1 and top-5 for every ``k``.

    Args:
        k: numbers of neighbours (MMSelfSup: 10 20 100 200).
        temperature: T in the vote weight exp(s / T).
        stage: ``pooled`` (the encoder's feature) or a backbone stage (``layer3``, ``block6``, ``last``).
    """

    name = "knn"
    headline = "top1_k20"

    def __init__(self, k: list[int] = [10, 20, 100, 200], temperature: float = 0.07, stage: str = "pooled") -> None:  # noqa: B006 - Hydra passes lists
        from selfsup.errors import ConfigError

        if not k or any(int(v) < 1 for v in k):
            raise ConfigError(f"bench.k must be a non-empty list of integers >= 1, got {list(k)}")
        if not temperature > 0:
            raise ConfigError(f"bench.temperature must be > 0, got {temperature}")
        self.k, self.temperature, self.stage = [int(v) for v in k], float(temperature), stage
        self.headline = f"top1_k{20 if 20 in self.k else self.k[0]}"  # type: ignore[misc]

    def run(self, ctx: BenchContext) -> dict[str, Any]:
        bank, bank_labels = ctx.features(ctx.train, (self.stage,))
        queries, query_labels = ctx.features(ctx.val, (self.stage,))
        metrics: dict[str, Any] = {}
        for k in self.k:
            acc = knn_accuracy(
                queries[self.stage], query_labels, bank[self.stage], bank_labels, ctx.num_classes, k, self.temperature
            )
            metrics.update({f"{name}_k{k}": 100.0 * value for name, value in acc.items()})
        return metrics
