"""What every algorithm offers the trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypedDict

import torch
from torch import Tensor, nn


class Batch(TypedDict):
    """One training batch, already on the device and normalised."""

    views: list[Tensor]  # one [B, C, H, W] float tensor per view, in the order of algo.views
    index: Tensor  # [B] int64 position of each image in the training set (memory banks)
    label: Tensor  # [B] int64 class label, -1 when unknown (never used for training)


class TrainContext(Protocol):
    """Services the trainer gives an algorithm in ``on_train_start``."""

    seed: int

    def extract_features(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` applied (in eval mode, no grad) to every training image with the deterministic
        eval transform; returns [N, D] float32 on the device, row i = image i, on every rank."""
        ...


class Algorithm(nn.Module):
    """Base class. A subclass builds its neck/head/loss around ``self.backbone`` and implements
    ``forward(batch) -> {"loss": scalar, other scalars to log...}``.

    Hooks (all optional):
        setup(num_samples): allocate state sized by the dataset (memory banks); called before a
            checkpoint is loaded, so that state is restored with the weights.
        on_train_start(ctx): one-off work before the first step (ODC's initial k-means); must be
            a no-op when resuming with restored state.
        after_step(step): side machinery after each optimizer step (centroid updates, EMA, ...).
    """

    #: total number of views the algorithm consumes per image (sum of ``copies`` in algo.views)
    num_views: int = 1

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def setup(self, num_samples: int) -> None:  # noqa: B027 - optional hook
        pass

    def on_train_start(self, ctx: TrainContext) -> None:  # noqa: B027 - optional hook
        pass

    def after_step(self, step: int) -> dict[str, float] | None:
        return None

    @torch.no_grad()
    def extract(self, images: Tensor) -> Tensor:
        """Features for evaluation (kNN, linear probe, t-SNE): the backbone's pooled output."""
        return self.backbone(images)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names that get no weight decay (besides all 1-D parameters)."""
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    def compile_targets(self) -> list[nn.Module]:
        """Sub-modules that ``compile=true`` compiles in place (state-dict keys unchanged)."""
        return [self.backbone]
