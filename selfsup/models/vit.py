"""Vision Transformer (Dosovitskiy et al. 2021) with fixed 2-D sin-cos position embeddings (MAE)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from selfsup.errors import ConfigError


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embeddings [1, (1 +) grid*grid, dim] (MAE, Appendix A.1).

    Half of the channels encode the column, half the row; each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000^(k / (dim/4))``, k < dim/4.
    The CLS slot, if any, is all zeros.
    """
    if dim % 4:
        raise ConfigError(f"embed dim must be divisible by 4 for 2-D sin-cos embeddings, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # [grid*grid, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)  # [grid*grid, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float().unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, d/heads]
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linears with zero bias, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    pos_embed: Tensor  # [1, 1 + L, D] fixed sin-cos positions (CLS slot zero)

    """ViT encoder. ``forward`` returns a pooled feature [B, D]:

    * ``global_pool="token"``: ``norm(x)[:, 0]``, the normalised CLS token;
    * ``global_pool="avg"``: ``fc_norm(mean of the patch tokens)``, as timm's ViT and MAE's fine-tuning
      model do (the patch tokens are averaged *before* a LayerNorm of its own, not normalised one by one).

    Masked-image algorithms use the two halves separately: ``embed`` (patches + positions, no CLS)
    and ``encode`` (prepend CLS, transformer blocks, final ``norm``) on whichever tokens they keep;
    ``encode`` is MAE's pre-training encoder in both pooling modes.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        global_pool: Literal["token", "avg"] = "token",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(
                f"image size {img_size} is not divisible by backbone.patch_size={patch_size}; "
                "pick a patch size that divides dataset.image_size"
            )
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"backbone.global_pool={global_pool!r} must be 'token' or 'avg'")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        self.mlp_ratio = mlp_ratio
        self.apply(init_transformer_weights)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def embed(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> patch tokens with positions [B, L, D] (no CLS token)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]

    def blocks_with_cls(self, tokens: Tensor) -> Tensor:
        """Prepend the CLS token and run the blocks (no final norm): [B, L', D] -> [B, 1 + L', D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.blocks(torch.cat([cls, tokens], dim=1))

    def encode(self, tokens: Tensor) -> Tensor:
        """Prepend the CLS token, run the blocks and the final norm: [B, L', D] -> [B, 1 + L', D]."""
        return self.norm(self.blocks_with_cls(tokens))

    def forward(self, x: Tensor) -> Tensor:
        z = self.blocks_with_cls(self.embed(x))  # [B, 1 + L, D]
        if self.global_pool == "token":
            return self.norm(z[:, 0])
        return self.fc_norm(z[:, 1:].mean(dim=1))
