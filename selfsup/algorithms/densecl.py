"""DenseCL (Wang, Zhang, Shen, Kong, Li, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", CVPR 2021), as MMSelfSup implements it (``densecl.py``, ``DenseCLNeck``, ``DenseCLHook``;
from the authors' WXinlong/DenseCL): MoCo v2 plus a pixel-level contrastive loss.

    f_q = neck o backbone; f_k = its momentum copy (m = 0.999); two queues of K = 65,536 keys each
    neck: global  g(F) = Linear(2048) -> ReLU -> Linear(128) on the pooled map      (MoCo v2's head)
          dense   d(F) = Conv1x1(2048) -> ReLU -> Conv1x1(128) on every location     [N, 128, S, S]
    for a batch of N images, two views x_q, x_k:
        f_k <- m f_k + (1 - m) f_q                   once per optimizer step, before the keys (moco.py)
        F_q = backbone(x_q)[last stage]              [N, 2048, S, S]  (S = 7 at 224 px)
        q = L2norm(g(F_q)); r_q = L2norm(d(F_q))     [N, 128], [N, 128, S^2] (per location)
        keys of the shuffled x_k (shuffling BN, moco.py), put back:
        F_k; k = L2norm(g(F_k)); r_k = L2norm(d(F_k)); k2 = L2norm(mean over locations of d(F_k))
        match[n, i] = argmax_j cos(F_q[n, :, i], F_k[n, :, j])     backbone features, not projections
        L_g = InfoNCE(q, k, global queue, T)
        L_d = InfoNCE(r_q[n, :, i], r_k[n, :, match[n, i]], dense queue, T)   mean over N x S^2 locations
        loss = (1 - lambda) L_g + lambda L_d         lambda = 0.5; 0 for the first 1,000 steps
        enqueue k (global queue) and k2 (dense queue)

T = 0.2 (MoCo v2's). The dense queue holds one key per image: the normalised mean of the key's dense
projections over the locations (MMSelfSup's ``avgpooled_x2``; the authors' ``k2``), not the mean of the
normalised ones. The correspondence is computed in float32 outside autocast: in bf16 near-equal
similarities round together and the argmax would pick the lowest index. The weight lambda is 0 before
``lambda_start_iters`` optimizer steps (the authors' warm-up hook, MMSelfSup's ``DenseCLHook(start_iters=1000)``);
the number of steps taken is a buffer, so a resumed run knows it. Needs a backbone with
``forward_stages`` (selfsup's ResNet): the dense head works on the last stage's feature map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from selfsup.algorithms.base import Batch, feature_dim
from selfsup.algorithms.moco import MoCoV2Neck, MomentumContrast, _check_positive_int, l2_normalize
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.losses.infonce import InfoNCELoss
from selfsup.models.memory import Queue


class DenseCLNeck(nn.Module):
    """DenseCL's two projection heads in parallel (MMSelfSup ``DenseCLNeck`` with ``num_grid=None``): the
    global MLP on the average-pooled map and the dense 1x1-conv MLP on every location.

    ``forward(F)`` for a feature map F [N, C, S, S] returns ``(global [N, out], dense [N, out, S*S],
    dense_mean [N, out])``, the last being the dense projections averaged over the locations (the key
    that enters the dense queue)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.global_mlp = MoCoV2Neck(in_dim, hidden_dim, out_dim)
        self.dense_mlp = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1)
        )

    def forward(self, feature_map: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)
        dense = self.dense_mlp(feature_map).flatten(2)  # [N, out, S*S]
        return self.global_mlp(pooled), dense, dense.mean(dim=2)


