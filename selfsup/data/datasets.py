"""Datasets. Each item is ``(image, label, index)``: a uint8 [3, H, W] tensor, the class (-1 if
unknown) and the position of the image in the dataset (memory-bank algorithms need it).

Images stay uint8 until they reach the device, where the trainer converts and normalises them
(``mean``/``std`` are dataset attributes): 4x less data through the loader, and the same tensors
can later be augmented in batches on the GPU.

``split="train"`` is the pretraining set (and the kNN monitor's memory bank); ``split="val"`` is a
labelled held-out split (the kNN queries), empty when there is none.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from selfsup.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class BackboneHints:
    """What suits a dataset's resolution; backbone configs read these through interpolation
    (``backbone.stem: ${dataset.hints.stem}``), so the choice follows the dataset unless set."""

    stem: str = "imagenet"  # ResNet stem: imagenet | cifar (validated by the backbone's schema)
    patch_size: int = 16  # ViT patch size


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with val_fraction of each class held out (scikit-learn)."""
    idx = np.arange(len(labels))
    if val_fraction <= 0:
        return idx, idx[:0]
    if not 0 < val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    n, n_val = len(labels), math.ceil(val_fraction * len(labels))  # scikit-learn rounds the held-out part up
    if n_val >= n:
        raise ConfigError(
            f"dataset.val_fraction={val_fraction} holds out {n_val} of the {n} images and leaves none to train on; "
            "lower dataset.val_fraction"
        )
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError as e:  # e.g. fewer held-out images than classes
        raise ConfigError(
            f"cannot hold out a class-stratified dataset.val_fraction={val_fraction} of {n} images in "
            f"{len(np.unique(labels))} classes ({e}); change dataset.val_fraction, or set it to 0 for no kNN split"
        ) from None
    return np.sort(train), np.sort(val)


class ImageDataset(Dataset):
    """Base class: resolution, normalisation and the deterministic evaluation transform."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if image_size < 8:
            raise ConfigError(f"dataset.image_size must be >= 8, got {image_size}")
        self.image_size = int(image_size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.num_classes = 0  # 0 = unlabelled

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """Resize the short side and centre-crop to ``image_size`` (no randomness)."""
        s = self.image_size
        return v2.Compose([v2.Resize(s, antialias=True), v2.CenterCrop(s)])

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        raise NotImplementedError


class InMemoryImages(ImageDataset):
    """Images held as one uint8 tensor [N, 3, H, W] with labels [N]."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(image_size, mean, std)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.num_classes = images, labels.long(), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        if tuple(self.images.shape[-2:]) == (self.image_size, self.image_size):
            return lambda img: img
        return super().eval_transform()

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.images[i], int(self.labels[i]), i


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of a uint8 [N, C, h, w] batch to size x size (used once, at load time)."""
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


class Digits(InMemoryImages):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images, 10 classes, no
    download. Upscaled once to ``image_size`` and repeated to 3 channels."""

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        mean: Sequence[float] = (0.30,) * 3,  # of the upscaled training digits
        std: Sequence[float] = (0.37,) * 3,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        _check_split(split)
        from sklearn.datasets import load_digits

        digits = load_digits()
        train, val = stratified_split(digits.target, val_fraction, split_seed)
        keep = train if split == "train" else val
        pixels = torch.from_numpy(digits.images[keep] * (255.0 / 16.0)).float().unsqueeze(1)
        images = _resize_uint8(pixels.round().to(torch.uint8), image_size).expand(-1, 3, -1, -1).contiguous()
        super().__init__(images, torch.from_numpy(digits.target[keep]), 10, image_size, mean, std)


