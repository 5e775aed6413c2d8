"""Multi-view augmentation: declared per algorithm in config (``algo.views``), run per sample.

A view is a declarative spec (:class:`ViewConfig`), not a hand-built pipeline, so the
same declaration can be executed by different back-ends: today ``build_view_transform`` turns it
into a torchvision v2 pipeline on uint8 tensors inside DataLoader workers; a batched GPU executor
(per-sample random parameters on a uint8 batch already on the device) can read the same specs.
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
class ViewConfig:
    """One augmentation pipeline; ``copies`` identical-but-independently-sampled views of it.

    Order: random-resized crop -> affine (rotation/translation) -> flip -> colour jitter ->
    grayscale -> Gaussian blur -> solarize. Probabilities are per sample. The same declaration is
    meant to run per sample in DataLoader workers (today) or batched on the device (speed issue).
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


def as_view_config(spec: ViewConfig | Mapping[str, Any]) -> ViewConfig:
    """A :class:`ViewConfig` from itself or from a mapping of its fields (unknown keys are an error)."""
    if isinstance(spec, ViewConfig):
        return spec
    names = {f.name for f in fields(ViewConfig)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ConfigError(f"algo.views[] has unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return ViewConfig(**{k: v for k, v in spec.items()})


def _prob(spec: ViewConfig, key: str) -> float:
    p = float(getattr(spec, key))
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"algo.views[].{key}={p} is a probability and must be in [0, 1]")
    return p


def build_view_transform(spec: ViewConfig | Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    """uint8 [3, H, W] -> uint8 [3, size, size]: crop, affine, flip, jitter, grey, blur, solarize."""
    spec = as_view_config(spec)
    size = int(spec.size)
    if spec.interpolation not in _INTERPOLATION:
        raise ConfigError(f"algo.views[].interpolation={spec.interpolation!r} must be bilinear or bicubic")
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
    if _prob(spec, "hflip") > 0:
        ops.append(v2.RandomHorizontalFlip(spec.hflip))
    if _prob(spec, "color_jitter") > 0:
        jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        ops.append(v2.RandomApply([jitter], p=spec.color_jitter))
    if _prob(spec, "grayscale") > 0:
        ops.append(v2.RandomGrayscale(spec.grayscale))
    if _prob(spec, "blur") > 0:
        k = max(3, int(round(spec.blur_kernel * size)) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=tuple(spec.blur_sigma))], p=spec.blur))
    if _prob(spec, "solarize") > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize))
    return v2.Compose(ops)


def expand_views(specs: Sequence[ViewConfig | Mapping[str, Any]]) -> list[ViewConfig]:
    """One entry per produced view (a spec with ``copies: 2`` gives two)."""
    out: list[ViewConfig] = []
    for spec in map(as_view_config, specs):
        if int(spec.copies) < 1:
            raise ConfigError(f"algo.views[].copies must be >= 1, got {spec.copies}")
        out.extend([spec] * int(spec.copies))
    return out


class MultiViewDataset(Dataset):
    """Wraps an ``ImageDataset``: item = {"views": [uint8 view, ...], "label": int, "index": int}."""

    def __init__(self, base: Dataset, transforms: Sequence[Callable[[Tensor], Tensor]]) -> None:
        self.base, self.transforms = base, list(transforms)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label, index = self.base[i]
        return {"views": [t(image) for t in self.transforms], "label": label, "index": index}


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
