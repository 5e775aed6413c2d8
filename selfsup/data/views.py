"""Multi-view augmentation: declared per algorithm in config (``algo.views``), run per sample.

A view is a declarative spec (:class:`ViewConfig`), not a hand-built pipeline, so the
same declaration is executed by two back-ends (``data.executor``): :class:`ViewPipeline` runs it
with torchvision v2 on one uint8 image at a time inside DataLoader workers (``per_sample``, the
reference); :class:`~selfsup.data.batched.BatchedViews` runs it on a whole uint8 batch on the device
with per-image random parameters (``batched``, the default).

What a declaration can express (each entry of ``algo.views`` is one pipeline, run ``copies`` times):

* **multi-crop** (SwAV, DINO): several entries with their own ``size`` and ``crop_scale``, e.g.
  2 x 224 px at (0.14, 1) + 6 x 96 px at (0.05, 0.14): 8 views of two sizes;
* **the same crop at two resolutions plus a mask** (BEiT, CAE): ``second_size`` adds the augmented view
  resized to another size right after it, ``mask`` draws a block-wise (BEiT) or SimMIM mask with it;
* **per-view targets** (Rotation-Pred): ``rotations: [0, 90, 180, 270]`` emits the view once per
  rotation, with target = the rotation's index;
* **patch grids** (Relative-Loc): ``grid`` splits the view into cells x cells and takes a randomly placed
  patch from each cell: the centre patch (target -1) and its 8 neighbours (targets 0..7).

A training item is ``{"views": [uint8 [3, h, w], ...], "view_targets": int64 [V] (-1: none),
"masks": {"<view index>": bool [gh, gw]}, "label": int, "index": int}``; batched, the views are
[B, 3, h, w], ``view_targets`` [B, V] and each mask [B, gh, gw].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from omegaconf import MISSING
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from selfsup.errors import ConfigError

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass
class MaskConfig:
    """A mask drawn with a view, on the model's patch grid (``view size / patch_size`` per side)."""

    kind: str = "none"  # none | block (BEiT, CAE: blocks of patches) | simmim (SimMIM: large random mask patches)
    patch_size: int = 16  # the model's patch size
    num_patches: int = 75  # block: how many patches to mask (BEiT: 75 of 14 x 14)
    min_block: int = 4  # block: smallest block, in patches
    max_block: int | None = None  # block: largest block (None: num_patches)
    min_aspect: float = 0.3  # block: aspect ratios in [min_aspect, 1 / min_aspect]
    ratio: float = 0.6  # simmim: fraction of the mask patches that are masked
    mask_patch_size: int = 32  # simmim: side of a mask patch, in pixels

    def __post_init__(self) -> None:
        if self.kind not in ("none", "block", "simmim"):
            raise ConfigError(f"algo.views[].mask.kind={self.kind!r} must be none, block or simmim")
        for key in ("patch_size", "min_block", "mask_patch_size"):
            value = getattr(self, key)
            if not value >= 1:
                raise ConfigError(f"algo.views[].mask.{key} must be >= 1, got {value}")
        if not self.num_patches >= 0:
            raise ConfigError(f"algo.views[].mask.num_patches must be >= 0, got {self.num_patches}")
        if self.max_block is not None and not self.max_block >= self.min_block:
            raise ConfigError(
                f"algo.views[].mask.max_block must be >= mask.min_block={self.min_block} or null (num_patches), "
                f"got {self.max_block}"
            )
        if not 0 < self.min_aspect <= 1:
            raise ConfigError(f"algo.views[].mask.min_aspect must be in (0, 1], got {self.min_aspect}")
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"algo.views[].mask.ratio must be in [0, 1), got {self.ratio}")