class FakeImages(InMemoryImages):
    """Synthetic but learnable images for tests: each class is a smooth random colour pattern;
    each image is its class pattern, randomly shifted, plus noise. (torchvision's FakeData gives
    pure noise with random labels, which no SSL method can learn from.)"""

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 256,
        num_classes: int = 4,
        image_size: int = 32,
        mean: Sequence[float] = (0.5,) * 3,
        std: Sequence[float] = (0.25,) * 3,
        val_fraction: float = 0.25,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        _check_split(split)
        if num_samples < 1 or num_classes < 1:
            raise ConfigError("dataset.num_samples and dataset.num_classes must be >= 1")
        gen = torch.Generator().manual_seed(seed)
        protos = torch.rand(num_classes, 3, 4, 4, generator=gen)
        protos = F.interpolate(protos, size=(image_size, image_size), mode="bicubic", align_corners=False)
        n = num_samples if split == "train" else int(round(num_samples * val_fraction))
        gen.manual_seed(seed + (1 if split == "train" else 2) + split_seed * 1000)
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
        labels = torch.arange(n) % num_classes
        shifts = torch.randint(-image_size // 8, image_size // 8 + 1, (n, 2), generator=gen)
        noise = 0.15 * torch.randn(n, 3, image_size, image_size, generator=gen)
        imgs = torch.zeros(n, 3, image_size, image_size)
        for k, (c, s) in enumerate(zip(labels.tolist(), shifts.tolist())):
            imgs[k] = protos[c].roll((s[0], s[1]), dims=(1, 2))
        images = ((imgs + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        super().__init__(images, labels, num_classes, image_size, mean, std)


class CIFAR10(InMemoryImages):
    """torchvision's CIFAR-10 from a local ``root`` (downloads only with ``download=True``)."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int = 32,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = False,
        val_split: Literal["holdout", "test"] = "holdout",
    ) -> None:
        _check_split(split)
        from torchvision.datasets import CIFAR10 as TVCIFAR10

        if val_split not in ("holdout", "test"):
            raise ConfigError(f"dataset.val_split={val_split!r} must be 'holdout' or 'test'")
        root = os.path.expanduser(root)
        official_train = not (split == "val" and val_split == "test")
        try:
            tv = TVCIFAR10(root, train=official_train, download=download)
        except RuntimeError as e:
            raise DataError(
                f"dataset.root={root} holds no CIFAR-10 (expected {root}/cifar-10-batches-py): {e} "
                "Point dataset.root at the folder that contains cifar-10-batches-py, or add dataset.download=true"
            ) from None
        images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()
        labels = np.asarray(tv.targets)
        if val_split == "holdout":  # split the official training set
            train, val = stratified_split(labels, val_fraction, split_seed)
            keep = train if split == "train" else val
            images, labels = images[keep], labels[keep]
        super().__init__(images, torch.from_numpy(labels), 10, image_size, mean, std)


class ImageFolder(ImageDataset):
    """Images on disk: either class sub-folders (``root/<class>/*.jpg``, labelled) or a flat
    folder of images (unlabelled: pretraining works, the kNN monitor is off).

    The kNN queries come from ``val_root`` (same class folders as ``root``) or, without it, from a
    stratified ``val_fraction`` of ``root``.

    A file that cannot be decoded is skipped with a warning that names it (the next image is
    used instead) when ``on_bad_image=skip``; ``on_bad_image=error`` stops the run.
    """

    MAX_CONSECUTIVE_BAD = 50

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        val_fraction: float = 0.0,
        split_seed: int = 0,
        val_root: str | None = None,
        on_bad_image: Literal["skip", "error"] = "skip",
    ) -> None:
        _check_split(split)
        super().__init__(image_size, mean, std)
        if on_bad_image not in ("skip", "error"):
            raise ConfigError(f"dataset.on_bad_image={on_bad_image!r} must be 'skip' or 'error'")
        self.on_bad_image = on_bad_image
        samples, classes = self.scan(root)
        if split == "val" and val_root is not None:
            val_samples, val_classes = self.scan(val_root)
            if classes and not val_classes:
                raise DataError(
                    f"dataset.val_root={val_root} has no class folders but dataset.root has; "
                    "the kNN monitor needs labelled images in val_root/<class>/"
                )
            if val_classes and val_classes != classes:
                raise DataError(
                    f"dataset.val_root={val_root} has classes {val_classes[:5]}... that differ from "
                    f"dataset.root's {classes[:5]}...; both need the same class folders"
                )
            samples, classes = val_samples, val_classes
        elif classes and val_root is None:
            labels = np.array([y for _, y in samples])
            train, val = stratified_split(labels, val_fraction, split_seed)
            samples = [samples[i] for i in (train if split == "train" else val)]
        elif split == "val":
            samples = []  # unlabelled, or a separate val_root is used for val only
        self.root, self.samples, self.classes = root, samples, classes
        self.num_classes = len(classes)

    @staticmethod
    def scan(root: str) -> tuple[list[tuple[str, int]], list[str]]:
        """(path, label) pairs and class names; label -1 and no classes for a flat folder."""
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        path = Path(os.path.expanduser(root))
        if not path.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a folder; pass dataset.root=<image folder>")
        subdirs = [d for d in path.iterdir() if d.is_dir()]
        if subdirs:
            classes, class_to_idx = find_classes(str(path))
            samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
            if samples:
                return list(samples), classes
        flat = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not flat:
            raise DataError(
                f"dataset root {root} holds no images ({', '.join(IMG_EXTENSIONS)}) in class sub-folders "
                "or at its top level"
            )
        return [(p, -1) for p in flat], []

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """Resize the short side to image_size / 0.875, centre-crop image_size (256 -> 224)."""
        s = self.image_size
        return v2.Compose([v2.Resize(int(round(s / 0.875)), antialias=True), v2.CenterCrop(s)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        for attempt in range(self.MAX_CONSECUTIVE_BAD):
            j = (i + attempt) % len(self.samples)
            path, label = self.samples[j]
            try:
                with Image.open(path) as img:  # a substitute keeps the requested index i
                    return pil_to_tensor(img.convert("RGB")), label, i
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if self.on_bad_image == "error":
                    raise DataError(
                        f"cannot read image {path}: {e}; remove it or set dataset.on_bad_image=skip"
                    ) from None
                log.warning("skipping unreadable image %s (%s)", path, e)
        raise DataError(f"{self.MAX_CONSECUTIVE_BAD} consecutive unreadable images from {self.samples[i][0]}")