def last_feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's last feature map [N, C, S, S] (``forward_stages(x)[-1]`` of selfsup's ResNet)."""
    stages: Callable[[Tensor], list[Tensor]] = backbone.forward_stages  # type: ignore[assignment]
    return stages(x)[-1]


@torch.no_grad()
def dense_correspondence(query_features: Tensor, key_features: Tensor) -> Tensor:
    """For each query location, the key location whose backbone feature is most similar (cosine).

    Args:
        query_features, key_features: [N, C, L] backbone features of the two views of the same N images
            (L = S*S locations).

    Returns:
        [N, L] int64: entry (n, i) is argmax_j cos(query_features[n, :, i], key_features[n, :, j]).
        Computed in float32 with autocast off (the argmax decides which pairs are positives).
    """
    if query_features.dim() != 3 or key_features.shape != query_features.shape:
        raise ValueError(
            f"dense_correspondence expects two [N, C, L] feature tensors of the same shape, got "
            f"{tuple(query_features.shape)} and {tuple(key_features.shape)}"
        )
    q = l2_normalize(query_features.detach(), dim=1)
    k = l2_normalize(key_features.detach(), dim=1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        similarity = torch.bmm(q.transpose(1, 2), k)  # [N, L_query, L_key]
        return similarity.argmax(dim=2)


class DenseCL(MomentumContrast):
    """DenseCL (see the module docstring). Defaults are the paper's / MMSelfSup's ``densecl.py``.

    Args:
        hidden_dim: hidden width of both heads (2048).
        out_dim: embedding dimension of both heads and queues (128).
        queue_size: K of each queue (65,536).
        momentum: m of the key encoder (0.999, constant).
        temperature: T of both InfoNCE losses (0.2).
        loss_lambda: lambda, the weight of the dense loss (0.5).
        lambda_start_iters: optimizer steps with lambda = 0 at the start (1,000; 0 = none).
        bn_splits: BatchNorm groups per process (see moco.py; 1 = plain BatchNorm).
    """

    steps_done: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        loss_lambda: float = 0.5,
        lambda_start_iters: int = 1000,
        bn_splits: int = 1,
    ) -> None:
        if not callable(getattr(backbone, "forward_stages", None)):
            raise ConfigError(
                f"DenseCL needs a backbone with forward_stages (a ResNet: the dense head works on the last "
                f"feature map), got {type(backbone).__name__}; use backbone=resnet18 or resnet50"
            )
        for value, name in ((hidden_dim, "hidden_dim"), (out_dim, "out_dim"), (queue_size, "queue_size")):
            _check_positive_int(value, name, "DenseCL")
        if isinstance(loss_lambda, bool) or not isinstance(loss_lambda, (int, float)) or not 0 <= loss_lambda <= 1:
            raise ConfigError(f"DenseCL needs algo.model.loss_lambda in [0, 1] (the paper's 0.5), got {loss_lambda!r}")
        if isinstance(lambda_start_iters, bool) or not isinstance(lambda_start_iters, int) or lambda_start_iters < 0:
            raise ConfigError(
                f"DenseCL needs algo.model.lambda_start_iters >= 0 (steps with lambda = 0), got {lambda_start_iters!r}"
            )
        super().__init__(backbone, DenseCLNeck(feature_dim(backbone), hidden_dim, out_dim), momentum, bn_splits)
        self.global_queue = Queue(queue_size, out_dim)
        self.dense_queue = Queue(queue_size, out_dim)
        self.loss_fn = InfoNCELoss(temperature)
        self.loss_lambda = float(loss_lambda)
        self.lambda_start_iters = lambda_start_iters
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def compile_targets(self) -> list[nn.Module]:  # the backbones run forward_stages, which compile() skips
        key: nn.Sequential = self.key_encoder.module  # type: ignore[assignment]
        return [self.backbone, self.neck, key[1]]

    def current_lambda(self) -> Tensor:
        """lambda at this step (a 0-d tensor: no device sync): 0 during the first ``lambda_start_iters``
        optimizer steps, then ``loss_lambda``."""
        started = self.steps_done >= self.lambda_start_iters
        return started.float() * self.loss_lambda

    def encode_keys(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Key encoder on ``x``: (k [N, out], r_k [N, out, L], k2 [N, out], backbone features [N, C, L]),
        the embeddings L2-normalised in float32."""
        key: nn.Sequential = self.key_encoder.module  # type: ignore[assignment]
        with torch.no_grad():
            feature_map = last_feature_map(key[0], x)
            k, r_k, k2 = key[1](feature_map)
        return l2_normalize(k), l2_normalize(r_k), l2_normalize(k2), feature_map.flatten(2)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x_q, x_k = batch["views"]
        self.check_batch(x_q)
        self.momentum_update()
        feature_map = last_feature_map(self.backbone, x_q)  # [n, C, S, S]
        q, r_q, _ = self.neck(feature_map)
        q, r_q = l2_normalize(q), l2_normalize(r_q)  # [n, out], [n, out, L]
        k, r_k, k2, key_features = self.shuffled_keys(x_k, self.encode_keys)
        match = dense_correspondence(feature_map.flatten(2), key_features)  # [n, L]
        r_k = torch.gather(r_k, 2, match.unsqueeze(1).expand(-1, r_k.shape[1], -1))  # [n, out, L]: matched keys
        loss_global = self.loss_fn(q, k, self.global_queue())
        dim = r_q.shape[1]
        loss_dense = self.loss_fn(
            r_q.transpose(1, 2).reshape(-1, dim), r_k.transpose(1, 2).reshape(-1, dim), self.dense_queue()
        )
        lam = self.current_lambda()
        self.global_queue.enqueue(k)
        self.dense_queue.enqueue(k2)
        return {
            "loss": (1 - lam) * loss_global + lam * loss_dense,
            "loss_global": loss_global.detach(),
            "loss_dense": loss_dense.detach(),
            "loss_lambda": lam,
        }

    def after_step(self, state: TrainState) -> dict[str, float] | None:
        super().after_step(state)
        self.steps_done.fill_(state.step)
        return None
