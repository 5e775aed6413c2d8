"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

x: [B, 3, H, W] normalised images, L = (H/p)*(W/p) patches of p*p*3 pixels
t = backbone.embed(x)                          # [B, L, D]   patches + fixed sin-cos positions
t_vis, mask, restore = random_masking(t, 0.75) # [B, L/4, D] per-sample random subset
z = backbone.encode(t_vis)                     # [B, 1+L/4, D] encoder sees visible tokens only
pred = decoder(z, restore)                     # [B, L, p*p*3] mask tokens fill the gaps
loss = MSE(pred, norm_pix(patchify(x)))        # on the masked patches only
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.algorithms.base import Algorithm, Batch
from selfsup.errors import ConfigError
from selfsup.losses import MAEReconstructionLoss
from selfsup.models.vit import Block, VisionTransformer, init_transformer_weights, sincos_pos_embed_2d


def patchify(imgs: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], pixels of a patch in (row, col, channel) order."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, c: int = 3) -> Tensor:
    """[B, L, p*p*C] -> [B, C, H, W] (inverse of ``patchify``)."""
    b, n, _ = patches.shape
    g = int(n**0.5)
    x = patches.reshape(b, g, g, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)


def random_masking(tokens: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of tokens per sample, by sorting uniform noise.

    Returns the kept tokens [B, L_keep, D], the mask [B, L] (1 = removed, in the original order)
    and ``restore`` [B, L], the permutation that puts shuffled tokens back in place.
    """
    b, n, d = tokens.shape
    keep = int(n * (1 - mask_ratio))
    noise = torch.rand(b, n, device=tokens.device)
    shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    restore = shuffle.argsort(dim=1)
    kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


class MAEDecoder(nn.Module):
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


class MAE(Algorithm):
    num_views = 1

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
        self.decoder = MAEDecoder(
            backbone.num_patches, p * p * c, backbone.embed_dim, decoder_dim, decoder_depth, decoder_heads
        )
        self.loss_fn = MAEReconstructionLoss(norm_pix=norm_pix_loss)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone.blocks, self.decoder]

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted patches [B, L, p*p*C] and mask [B, L] for images x (used for visualisation)."""
        kept, mask, restore = random_masking(self.backbone.embed(x), self.mask_ratio)
        return self.decoder(self.backbone.encode(kept), restore), mask

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = batch["views"][0]
        pred, mask = self.reconstruct(x)
        loss = self.loss_fn(pred, patchify(x, self.backbone.patch_size), mask)
        return {"loss": loss}
