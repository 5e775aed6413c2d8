"""DINO (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021), as the official code (facebookresearch/dino, ``main_dino.py``,
``DINOHead``, ``MultiCropWrapper``) runs it; MMSelfSup 1.x has it in ``projects/dino``.

    student = head g o backbone f   (trained);   teacher = g' o f' = momentum copy of g o f (EMA, no gradient)
    for a batch of n images, V = 2 + L crops: 2 global crops (224 px, scale 0.4-1) and L local (96 px, 0.05-0.4):
        s_1..s_V = g(f(crops))            # [n, K] each; f runs once per resolution (consecutive equal sizes
                                          # batched together: the 2 global crops, then the L local crops)
        t_1, t_2 = g'(f'(global crops))   # [n, K], no gradient: the teacher sees only the global crops
        loss = mean over pairs (a in {1, 2}, b in 1..V, b != a) of
               mean_i sum_k -softmax((t_a - C) / T_t)_ik * log_softmax(s_b / T_s)_ik          (Eq. 3)
        C <- m_C C + (1 - m_C) * mean of t_1, t_2 over the global batch (all ranks)           (Eq. 4, m_C = 0.9)
    before each optimizer step, during the first `freeze_last_layer` epochs: drop the gradient of the head's
        last (weight-normalised) layer
    after each optimizer step:
        m = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2;   teacher <- m * teacher + (1 - m) * student   (m_0 = 0.996)
        T_t: linear warm-up 0.04 -> 0.07 over the first 30 epochs, then constant (per step here; the official
             code steps it per epoch)

Head (``DINOHead``): 3-layer MLP in -> 2048 -> 2048 -> 256 (GELU, no BN), L2-normalised bottleneck, then a
weight-normalised linear layer 256 -> K = 65536 without bias whose norm g is fixed at 1 (``norm_last_layer``).
The teacher is a copy without stochastic depth (the official teacher is built with drop_path_rate 0).

State that survives a resume: the teacher (a sub-module), the center and the current teacher temperature
(registered buffers). The center is updated at the end of each training ``forward`` (as the official loss
does), in float32 outside autocast, from the teacher outputs *before* centring.

A ViT backbone runs the local crops at their own resolution with its position embeddings interpolated
(bicubic, as the official ``interpolate_pos_encoding``). Recipes: the paper's ViT-S/16 hyper-parameters are the
defaults with algo/dino.yaml; MMSelfSup's ViT-B/16 recipe is ``experiment=dino_vit-base-p16_8xb64-amp-coslr-100e_in1k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch, TrainContext, feature_dim
from selfsup.engine.schedules import Policy, ScalarSchedule
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.losses.dino import DINOLoss
from selfsup.models.momentum import MomentumEncoder
from selfsup.models.vit import VisionTransformer


class WeightNormLinear(nn.Module):
    """``y = x W^T`` with ``W = g * V / |V|`` row by row (Salimans & Kingma 2016; ``nn.utils.weight_norm`` with
    dim 0 under the official names ``weight_g`` [out, 1] and ``weight_v`` [out, in]), no bias. ``g`` starts at 1."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """DINO's projection head: ``num_layers`` linears (GELU between, BN optional), the bottleneck output
    L2-normalised, then :class:`WeightNormLinear` to ``out_dim``; ``norm_last_layer`` freezes its g at 1."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1])] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def vit_features(vit: VisionTransformer, x: Tensor) -> Tensor:
    """The ViT's pooled feature of images of any size that its patch size divides: the fixed sin-cos position
    embeddings of its own grid are resized (bicubic) to the input's grid, as DINO's ``interpolate_pos_encoding``."""
    h, w, p = x.shape[-2], x.shape[-1], vit.patch_size
    if (h, w) == (vit.img_size, vit.img_size):
        return vit(x)
    if h % p or w % p:
        raise ConfigError(
            f"DINO got a {h}x{w} crop, which the ViT's patch size {p} does not divide; make every size in "
            "algo.views a multiple of backbone.patch_size"
        )
    dim, grid = vit.pos_embed.shape[-1], vit.grid
    pos = vit.pos_embed[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h // p, w // p), mode="bicubic", align_corners=False)
    tokens = vit.patch_embed(x).flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
    z = vit.blocks_with_cls(tokens)  # as VisionTransformer.forward from here on
    return vit.norm(z[:, 0]) if vit.global_pool == "token" else vit.fc_norm(z[:, 1:].mean(dim=1))


def multicrop_forward(backbone: nn.Module, head: nn.Module, crops: Sequence[Tensor]) -> Tensor:
    """``head(backbone(crops))`` [V * n, K], crop-major: the backbone runs once per run of consecutive crops of
    one size (official ``MultiCropWrapper``), the head once on all features."""
    feats, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        x = torch.cat(list(crops[start:end]))
        feats.append(vit_features(backbone, x) if isinstance(backbone, VisionTransformer) else backbone(x))
        start = end
    return head(torch.cat(feats))


class DINO(Algorithm):
    center: Tensor  # [1, out_dim] running mean of the teacher's outputs
    teacher_temp_value: Tensor  # [] the teacher temperature of the next step

    num_global_crops = 2
    num_views = 10  # the default multi-crop: 2 global + 8 local (instances: 2 + num_local_crops)

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        num_local_crops: int = 8,
        student_temp: float = 0.1,
        teacher_temp: ScalarSchedule = ScalarSchedule(  # noqa: B008
            start=0.07, policy=Policy.constant, warmup_epochs=30, warmup_start=0.04
        ),
        center_momentum: float = 0.9,
        momentum: ScalarSchedule = ScalarSchedule(start=0.996, end=1.0, policy=Policy.cosine),  # noqa: B008
        freeze_last_layer: int = 1,
    ) -> None:
        super().__init__(backbone)
        if out_dim < 1 or hidden_dim < 1 or bottleneck_dim < 1:
            raise ConfigError("DINO needs algo.model.out_dim, hidden_dim and bottleneck_dim >= 1")
        if num_local_crops < 0:
            raise ConfigError(f"algo.model.num_local_crops must be >= 0, got {num_local_crops}")
        if not 0 <= center_momentum <= 1:
            raise ConfigError(f"algo.model.center_momentum must be in [0, 1] (paper: 0.9), got {center_momentum}")
        if freeze_last_layer < 0:
            raise ConfigError(f"algo.model.freeze_last_layer must be >= 0 epochs, got {freeze_last_layer}")
        self.num_views = self.num_global_crops + num_local_crops
        self.head = DINOHead(
            feature_dim(backbone), out_dim, hidden_dim, bottleneck_dim, 3, use_bn_in_head, norm_last_layer
        )
        self.teacher = MomentumEncoder(nn.Sequential(self.backbone, self.head))
        for m in self.teacher.modules():  # the teacher has no stochastic depth
            if isinstance(m, StochasticDepth):
                m.p = 0.0
        self.teacher_temp, self.momentum = teacher_temp, momentum
        self.center_momentum, self.freeze_last_layer = center_momentum, freeze_last_layer
        self.loss_fn = DINOLoss(student_temp)
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = teacher_temp.warmup_epochs > 0 and teacher_temp.warmup_start is not None
        first = teacher_temp.warmup_start if warm else teacher_temp.start  # the value at step 0
        self.register_buffer("teacher_temp_value", torch.tensor(float(first)))  # type: ignore[arg-type]

    def student(self) -> nn.Sequential:
        """The network whose momentum copy the teacher is (same parameter names)."""
        return nn.Sequential(self.backbone, self.head)

    def compile_targets(self) -> list[nn.Module]:
        teacher: nn.Sequential = self.teacher.module  # type: ignore[assignment]
        return [self.backbone, teacher[0]]

    def on_epoch_start(self, ctx: TrainContext) -> None:
        self.teacher_temp_value.fill_(self.teacher_temp(ctx.state))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        crops = batch["views"]
        g = self.num_global_crops
        student = multicrop_forward(self.backbone, self.head, crops).chunk(len(crops))  # V x [n, K]
        teacher_net: nn.Sequential = self.teacher.module  # type: ignore[assignment]
        with torch.no_grad():
            teacher = multicrop_forward(teacher_net[0], teacher_net[1], crops[:g])  # [g * n, K]
        loss = self.loss_fn(student, teacher.chunk(g), self.center, self.teacher_temp_value)
        if self.training:
            self.update_center(teacher)
        return {"loss": loss}

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """C <- m_C C + (1 - m_C) * mean of the teacher outputs [rows, K] over every rank's rows; float32 outside
        autocast (summing thousands of bf16 logits in bf16 would round the mean to 3 digits)."""
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            total = distributed.all_reduce_(teacher.detach().float().sum(dim=0, keepdim=True))
            batch_center = total / (teacher.shape[0] * distributed.get_world_size())
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def before_optimizer_step(self, state: TrainState) -> None:
        if state.epoch < self.freeze_last_layer:  # official cancel_gradients_last_layer: no update at all
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, state: TrainState) -> dict[str, float] | None:
        m = self.momentum(state)
        self.teacher.update(self.student(), m)
        temp = self.teacher_temp(state)  # for the next step
        self.teacher_temp_value.fill_(temp)
        return {"momentum": m, "teacher_temp": temp}