@dataclass
class GridConfig:
    """Relative-Loc's patch grid (Doersch et al. 2015): the view split into ``cells`` x ``cells``, and a
    ``patch_size`` patch at a random position inside each cell (the gap between patches and their
    jitter come from ``cell size - patch_size``). ``cells: 0`` = no grid."""

    cells: int = 0
    patch_size: int = 64

    def __post_init__(self) -> None:
        if not self.cells >= 0:
            raise ConfigError(f"algo.views[].grid.cells must be >= 0 (0 = no grid), got {self.cells}")
        if not self.patch_size >= 1:
            raise ConfigError(f"algo.views[].grid.patch_size must be >= 1, got {self.patch_size}")


@dataclass
class ViewConfig:
    """One augmentation pipeline; ``copies`` identical-but-independently-sampled views of it.

    Order: random-resized crop -> affine (rotation/translation) -> flip -> colour jitter ->
    grayscale -> Gaussian blur -> solarize. Probabilities are per sample. The same declaration runs per
    sample in DataLoader workers or batched on the device (``data.executor``).
    """

    size: int = MISSING
    copies: int = 1
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: str = "bilinear"  # bilinear | bicubic
    rotation: float = 0.0  # max degrees of a random rotation
    translate: float = 0.0  # max fraction of a random translation
    hflip: float = 0.5
    color_jitter: float = 0.0  # probability of applying jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel: float = 0.1  # kernel size as a fraction of the view size (rounded to odd)
    solarize: float = 0.0
    second_size: int | None = None  # also emit the augmented view resized to this size (BEiT/CAE)
    mask: MaskConfig = field(default_factory=MaskConfig)  # draw a mask with the view (mask.kind: block | simmim)
    rotations: list[int] = field(default_factory=list)  # emit the view once per rotation (degrees, x90)
    grid: GridConfig = field(default_factory=GridConfig)  # emit a grid's patches (grid.cells: 3 = Relative-Loc)

    def __post_init__(self) -> None:
        def bad(key: str, rule: str, value: Any) -> ConfigError:
            return ConfigError(f"algo.views[].{key} must be {rule}, got {value}")

        if self.size != MISSING and not self.size >= 1:  # MISSING: set later (Hydra reports it unset)
            raise bad("size", ">= 1 (the views take dataset.image_size unless they set their own)", self.size)
        if not self.copies >= 1:
            raise bad("copies", ">= 1", self.copies)
        for key, upper in (("crop_scale", 1.0), ("crop_ratio", float("inf"))):
            pair = list(getattr(self, key))
            if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= upper:
                rule = "0 < min <= max <= 1" if upper == 1.0 else "0 < min <= max"
                raise bad(key, f"two numbers [min, max] with {rule}", pair)
        for key in ("hflip", "color_jitter", "grayscale", "blur", "solarize"):
            _prob(self, key)
        for key in ("rotation", "brightness", "contrast", "saturation"):
            if not getattr(self, key) >= 0:
                raise bad(key, ">= 0", getattr(self, key))
        if not 0 <= self.translate <= 1:
            raise bad("translate", "in [0, 1] (a fraction of the view size)", self.translate)
        if not 0 <= self.hue <= 0.5:
            raise bad("hue", "in [0, 0.5]", self.hue)
        sigma = list(self.blur_sigma)
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise bad("blur_sigma", "two numbers [min, max] with 0 < min <= max", sigma)
        if not 0 < self.blur_kernel <= 1:
            raise bad("blur_kernel", "in (0, 1] (a fraction of the view size)", self.blur_kernel)
        if self.second_size is not None and not self.second_size >= 1:
            raise bad("second_size", ">= 1", self.second_size)
        if self.interpolation not in _INTERPOLATION:
            raise ConfigError(f"algo.views[].interpolation={self.interpolation!r} must be bilinear or bicubic")
        used = {"second_size": self.second_size, "rotations": self.rotations, "grid": self.grid.cells}
        extras = [name for name, on in used.items() if on]
        if len(extras) > 1:
            raise ConfigError(f"algo.views[] combines {' and '.join(extras)}; a view can use only one of them")
        if any(r % 90 for r in self.rotations):
            raise ConfigError(f"algo.views[].rotations={list(self.rotations)} must be multiples of 90 degrees")
        if self.size == MISSING:
            return  # the checks below need the view's size
        cell = self.size // max(1, self.grid.cells)
        if self.grid.cells and self.grid.patch_size > cell:
            raise ConfigError(
                f"algo.views[].grid: {self.grid.cells} x {self.grid.cells} cells of a {self.size} px view are "
                f"{cell} px wide, too small for patch_size={self.grid.patch_size}; lower grid.patch_size or raise "
                "the view size"
            )
        if self.mask.kind == "block" and self.size % self.mask.patch_size:
            raise ConfigError(
                f"algo.views[].mask.patch_size={self.mask.patch_size} does not divide the view size {self.size}"
            )


