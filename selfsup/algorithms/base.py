"""What every algorithm offers the trainer, and what the trainer offers it.

An algorithm is an ``nn.Module`` built around a backbone (``backbone -> neck -> head -> loss``) with
``forward(batch) -> {"loss": scalar, other scalars to log...}``. Around the step, the trainer calls
its hooks, in this order::

    setup(num_samples)                    once, before a checkpoint is loaded (size memory banks)
    on_train_start(ctx)                   once, before the first step (ODC's initial k-means); a no-op
                                          when the state came from a checkpoint
    for each epoch:
        on_epoch_start(ctx)               (DeepCluster re-clusters every epoch; also called when a run
                                          resumes in the middle of the epoch)
        epoch_indices(epoch, seed)        the epoch's sample order, None = a seeded permutation
        for each step:
            forward(batch) -> loss; backward
            before_optimizer_step(state)  gradients are final (unscaled, clipped): SwAV freezes its
                                          prototypes, DINO cancels its last layer's gradient
            optimizer step, lr/wd schedules
            after_step(state)             EMA / momentum encoders, centroids, queues

``state`` (:class:`~selfsup.engine.state.TrainState`) says where training stands: epoch, step, steps
per epoch, total steps; scalar schedules (:class:`~selfsup.engine.schedules.ScalarSchedule`) read it.

**State that must survive a resume is declared once, as part of the module**: parameters, registered
buffers (``register_buffer``), sub-modules (a momentum encoder, a queue, a memory bank) or
``get_extra_state``. All of it is in ``state_dict()``, so every checkpoint carries it and resume
restores it bit for bit; hooks keep nothing else between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypedDict

import torch
from torch import Tensor, nn

from selfsup.engine.state import TrainState


class Batch(TypedDict):
    """One training batch, already on the device and normalised."""

    views: list[Tensor]  # one [B, C, H, W] float tensor per view, in the order of algo.views
    view_targets: Tensor  # [B, V] int64 target of each view (rotation index, grid position), -1: none
    masks: dict[str, Tensor]  # "<view index>" -> [B, gh, gw] bool mask drawn with that view (BEiT, SimMIM)
    index: Tensor  # [B] int64 position of each image in the training set (memory banks)
    label: Tensor  # [B] int64 class label, -1 when unknown (never used for training)


class TrainContext(Protocol):
    """Services the trainer gives an algorithm in ``on_train_start`` and ``on_epoch_start``."""

    seed: int
    state: TrainState

    def extract_features(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` applied (in eval mode, no grad) to every training image with the deterministic
        eval transform; returns [N, D] float32 on the device, row i = image i, on every rank."""
        ...


def feature_dim(backbone: nn.Module) -> int:
    """The size of a backbone's pooled feature (its ``num_features``), which necks and heads are built on."""
    dim = getattr(backbone, "num_features", None)
    if not isinstance(dim, int):
        raise TypeError(f"{type(backbone).__name__} has no integer num_features; a selfsup backbone must define it")
    return dim


class Algorithm(nn.Module):
    """Base class of every algorithm (see the module docstring for the hooks)."""

    #: total number of views the algorithm consumes per image (sum of ``copies`` in algo.views)
    num_views: int = 1

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def setup(self, num_samples: int) -> None:  # noqa: B027 - optional hook
        """Allocate state sized by the dataset (memory banks); called before a checkpoint is loaded."""

    def on_train_start(self, ctx: TrainContext) -> None:  # noqa: B027 - optional hook
        """One-off work before the first step; must be a no-op when resuming with restored state."""

    def on_epoch_start(self, ctx: TrainContext) -> None:  # noqa: B027 - optional hook
        """Work at the start of every epoch (``ctx.state.epoch`` epochs are done)."""

    def epoch_indices(self, epoch: int, seed: int) -> Tensor | None:
        """The order in which this epoch visits the training images, or None (default): the loader's
        seeded permutation. Called right after ``on_epoch_start``. Otherwise a 1-D int64 CPU tensor of
        ``num_samples`` dataset indices (repeats allowed: DeepCluster samples uniformly over clusters),
        identical on every rank (derive it from registered state and a generator seeded from
        ``(seed, epoch)``); the loader drops the tail to a multiple of the world size and gives rank r
        the positions r, r + world, ... as DistributedSampler does."""
        return None

    def before_optimizer_step(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        """Edit gradients after backward (unscaled, clipped) and before the optimizer step."""

    def after_step(self, state: TrainState) -> dict[str, float] | None:
        """Side machinery after each optimizer step (``state.step`` counts it); scalars to log."""
        return None

    @torch.no_grad()
    def extract(self, images: Tensor) -> Tensor:
        """Features for evaluation (kNN, linear probe, t-SNE): the backbone's pooled output."""
        return self.backbone(images)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names that get no weight decay (besides all 1-D parameters)."""
        inner: set[str] = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    def compile_targets(self) -> list[nn.Module]:
        """Sub-modules that ``compile=true`` compiles in place (state-dict keys unchanged)."""
        return [self.backbone]
