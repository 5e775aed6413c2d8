"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021),
as the official code (facebookresearch/moco-v3, ``moco/builder.py``) and MMSelfSup 1.x (``mocov3.py``,
``MoCoV3Head``, ``CosineEMA``) run it.

    base encoder      f_q = projector g o backbone f        (trained), then predictor h
    momentum encoder  f_k = momentum copy of g o f          (never trained: EMA of the base encoder)
    for a batch of n images (N over all GPUs), two views x1, x2 (BYOL's asymmetric pipelines):
        q1, q2 = h(g(f(x1))), h(g(f(x2)))                   # [n, 256] each; one pass per view (BN per view)
        k1, k2 = f_k(x1), f_k(x2)                           # [n, 256], no gradient
        loss = ctr(q1, k2) + ctr(q2, k1)
        ctr(q, k) = 2T * CE(norm(q) @ norm(all_gather(k)).T / T, labels = arange(n) + rank * n)   # [n, N]
    after each optimizer step:
        m = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2           # cosine from m_0 to 1 over the K steps
        f_k <- m * f_k + (1 - m) * f_q                      # (BN statistics copied)

MLPs (official ``_build_mlp``: Linear without bias, BN + ReLU between layers, the last BN without affine
parameters, as SimCLR's): ResNet projector 2 layers 2048 -> 4096 -> 256 with last BN, predictor 2 layers
256 -> 4096 -> 256 *without* last BN; ViT projector 3 layers with last BN, predictor 2 layers with last BN.
``projector_layers`` / ``predictor_last_bn`` / ``temperature`` left at None take the paper's choice for the
backbone: (2, False, T = 1.0) for a ResNet, (3, True, T = 0.2) for a ViT.

ViT: the patch projection stays at its random initialisation (stop-gradient on the patch embedding, paper
Sec. 4.2: "random patch projection" stabilises training): ``backbone.patch_embed``'s weight and bias get
``requires_grad=False`` (``freeze_patch_embed``), so the optimizer never sees them.

Defaults are the paper's (m_0 = 0.99 with the cosine schedule, 256-d output, 4096-d MLPs). MMSelfSup's recipes:
``experiment=mocov3_resnet50_8xb512-amp-coslr-100e_in1k`` and
``experiment=mocov3_vit-small-p16_16xb256-amp-coslr-300e_in1k``.
"""

from __future__ import annotations

from torch import nn

from selfsup.algorithms.base import MomentumTwin, feature_dim
from selfsup.engine.schedules import Policy, ScalarSchedule
from selfsup.errors import ConfigError
from selfsup.losses.mocov3_contrastive import MoCoV3ContrastiveLoss
from selfsup.models.necks import MLPNeck
from selfsup.models.vit import VisionTransformer


class MoCoV3MLP(MLPNeck):
    """The official ``_build_mlp``: ``num_layers`` Linear layers without bias, BN + ReLU between them and,
    with ``last_bn``, a BatchNorm without affine parameters after the last one."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, last_bn=last_bn, bias=False)
        if last_bn:
            self.mlp[-1] = nn.BatchNorm1d(out_dim, affine=False)


class MoCoV3(MomentumTwin):
    """MoCo v3's MLPs and its contrastive loss on :class:`MomentumTwin` (``online()`` is f_q without the
    predictor, ``target`` the momentum encoder f_k)."""

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        projector_layers: int | None = None,
        predictor_last_bn: bool | None = None,
        temperature: float | None = None,
        momentum: ScalarSchedule = ScalarSchedule(start=0.99, end=1.0, policy=Policy.cosine),  # noqa: B008
        freeze_patch_embed: bool = True,
    ) -> None:
        vit = isinstance(backbone, VisionTransformer)
        layers = projector_layers if projector_layers is not None else (3 if vit else 2)
        if layers < 1:
            raise ConfigError(
                f"algo.model.projector_layers must be >= 1 (or null: 2 for a ResNet, 3 for a ViT), got {layers}"
            )
        last_bn = predictor_last_bn if predictor_last_bn is not None else vit
        temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        if not temperature > 0:
            raise ConfigError(f"algo.model.temperature must be > 0 (paper: 1.0 ResNet, 0.2 ViT), got {temperature}")
        if vit and freeze_patch_embed:  # random patch projection (Sec. 4.2)
            backbone.patch_embed.requires_grad_(False)
        super().__init__(
            backbone,
            projector=MoCoV3MLP(feature_dim(backbone), hidden_dim, out_dim, layers, last_bn=True),
            predictor=MoCoV3MLP(out_dim, hidden_dim, out_dim, 2, last_bn=last_bn),
            momentum=momentum,
            loss_fn=MoCoV3ContrastiveLoss(temperature),
        )
        self.temperature = temperature
