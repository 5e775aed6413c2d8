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

from selfsup.engine.schedules import ScalarSchedule
from selfsup.engine.state import TrainState
from selfsup.models.momentum import MomentumEncoder


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


class MomentumTwin(Algorithm):
    """The shared skeleton of BYOL and MoCo v3: an online network against its own momentum copy.

        online = predictor q o projector g o backbone f        (trained)
        target = g' o f' = momentum copy of g o f               (never trained: EMA of the online weights)
        for two views x1, x2 of a batch:
            p1, p2 = q(g(f(x1))), q(g(f(x2)))                     # one pass per view (BN per view)
            z1, z2 = g'(f'(x1)), g'(f'(x2))                       # no gradient
            loss = L(p1, z2) + L(p2, z1)                          # the algorithm's loss L
        after each optimizer step:
            m = momentum(state)                                   # a ScalarSchedule (cosine m_0 -> 1)
            target <- m * target + (1 - m) * online               # update_momentum (BN statistics copied)

    Subclasses build the projector, predictor and loss and pass them here. The target is a sub-module, so
    its weights are in every checkpoint and resume continues the EMA bit for bit.
    """

    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module,
        momentum: ScalarSchedule,
        loss_fn: nn.Module,
    ) -> None:
        super().__init__(backbone)
        self.projector = projector
        self.predictor = predictor
        self.target = MomentumEncoder(nn.Sequential(self.backbone, self.projector))
        self.momentum = momentum
        self.loss_fn = loss_fn

    def online(self) -> nn.Sequential:
        """g o f: the online network without the predictor, whose momentum copy the target is (same names)."""
        return nn.Sequential(self.backbone, self.projector)

    def compile_targets(self) -> list[nn.Module]:
        target: nn.Sequential = self.target.module  # type: ignore[assignment]
        return [self.backbone, target[0]]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x1, x2 = batch["views"]
        p1 = self.predictor(self.projector(self.backbone(x1)))  # [N, out_dim]
        p2 = self.predictor(self.projector(self.backbone(x2)))
        z1, z2 = self.target(x1), self.target(x2)  # no gradient
        return {"loss": self.loss_fn(p1, z2) + self.loss_fn(p2, z1)}

    def after_step(self, state: TrainState) -> dict[str, float] | None:
        m = self.momentum(state)
        self.target.update(self.online(), m)
        return {"momentum": m}


class TwinEmbedding(Algorithm):
    """The shared skeleton of Barlow Twins and VICReg: both views through the same backbone and projector,
    one pass per view (BN per view), and a loss over the two embeddings' global-batch statistics.

        z1, z2 = projector(backbone(x1)), projector(backbone(x2))     # [n, out_dim] (this rank's images)
        loss = loss_fn(z1, z2)                                        # gathers the global batch itself
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, projector: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__(backbone)
        self.projector = projector
        self.loss_fn = loss_fn

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def embed(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """z1, z2: the projector's embeddings of the two views, [n, out_dim] each."""
        x1, x2 = batch["views"]
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return {"loss": self.loss_fn(*self.embed(batch))}
