"""MoCo v1 (He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020) and MoCo v2 (Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning",
arXiv 2003.04297, 2020), as MMSelfSup runs them (``moco.py``: one class, the neck and temperature set by
``mocov1.py`` / ``mocov2.py``) and as the official code orders the steps (facebookresearch/moco ``builder.py``).

    f_q = neck o backbone                    query encoder (trained); v1: Linear 2048 -> 128,
                                             v2: Linear 2048 -> 2048 -> ReLU -> Linear 128 (no BN)
    f_k = momentum copy of f_q               key encoder (never trained)
    queue: K x 128 keys of past batches      (K = 65,536; random unit vectors at first)
    for a batch of N images, two views x_q, x_k:
        f_k <- m f_k + (1 - m) f_q           once per optimizer step, before the keys (m = 0.999)
        q = L2norm(f_q(x_q))                                  # [N, 128]
        x_s, undo = shuffle(x_k)             over the global batch (all ranks), one permutation
        k = undo(L2norm(f_k(x_s)))           no gradient      # [N, 128], BatchNorm saw other images
        loss = InfoNCE(q, k, queue, T)       logits [q.k, q.queue] / T, positive at 0 (Eq. 1)
        enqueue(all_gather(k))               newest N keys replace the oldest

Temperature T = 0.07 (v1) / 0.2 (v2). v2 also changes the views (blur, jitter p=0.8, lower hue) and the
lr schedule (cosine); ``conf/algo/mocov1.yaml`` / ``mocov2.yaml`` hold the two recipes.

**Order of the momentum update.** The official code updates the key encoder at the start of ``forward``
(``_momentum_update_key_encoder``, before the keys are computed), and so does MMSelfSup 1.x (in ``loss``);
selfsup's BYOL updates its target in ``after_step``. Both give the keys of step t from the same weights
(after step t-1's optimizer update, the online weights do not change until step t's forward); they
differ only at the ends: the official order applies the (no-op) update with theta_0 first and never the
one after the last step. This module keeps the official order: ``after_step`` marks the update as due
and the next ``forward`` applies it, so that with gradient accumulation it runs once per optimizer step
(at the first micro-batch), not once per micro-batch. The mark is a plain attribute, not a buffer: it is
set at every step boundary, where the trainer checkpoints, so a resumed run starts with it set, as the
uninterrupted run does at that point (resume is bit-exact), and reading it needs no device sync.

**Shuffling BN** (Sec. 3.3). Each process's BatchNorm normalises its own samples, so a key encoder fed
the images in the queries' order could let its batch statistics tell which key belongs to which query.
The keys are therefore computed on a random permutation of the *global* batch (``distributed.batch_shuffle``:
rank r encodes rows perm[r*n:(r+1)*n]) and put back (``batch_unshuffle``). In one process with plain
BatchNorm the shuffle has no effect on the keys (the statistics are over the whole batch either way);
``bn_splits = s`` replaces every BatchNorm of both encoders by a :class:`SplitBatchNorm` that normalises
s consecutive groups of the batch separately (MoCo's CIFAR demo), so one process computes what s GPUs
with per-device BatchNorm compute: queries of rank r = rows r*n..(r+1)*n-1, keys of rank r = the
shuffled group r. With several processes and per-device BatchNorm (``sync_bn=false``), the BatchNorm
running statistics are averaged over the ranks after each step (the split rule), so every rank and
every checkpoint holds the same ones. ``sync_bn=true`` replaces the split layers by synchronised ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch, feature_dim
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.losses.infonce import InfoNCELoss
from selfsup.models.memory import Queue
from selfsup.models.momentum import MomentumEncoder
from selfsup.models.split_batchnorm import average_batchnorm_statistics, convert_split_batchnorm


class MoCoV2Neck(nn.Module):
    """MoCo v2's projection head (Chen et al. 2020, Sec. 2; MMSelfSup ``MoCoV2Neck``): Linear -> ReLU ->
    Linear, with biases and no BatchNorm, on the pooled backbone feature: 2048 -> 2048 -> 128."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """``x / |x|`` along ``dim`` in float32 with autocast off: the embeddings that enter the queue and the
    logits are the same under bf16 autocast as the float32 normalisation of the encoder's output."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.normalize(x.float(), dim=dim)


def _check_positive_int(value: int, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner} needs algo.model.{name} >= 1 (an integer), got {value!r}")
    return value


