"""Masking building blocks shared by masked-image-modelling algorithms, each written once.

- ``random_masking``: MAE's per-sample random token masking by sorting uniform noise
  (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).
- ``BlockwiseMaskGenerator``: BEiT's block-wise masking of a patch grid, Algorithm 1
  (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022).
- ``SimMIMMaskGenerator``: SimMIM's random masking of large mask patches, upsampled to the model's patch grid
  (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022).
- ``patchify`` / ``unpatchify``: images <-> rows of patch pixels, the reconstruction targets of MAE-style methods.

All randomness comes from torch (the global RNG, or the ``generator`` passed in), never from Python's ``random``
or numpy, so that the data pipeline's per-(seed, epoch, image) seeding of torch decides every mask.
Config-level mistakes raise ``ConfigError``; tensors of the wrong shape raise ``ValueError``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfsup.errors import ConfigError

Rect = tuple[int, int, int, int]  # (top, left, height, width) of a block of patches


def random_masking(tokens: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking: keep the ``int(L * (1 - mask_ratio))`` tokens with the smallest noise.

    tokens: [B, L, D]; noise: [B, L], uniform in [0, 1); drawn with ``torch.rand`` (global RNG) when not given.
    Returns
        kept    [B, L_keep, D]  the kept tokens, in shuffled (ascending-noise) order
        mask    [B, L]          float, 1 = removed, 0 = kept, in the original token order
        restore [B, L]          the permutation that puts shuffled tokens back: ``gather(shuffled, 1, restore)``
    Same draws and result as the official ``models_mae.py``: for one RNG state, the same masks.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}; set it to the fraction of tokens to remove")
    if tokens.dim() != 3:
        raise ValueError(f"random_masking expects tokens of shape [B, L, D], got {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    keep = int(n * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, n, device=tokens.device)  # [B, L]
    elif tuple(noise.shape) != (b, n):
        raise ValueError(
            f"random_masking: noise must have shape [B, L] = {[b, n]} to match tokens {tuple(tokens.shape)}, "
            f"got {tuple(noise.shape)}"
        )
    else:
        noise = noise.to(tokens.device)
    shuffle = noise.argsort(dim=1)  # [B, L] ascending: the first `keep` are kept
    restore = shuffle.argsort(dim=1)  # [B, L]
    kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))  # [B, keep, D]
    mask = torch.ones(b, n, device=tokens.device)  # [B, L] in shuffled order
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def _grid(input_size: int | tuple[int, int] | list[int], owner: str) -> tuple[int, int]:
    if isinstance(input_size, int):
        h = w = input_size
    elif isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(isinstance(s, int) for s in input_size):
        h, w = input_size
    else:
        raise ConfigError(f"{owner}: input_size must be an int or a pair (h, w) of ints, got {input_size!r}")
    if h < 1 or w < 1:
        raise ConfigError(f"{owner}: input_size must be positive, got {input_size!r}")
    return h, w


class BlockwiseMaskGenerator:
    """BEiT's block-wise masking (Algorithm 1) of an ``h x w`` grid of patches.

    Repeat until ``num_masking_patches`` patches are masked: pick a block area ``s`` uniformly in
    ``[min_num_patches, min(max_num_patches, still to mask)]`` and an aspect ratio ``r`` log-uniformly in
    ``[min_aspect, max_aspect]``; the block is ``round(sqrt(s * r))`` rows by ``round(sqrt(s / r))`` columns, placed
    uniformly inside the grid (it must be strictly smaller than the grid in both directions). It is accepted only if
    it masks at least one new patch and no more than are still to mask; up to 10 attempts per block.

    As in the reference (microsoft/unilm ``beit/masking_generator.py``), generation stops when 10 attempts in a row
    add nothing, so the count may end slightly below ``num_masking_patches`` when no block fits the few patches
    left; it never exceeds it.

    Each attempt draws four uniforms at once with ``torch.rand(4, generator=generator)`` (area, log-aspect, top,
    left; the last two unused when the block does not fit), so the global torch RNG (or ``generator``) decides.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        name = type(self).__name__
        self.height, self.width = _grid(input_size, name)
        num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= num_patches:
            raise ConfigError(
                f"{name}: num_masking_patches must be in [0, {num_patches}] for a {self.height}x{self.width} grid, "
                f"got {num_masking_patches}"
            )
        if min_num_patches < 1:
            raise ConfigError(f"{name}: min_num_patches must be >= 1, got {min_num_patches}")
        if max_num_patches is not None and max_num_patches < min_num_patches:
            raise ConfigError(
                f"{name}: max_num_patches ({max_num_patches}) must be >= min_num_patches ({min_num_patches}); "
                "leave it unset to allow blocks up to num_masking_patches"
            )
        max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and min_aspect <= max_aspect):
            raise ConfigError(
                f"{name}: need 0 < min_aspect <= max_aspect (max_aspect defaults to 1/min_aspect), "
                f"got min_aspect={min_aspect}, max_aspect={max_aspect}"
            )
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, min_aspect={lo:.3g}, max_aspect={hi:.3g})"
        )

    def _place_block(
        self, mask: Tensor, max_mask_patches: int, generator: torch.Generator | None
    ) -> tuple[Rect, int] | None:
        """Mask one block of 1 to ``max_mask_patches`` new patches in ``mask`` [h, w], in place.

        Returns the block and how many patches it newly masked, or None after 10 failed attempts.
        """
        lo, hi = self.log_aspect_ratio
        for _ in range(10):
            u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * u[0]
            aspect_ratio = math.exp(lo + (hi - lo) * u[1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if h < self.height and w < self.width:
                top = int(u[2] * (self.height - h + 1))  # uniform in [0, height - h]
                left = int(u[3] * (self.width - w + 1))  # uniform in [0, width - w]
                block = mask[top : top + h, left : left + w]  # view: [h, w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block.fill_(True)
                    return (top, left, h, w), new
        return None

    def sample_with_blocks(self, generator: torch.Generator | None = None) -> tuple[Tensor, list[Rect]]:
        """The mask [h, w] (bool, True = masked) and the blocks (top, left, height, width) painted, in order."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        blocks: list[Rect] = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            placed = self._place_block(mask, budget, generator)
            if placed is None:  # no progress in 10 attempts: stop, possibly a little short (as the reference)
                break
            blocks.append(placed[0])
            count += placed[1]
        return mask, blocks

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        """A bool mask [h, w], True = masked; drawn from ``generator`` (default: the global torch RNG)."""
        return self.sample_with_blocks(generator)[0]


class SimMIMMaskGenerator:
    """SimMIM's random masking: mask ``ceil(n * mask_ratio)`` of the ``n = (input_size / mask_patch_size)^2``
    large mask patches, chosen uniformly without replacement, then upsample each to the model's patch grid.

    Returns a bool mask [input_size / model_patch_size, input_size / model_patch_size] (True = masked), constant
    on each ``(mask_patch_size / model_patch_size)``-sized square (official ``data/data_simmim.py``).
    """

    def __init__(
        self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4, mask_ratio: float = 0.6
    ) -> None:
        name = type(self).__name__
        for key, value in (
            ("input_size", input_size),
            ("mask_patch_size", mask_patch_size),
            ("model_patch_size", model_patch_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive int, got {value!r}")
        if input_size % mask_patch_size:
            raise ConfigError(
                f"{name}: input_size ({input_size}) must be divisible by mask_patch_size ({mask_patch_size}); "
                "change the image size or the mask patch size"
            )
        if mask_patch_size % model_patch_size:
            raise ConfigError(
                f"{name}: mask_patch_size ({mask_patch_size}) must be divisible by the model's patch size "
                f"({model_patch_size}); use a multiple of {model_patch_size}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"{name}: mask_ratio must be in [0, 1), got {mask_ratio}")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch side
        self.token_count = self.rand_size**2
        self.mask_count = math.ceil(self.token_count * mask_ratio)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )

    def __call__(self, generator: torch.Generator | None = None) -> Tensor:
        """A bool mask [input_size / model_patch_size] * 2, True = masked; from ``generator`` or the global RNG."""
        idx = torch.randperm(self.token_count, generator=generator)[: self.mask_count]
        mask = torch.zeros(self.token_count, dtype=torch.bool)  # [rand_size^2]
        mask[idx] = True
        mask = mask.reshape(self.rand_size, self.rand_size)  # [rand_size, rand_size]
        # [rand_size * scale, rand_size * scale] = [input_size / model_patch_size] * 2
        return mask.repeat_interleave(self.scale, dim=0).repeat_interleave(self.scale, dim=1)


# ---------------------------------------------------------------------------------------------- patches


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
