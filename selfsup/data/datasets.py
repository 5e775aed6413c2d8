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
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from selfsup.errors import ConfigError, DataError

log = logging.getLogger("selfsup")


class Cache(str, Enum):
    """``dataset.cache``: where the training images live while the batched executor augments them.

    * ``none``: read per epoch by DataLoader workers (JPEG decoding; the workers also cut each view to its size,
      which shrinks the data, and the device does the colour part): ImageNet-size folders;
    * ``memory``: decoded once into one uint8 tensor in RAM; each epoch indexes it with the seeded permutation,
      no workers, no decoding (digits, CIFAR, a folder whose images fit in RAM at ``image_size``);
    * ``device``: that tensor on the GPU: the batch never crosses PCIe;
    * ``auto``: ``device`` on CUDA and ``memory`` on the CPU for datasets held in memory anyway (digits, CIFAR-10,
      fake), ``none`` for image folders.
    """

    auto = "auto"
    none = "none"
    memory = "memory"
    device = "device"


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


def check_image_size(image_size: int) -> None:
    if not image_size >= 8:
        raise ConfigError(f"dataset.image_size must be >= 8, got {image_size}")


class ImageDataset(Dataset):
    """Base class: resolution, normalisation and the deterministic evaluation transform."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        check_image_size(image_size)
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
        check_image_size(image_size)  # before the images are resized to it
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
        check_image_size(image_size)  # before the images are drawn at that size
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
        except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            folder = os.path.join(root, "cifar-10-batches-py")
            if os.path.isdir(folder):
                raise DataError(
                    f"dataset.root={root} holds an incomplete or corrupted CIFAR-10 in {folder}; delete that "
                    "folder and add dataset.download=true, or point dataset.root at a complete copy"
                ) from None
            raise DataError(
                f"dataset.root={root} holds no CIFAR-10 (expected {folder}); point dataset.root at the folder "
                "that contains cifar-10-batches-py, or add dataset.download=true"
            ) from None
        images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()
        labels = np.asarray(tv.targets)
        if val_split == "holdout":  # split the official training set
            train, val = stratified_split(labels, val_fraction, split_seed)
            keep = train if split == "train" else val
            images, labels = images[keep], labels[keep]
        super().__init__(images, torch.from_numpy(labels), 10, image_size, mean, std)


def _over_black(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 straight alpha -> [H, W, 3] uint8 composited onto black: colour * alpha / 255,
    rounded to the nearest integer (exact integer arithmetic; the quotient never ends in .5)."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def to_rgb_uint8(img: Image.Image) -> Tensor:
    """The pixels of a PIL image of any mode as a uint8 [3, H, W] tensor of 8-bit RGB values.

    ``img.convert("RGB")`` (what torchvision's ImageFolder does) clips deep images instead of scaling
    them, so a 16-bit PNG comes out all white, and it drops alpha. Here, by mode:

    * ``RGB``: as is. ``1`` (0 or 255), ``L``: grey, repeated to the 3 channels.
    * ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey, e.g. 16-bit PNG/TIFF): value * 255 / 65535,
      rounded to the nearest integer (= value / 257; 0 -> 0, 65535 -> 255).
    * ``I`` (32-bit integer grey): if every value fits 16 bits (<= 65535; PIL often opens 16-bit PNGs
      as ``I``), the 16-bit rule above; otherwise value * 255 / max, the image's own maximum, rounded.
      Negative values are black (0) in both cases.
    * ``F`` (32-bit float grey): if its maximum is <= 1 the values are taken as [0, 1] (clipped to it,
      times 255), else as [0, 255] (clipped to it); then rounded to the nearest integer (halves to
      even). NaN is black; +inf is white.
    * Alpha (``LA``, ``PA``, ``RGBA``, and ``P``/``L``/``RGB`` with a ``transparency`` entry, e.g. a
      PNG tRNS chunk): composited onto BLACK, colour * alpha / 255 rounded, so a fully transparent
      pixel is black whatever colour it hides (torchvision's ``convert("RGB")`` simply drops alpha and
      shows that hidden colour). ``La``/``RGBa`` (premultiplied alpha) already are the image over
      black: their colour bands are used as they are.
    * ``P``, ``PA``: through their palette (PIL). ``CMYK`` (naive: (255 - C) * (255 - K) / 255, as PIL
      converts; no ICC profile), ``YCbCr`` (JPEG's full-range BT.601), ``LAB``, ``HSV``, ``RGBX`` and
      any other mode: PIL's own ``convert("RGB")``.

    A mode PIL cannot convert raises ValueError (ImageFolder counts the file as unreadable).
    """
    mode, info = img.mode, img.info
    if mode in ("LA", "PA", "RGBA") or (mode in ("L", "P", "RGB") and info.get("transparency") is not None):
        rgb = _over_black(np.asarray(img.convert("RGBA")))
    elif mode in ("La", "RGBa"):  # premultiplied alpha
        rgb = np.asarray(img)[..., :-1]
    elif mode in ("RGB", "L"):
        rgb = np.asarray(img)
    elif mode == "1":
        rgb = np.asarray(img).astype(np.uint8) * 255
    elif mode == "I" or mode.startswith("I;16"):
        v = np.asarray(img).astype(np.int64).clip(min=0)
        top = int(v.max()) if v.size else 0
        if top > 65535:  # only mode I can hold more than 16 bits: scale by its own maximum
            rgb = np.rint(v.astype(np.float64) * 255 / top).astype(np.uint8)
        else:  # round(v * 255 / 65535) = round(v / 257) = floor((2v + 257) / 514); never a tie
            rgb = ((2 * v + 257) // 514).astype(np.uint8)
    elif mode == "F":
        v = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0)  # +-inf -> +-largest float
        v = v.clip(0, 1) * 255 if v.size and v.max() <= 1 else v.clip(0, 255)
        rgb = np.rint(v).astype(np.uint8)
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        rgb = np.asarray(img.convert("RGB"))
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # a writable copy of PIL's read-only buffer
    if t.dim() == 2 or t.shape[-1] == 1:  # grey (La gives [H, W, 1])
        return t.reshape(t.shape[0], t.shape[1]).unsqueeze(0).repeat(3, 1, 1)
    return t.permute(2, 0, 1)  # [3, H, W], channels-last memory like torchvision's pil_to_tensor


# what a file that is not a decodable image raises in PIL (open, load or conversion)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def _listing(names: Sequence[str], most: int) -> str:
    """'a, b, c' or 'a, b, c and 4 more' (the first ``most`` names)."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class ImageFolder(ImageDataset):
    """Images on disk: either class sub-folders (``root/<class>/**/*.jpg``, labelled) or a flat
    folder of images (unlabelled: pretraining works, the kNN monitor is off). See :meth:`scan` for
    what counts as a class and an image, and :func:`to_rgb_uint8` for how each image mode is decoded.

    The kNN queries come from ``val_root`` (same class folders as ``root``) or, without it, from a
    stratified ``val_fraction`` of ``root`` (which needs class folders of at least 2 images each).

    A file that cannot be decoded stops the run with ``on_bad_image=error`` (a DataError naming it).
    With ``on_bad_image=skip`` the next readable image is returned in its place (with the requested
    index) and the file is flagged in :attr:`unreadable`, a uint8 tensor [len(samples)] in shared
    memory, so flags set in DataLoader worker processes are seen by the main process. Nothing is
    logged per item: the trainer reports :meth:`new_unreadable` (each path once) and
    :meth:`unreadable_count`. A flagged file is not decoded again.
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
            if 0 < val_fraction < 1:
                self._check_holdout(root, labels, classes, val_fraction)
            train, val = stratified_split(labels, val_fraction, split_seed)
            samples = [samples[i] for i in (train if split == "train" else val)]
        elif val_root is None and val_fraction > 0:
            raise ConfigError(
                f"dataset.val_fraction={val_fraction} needs class folders to hold out a labelled split, but {root} "
                "is a flat folder of unlabelled images; set dataset.val_fraction=0 (the kNN monitor is then off)"
            )
        elif split == "val":
            samples = []  # unlabelled, or a separate val_root is used for val only
        self.root, self.samples, self.classes = root, samples, classes
        self.num_classes = len(classes)
        self.unreadable = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self._reported = np.zeros(len(samples), dtype=bool)  # main process: flags new_unreadable() returned

    @staticmethod
    def _check_holdout(root: str, labels: np.ndarray, classes: list[str], val_fraction: float) -> None:
        """A stratified held-out split needs 2 images of every class (scikit-learn's message names none)."""
        counts = np.bincount(labels, minlength=len(classes))
        small = [classes[c] for c in np.flatnonzero(counts < 2)]
        if small:
            one = len(small) == 1
            raise ConfigError(
                f"dataset.val_fraction={val_fraction} holds out part of every class, but {len(small)} class "
                f"folder{'' if one else 's'} of {root} hold{'s' if one else ''} a single image "
                f"({_listing(small, 3)}); add images to {'it' if one else 'them'}, remove {'it' if one else 'them'}, "
                "or set dataset.val_fraction=0 (the kNN monitor is then off)"
            )

    @staticmethod
    def scan(root: str) -> tuple[list[tuple[str, int]], list[str]]:
        """(path, label) pairs and class names; label -1 and no classes for a flat folder.

        Classes are ``root``'s sub-folders that hold images (searched recursively), in sorted order.
        Images are files with one of torchvision's ``IMG_EXTENSIONS`` (any case). Names starting
        with '.' are skipped at every level (``.ipynb_checkpoints``, macOS ``._*`` files), as are
        other files. Logged once per call, as warnings on the ``selfsup`` logger: sub-folders with no
        images (not classes), and images lying at the top level next to class folders (not used).
        """
        from torchvision.datasets.folder import IMG_EXTENSIONS

        def is_image(name: str) -> bool:
            return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)

        path = Path(os.path.expanduser(root))
        if not path.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a folder; pass dataset.root=<image folder>")
        folders, top_images = [], []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file() and is_image(entry.name):
                top_images.append(entry.path)

        found: dict[str, list[str]] = {}  # class -> its images, ordered like torchvision's make_dataset
        for name in folders:
            walk = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(path, name), followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                walk.append((dirpath, sorted(f for f in filenames if is_image(f))))
            found[name] = [os.path.join(d, f) for d, files in sorted(walk) for f in files]
        classes = [name for name in folders if found[name]]
        empty = [name for name in folders if not found[name]]

        if classes:
            samples = [(p, label) for label, name in enumerate(classes) for p in found[name]]
        elif top_images:
            samples = [(p, -1) for p in top_images]
        else:
            raise DataError(
                f"dataset root {root} holds no images ({', '.join(IMG_EXTENSIONS)}) in class sub-folders "
                "or at its top level"
            )
        if empty:
            one = len(empty) == 1
            log.warning(
                "ignoring %d sub-folder%s of %s that hold%s no images and %s: %s",
                len(empty),
                "" if one else "s",
                path,
                "s" if one else "",
                "is not a class" if one else "are not classes",
                _listing(empty, 5),
            )
        if classes and top_images:
            pronoun = "it" if len(top_images) == 1 else "them"
            log.warning(
                "ignoring %d image file%s at the top level of %s, next to its class folders (e.g. %s); "
                "move %s into a class folder to use %s",
                len(top_images),
                "" if len(top_images) == 1 else "s",
                path,
                os.path.basename(top_images[0]),
                pronoun,
                pronoun,
            )
        return samples, classes

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """Resize the short side to image_size / 0.875, centre-crop image_size (256 -> 224)."""
        s = self.image_size
        return v2.Compose([v2.Resize(int(round(s / 0.875)), antialias=True), v2.CenterCrop(s)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        tries = min(self.MAX_CONSECUTIVE_BAD, len(self.samples))
        for attempt in range(tries):
            j = (i + attempt) % len(self.samples)
            path, label = self.samples[j]
            if self.on_bad_image == "skip" and self.unreadable[j]:
                continue  # known to be unreadable: not decoded again
            try:
                with Image.open(path) as img:  # a substitute keeps the requested index i
                    return to_rgb_uint8(img), label, i
            except _DECODE_ERRORS as e:
                self.unreadable[j] = 1  # shared memory: seen by the main process
                if self.on_bad_image == "error":
                    raise DataError(
                        f"cannot read image {path}: {e}; remove it or set dataset.on_bad_image=skip"
                    ) from None
        raise DataError(
            f"{tries} consecutive unreadable images from {self.samples[i][0]} on; check the image files in {self.root}"
        )

    def new_unreadable(self) -> list[str]:
        """Paths flagged unreadable since the previous call (main process only: the record of what
        was already returned is not shared)."""
        flagged = self.unreadable.numpy().astype(bool)  # one snapshot: a flag set meanwhile comes next time
        new = np.flatnonzero(flagged & ~self._reported)
        self._reported |= flagged
        return [self.samples[k][0] for k in new]

    def unreadable_count(self) -> int:
        """How many of this split's files have failed to decode so far (in any process)."""
        return int(self.unreadable.sum())


def resident_images(dataset: ImageDataset, workers: int = 0, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """(uint8 [N, 3, S, S] images, int64 [N] labels) of a whole split, for ``dataset.cache=memory|device``
    (of its first ``limit`` images if given). In-memory datasets give their own tensors; any other is decoded
    once, each image resized (short side) and centre-cropped to ``image_size`` (a folder of 32 px CIFAR JPEGs
    stays as it is)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if isinstance(dataset, InMemoryImages):
        return dataset.images[:n], dataset.labels[:n]
    s = dataset.image_size
    fit = v2.Compose([v2.Resize(s, antialias=True), v2.CenterCrop(s)])
    log.info("dataset.cache: decoding %d images once to %d x %d (%.2f GiB of uint8)", n, s, s, n * 3 * s * s / 2**30)
    images = torch.empty(n, 3, s, s, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)

    def item(i: int) -> tuple[Tensor, int, int]:
        image, label, index = dataset[i]
        return fit(image), label, index

    loader = torch.utils.data.DataLoader(
        _Mapped(item, n), batch_size=64, num_workers=workers, collate_fn=lambda rows: rows
    )
    for rows in loader:
        for image, label, index in rows:
            images[index], labels[index] = image, label
    return images, labels


class _Mapped(Dataset):
    """Item i = fn(i) (a picklable stand-in for a lambda dataset in worker processes)."""

    def __init__(self, fn: Callable[[int], tuple[Tensor, int, int]], n: int) -> None:
        self.fn, self.n = fn, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.fn(i)