class MomentumContrast(Algorithm):
    """What MoCo and DenseCL share: a query encoder ``backbone -> neck``, its momentum copy (the key
    encoder), the momentum update once per optimizer step before the keys (official order, see the
    module docstring), shuffling BN and the optional one-process BatchNorm split."""

    num_views = 2

    def __init__(self, backbone: nn.Module, neck: nn.Module, momentum: float, bn_splits: int) -> None:
        super().__init__(backbone)
        name = type(self).__name__
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ConfigError(
                f"{name} needs algo.model.momentum in [0, 1] (key encoder <- m key + (1 - m) query; the "
                f"paper's 0.999), got {momentum!r}"
            )
        self.momentum = float(momentum)
        self.bn_splits = _check_positive_int(bn_splits, "bn_splits", name)
        self.neck = neck
        if bn_splits > 1:  # before the copy: both encoders normalise per group
            convert_split_batchnorm(self.backbone, bn_splits)
            convert_split_batchnorm(self.neck, bn_splits)
        self.key_encoder = MomentumEncoder(self.query_encoder())
        self._key_update_due = True  # see the module docstring: True at every step boundary

    def query_encoder(self) -> nn.Sequential:
        """The trained encoder whose momentum copy the key encoder is (same parameter names)."""
        return nn.Sequential(self.backbone, self.neck)

    def compile_targets(self) -> list[nn.Module]:
        key: nn.Sequential = self.key_encoder.module  # type: ignore[assignment]
        return [self.backbone, self.neck, key[0], key[1]]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """The official ``_momentum_update_key_encoder``, applied once per optimizer step: key encoder <-
        m * key encoder + (1 - m) * query encoder (BatchNorm buffers copied, ``MomentumEncoder.update``)."""
        if self._key_update_due:
            self.key_encoder.update(self.query_encoder(), self.momentum)
            self._key_update_due = False

    @torch.no_grad()
    def shuffled_keys(self, x: Tensor, encode: Callable[[Tensor], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """Shuffling BN: ``encode`` (the key encoder) applied to this rank's share of a random permutation of
        the global batch ``x``, every output put back in the order of ``x``'s rows."""
        shuffled, unshuffle = distributed.batch_shuffle(x)
        return tuple(distributed.batch_unshuffle(out, unshuffle) for out in encode(shuffled))

    def check_batch(self, x: Tensor) -> None:
        if self.training and x.shape[0] % self.bn_splits:
            raise ConfigError(
                f"{type(self).__name__} with algo.model.bn_splits={self.bn_splits} needs a per-process batch "
                f"divisible by it, got {x.shape[0]} images; change schedule.batch_size"
            )

    def after_step(self, state: TrainState) -> dict[str, float] | None:
        self._key_update_due = True
        average_batchnorm_statistics(self)  # several processes with per-device BatchNorm: one set of statistics
        return None


class MoCo(MomentumContrast):
    """MoCo v1 / v2 (see the module docstring). Defaults are MoCo v1's (He et al. 2020, Sec. 3.3 and 4):
    a linear 128-d head, a queue of 65,536 keys, m = 0.999, T = 0.07. MoCo v2: ``neck: mlp``,
    ``temperature: 0.2`` (``conf/algo/mocov2.yaml``).

    Args:
        neck: ``linear`` (v1: one Linear layer) or ``mlp`` (v2: :class:`MoCoV2Neck`).
        hidden_dim: the MLP neck's hidden width (unused by the linear neck).
        out_dim: the embedding (and queue) dimension.
        queue_size: K, the number of negative keys kept.
        momentum: m of the key encoder's update (constant, as in both papers).
        temperature: T of the InfoNCE loss.
        bn_splits: BatchNorm groups per process (1: plain BatchNorm); s emulates s devices' per-device
            BatchNorm in one process (the module docstring).
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: Literal["linear", "mlp"] = "linear",
        hidden_dim: int = 2048,
        out_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.07,
        bn_splits: int = 1,
    ) -> None:
        in_dim = feature_dim(backbone)
        _check_positive_int(out_dim, "out_dim", "MoCo")
        head: nn.Module
        if neck == "linear":
            head = nn.Linear(in_dim, out_dim)
        elif neck == "mlp":
            head = MoCoV2Neck(in_dim, _check_positive_int(hidden_dim, "hidden_dim", "MoCo"), out_dim)
        else:
            raise ConfigError(f"MoCo algo.model.neck={neck!r} must be 'linear' (MoCo v1) or 'mlp' (MoCo v2)")
        super().__init__(backbone, head, momentum, bn_splits)
        self.queue = Queue(_check_positive_int(queue_size, "queue_size", "MoCo"), out_dim)
        self.loss_fn = InfoNCELoss(temperature)

    def encode_keys(self, x: Tensor) -> tuple[Tensor]:
        """L2-normalised keys (float32) of the images ``x`` from the key encoder."""
        return (l2_normalize(self.key_encoder(x)),)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x_q, x_k = batch["views"]
        self.check_batch(x_q)
        self.momentum_update()
        q = l2_normalize(self.neck(self.backbone(x_q)))  # [n, out_dim]
        (k,) = self.shuffled_keys(x_k, self.encode_keys)  # [n, out_dim], no gradient
        loss = self.loss_fn(q, k, self.queue())
        self.queue.enqueue(k)  # after the loss: the queue of this step held only older keys
        return {"loss": loss}