def as_view_config(spec: ViewConfig | Mapping[str, Any]) -> ViewConfig:
    """A :class:`ViewConfig` from itself or from a mapping of its fields (unknown keys are an error)."""
    if isinstance(spec, ViewConfig):
        return spec
    names = {f.name for f in fields(ViewConfig)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ConfigError(f"algo.views[] has unknown key(s) {unknown}; valid keys: {sorted(names)}")
    values = dict(spec)
    if isinstance(values.get("mask"), Mapping):
        values["mask"] = MaskConfig(**values["mask"])
    if isinstance(values.get("grid"), Mapping):
        values["grid"] = GridConfig(**values["grid"])
    return ViewConfig(**values)


def _prob(spec: ViewConfig, key: str) -> float:
    p = float(getattr(spec, key))
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"algo.views[].{key}={p} is a probability and must be in [0, 1]")
    return p


def build_view_transform(spec: ViewConfig | Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    """uint8 [3, H, W] -> uint8 [3, size, size]: crop, affine, flip, jitter, grey, blur, solarize."""
    spec = as_view_config(spec)  # validated by ViewConfig.__post_init__
    size = int(spec.size)
    ops: list[Callable] = [
        v2.RandomResizedCrop(
            size,
            scale=tuple(spec.crop_scale),
            ratio=tuple(spec.crop_ratio),
            interpolation=_INTERPOLATION[spec.interpolation],
            antialias=True,
        )
    ]
    if spec.rotation or spec.translate:
        t = float(spec.translate)
        ops.append(v2.RandomAffine(degrees=float(spec.rotation), translate=(t, t) if t else None))
    if spec.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(spec.hflip))
    if spec.color_jitter > 0:
        jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        ops.append(v2.RandomApply([jitter], p=spec.color_jitter))
    if spec.grayscale > 0:
        ops.append(v2.RandomGrayscale(spec.grayscale))
    if spec.blur > 0:
        k = max(3, int(round(spec.blur_kernel * size)) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=tuple(spec.blur_sigma))], p=spec.blur))
    if spec.solarize > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize))
    return v2.Compose(ops)


def expand_views(specs: Sequence[ViewConfig | Mapping[str, Any]]) -> list[ViewConfig]:
    """One entry per pipeline run (a spec with ``copies: 2`` gives two)."""
    out: list[ViewConfig] = []
    for spec in map(as_view_config, specs):
        out.extend([spec] * int(spec.copies))
    return out


@dataclass
class ViewOutputs:
    """What one pipeline run gives: its images, a target per image (-1: none), the mask drawn with the
    first image (or None)."""

    images: list[Tensor]
    targets: list[int]
    mask: Tensor | None = None


def _mask_generator(spec: ViewConfig) -> Callable[[], Tensor] | None:
    from selfsup.models.masking import BlockwiseMaskGenerator, SimMIMMaskGenerator

    m = spec.mask
    if m.kind == "block":
        grid = spec.size // m.patch_size
        return BlockwiseMaskGenerator(grid, m.num_patches, m.min_block, m.max_block, m.min_aspect)
    if m.kind == "simmim":
        return SimMIMMaskGenerator(spec.size, m.mask_patch_size, m.patch_size, m.ratio)
    return None


