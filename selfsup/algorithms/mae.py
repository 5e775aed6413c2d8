"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

x: [B, 3, H, W] normalised images, L = (H/p)*(W/p) patches of p*p*3 pixels
t = backbone.embed(x)                          # [B, L, D]   patches + fixed sin-cos positions
t_vis, mask, restore = random_masking(t, 0.75) # [B, L/4, D] per-sample random subset
z = backbone.encode(t_vis)                     # [B, 1+L/4, D] encoder sees visible tokens only
pred = decoder(z, restore)                     # [B, L, p*p*3] mask tokens fill the gaps
loss = MSE(pred, norm_pix(patchify(x)))        # on the masked patches only
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from selfsup.algorithms.base import Algorithm, Batch
from selfsup.errors import ConfigError
from selfsup.losses import MAEReconstructionLoss
from selfsup.models.masking import patchify, random_masking
from selfsup.models.vit import Block, VisionTransformer, init_transformer_weights, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    pos_embed: Tensor  # [1, 1 + L, dim] fixed sin-cos positions

    """Lightweight decoder: embed to ``dim``, insert mask tokens, un-shuffle, add fixed positions,
    ``depth`` transformer blocks, LayerNorm, predict the pixels of every patch."""

    def __init__(
        self,
        num_patches: int,
        patch_pixels: int,
        encoder_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, int(num_patches**0.5)))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        self.apply(init_transformer_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, z: Tensor, restore: Tensor) -> Tensor:
        y = self.embed(z)  # [B, 1+L_keep, dim]
        b, n = restore.shape
        masks = self.mask_token.expand(b, n + 1 - y.shape[1], -1)
        patches = torch.cat([y[:, 1:], masks], dim=1)  # shuffled order
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, y.shape[2]))
        y = torch.cat([y[:, :1], patches], dim=1) + self.pos_embed
        y = self.norm(self.blocks(y))
        return self.pred(y[:, 1:])  # drop CLS: [B, L, p*p*C]


class MAEOutput(NamedTuple):
    loss: Tensor  # scalar: mean squared error over the removed patches
    pred: Tensor  # [B, L, p*p*C] predicted pixels of every patch
    mask: Tensor  # [B, L] 1 = removed (the loss is over these), 0 = seen by the encoder


class MAE(Algorithm):
    num_views = 1
    backbone: VisionTransformer

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(
                f"MAE needs a ViT backbone, got {type(backbone).__name__}; use backbone=vit_tiny, vit_small or vit_base"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"algo.model.mask_ratio must be in [0, 1), got {mask_ratio}")
        super().__init__(backbone)
        self.mask_ratio = mask_ratio
        p, c = backbone.patch_size, backbone.in_chans
        self.decoder = MAEDecoder(  # the official decoder's MLP ratio is the encoder's
            backbone.num_patches,
            p * p * c,
            backbone.embed_dim,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            mlp_ratio=backbone.mlp_ratio,
        )
        self.loss_fn = MAEReconstructionLoss(norm_pix=norm_pix_loss)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone.blocks, self.decoder]

    def reconstruct(self, x: Tensor, noise: Tensor | None = None) -> MAEOutput:
        """Loss, predicted patches [B, L, p*p*C] and mask [B, L] (1 = removed) of images x, from one
        masking: a visualisation shows exactly the reconstruction whose loss was computed. ``noise``
        [B, L] decides the mask (the ``noise`` of the official ``random_masking``: the smallest
        values are kept); by default it is drawn from torch's RNG."""
        kept, mask, restore = random_masking(self.backbone.embed(x), self.mask_ratio, noise)
        pred = self.decoder(self.backbone.encode(kept), restore)
        return MAEOutput(self.loss_fn(pred, patchify(x, self.backbone.patch_size), mask), pred, mask)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return {"loss": self.reconstruct(batch["views"][0]).loss}