def _run_sizes(spec: ViewConfig) -> list[int]:
    """The side of each image one run of ``spec`` emits, in order."""
    if spec.grid.cells:
        return [spec.grid.patch_size] * spec.grid.cells**2
    if spec.rotations:
        return [spec.size] * len(spec.rotations)
    return [spec.size] + ([spec.second_size] if spec.second_size else [])


def count_views(specs: Sequence[ViewConfig | Mapping[str, Any]]) -> int:
    """The number of views an algorithm receives per image."""
    return len(view_sizes(specs))


def view_sizes(specs: Sequence[ViewConfig | Mapping[str, Any]]) -> list[int]:
    """The side of every view, in the order the algorithm receives them."""
    return [size for spec in expand_views(specs) for size in _run_sizes(spec)]


class ViewPipeline:
    """Runs one :class:`ViewConfig` on one uint8 image [3, H, W]: the augmented view (crop, affine,
    flip, jitter, grey, blur, solarize), then its rotations, grid patches or second resolution, and the
    mask. All randomness comes from torch's RNG, which the loader seeds per (seed, epoch, image)."""

    def __init__(self, spec: ViewConfig | Mapping[str, Any]) -> None:
        self.spec = spec = as_view_config(spec)  # validated by ViewConfig.__post_init__
        self.base = build_view_transform(spec)
        self.num_outputs = len(_run_sizes(spec))
        self.mask = _mask_generator(spec)
        self.second = (
            v2.Resize(
                (spec.second_size, spec.second_size), interpolation=_INTERPOLATION[spec.interpolation], antialias=True
            )
            if spec.second_size
            else None
        )

    def _grid(self, view: Tensor) -> tuple[list[Tensor], list[int]]:
        grid = self.spec.grid
        cell, p = view.shape[-1] // grid.cells, grid.patch_size
        patches, targets = [], []
        centre = (grid.cells * grid.cells) // 2
        for j in range(grid.cells * grid.cells):
            row, col = divmod(j, grid.cells)
            dy, dx = (int(v) for v in torch.randint(0, cell - p + 1, (2,)))
            top, left = row * cell + dy, col * cell + dx
            patches.append(view[:, top : top + p, left : left + p])
            targets.append(-1 if j == centre else j - (j > centre))
        return patches, targets

    def __call__(self, image: Tensor) -> ViewOutputs:
        view = self.base(image)
        if self.spec.grid.cells:
            images, targets = self._grid(view)
        elif self.spec.rotations:
            images = [torch.rot90(view, r // 90, dims=(1, 2)) for r in self.spec.rotations]
            targets = list(range(len(images)))
        else:
            images = [view] + ([self.second(view)] if self.second is not None else [])
            targets = [-1] * len(images)
        return ViewOutputs(images, targets, self.mask() if self.mask is not None else None)


class MultiViewDataset(Dataset):
    """Wraps an ``ImageDataset``: item = {"views": [uint8 view, ...], "view_targets": [V],
    "masks": {"<view index>": mask}, "label": int, "index": int}. A transform returns a tensor (one
    view) or :class:`ViewOutputs` (a :class:`ViewPipeline`)."""

    def __init__(self, base: Any, transforms: Sequence[Callable[[Tensor], Tensor | ViewOutputs]]) -> None:
        self.base, self.transforms = base, list(transforms)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label, index = self.base[i]
        views: list[Tensor] = []
        targets: list[int] = []
        masks: dict[str, Tensor] = {}
        for t in self.transforms:
            out = t(image)
            if isinstance(out, Tensor):
                out = ViewOutputs([out], [-1])
            if out.mask is not None:
                masks[str(len(views))] = out.mask
            views += out.images
            targets += out.targets
        return {
            "views": views,
            "view_targets": torch.tensor(targets, dtype=torch.long),
            "masks": masks,
            "label": label,
            "index": index,
        }


class Normalize:
    """On the device: uint8 -> float, scale to [0, 1], subtract mean, divide by std (optionally
    channels_last). Done once per batch on the accelerator instead of per image in workers."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool = False
    ) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
