"""The supervised loop the classification benchmarks share (linear probe with augmentation, fine-tuning,
semi-supervised fine-tuning): a classifier trained on (a subset of) the labelled training split with
augmentation, and measured on the labelled held-out split.

* data: ``RandomResizedCrop`` + horizontal flip (:func:`~selfsup.data.views.build_view_transform`) of
  each training image, drawn with a seed per (seed, epoch, image) as in pretraining
  (:class:`~selfsup.data.loader.SeededSampler`), so a run is repeatable and independent of the number of
  loader workers; uint8 images are normalised on the device with the dataset's mean/std;
* optimisation: :func:`~selfsup.engine.optim.build_optimizer` (SGD / AdamW / LARS, no weight decay on
  norms and biases unless the recipe decays them, per-name lr factors for a head's lr multiplier or
  layer-wise decay), the learning rate scaled linearly from the recipe's reference batch to the batch
  used, and a per-step :class:`~selfsup.engine.schedules.LRFactor` (warm-up, then cosine or steps);
* evaluation: top-1 / top-5 (top-5 with more than 5 classes, as the kNN benchmark) of every head, in
  percent, on the held-out split through its deterministic eval transform (resize + centre crop).

A classifier is any module that maps normalised images to ``{head name: logits}``; the loss is the sum
of the heads' cross-entropies (several linear heads on different stages train together, as MMSelfSup's
multi-head linear benchmark). Training runs in one process (several processes would need gradient
all-reduce; benchmarks started under ``torchrun`` refuse).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from selfsup import distributed
from selfsup.data.datasets import ImageDataset
from selfsup.data.loader import SeededSampler, SeededViews
from selfsup.data.views import Normalize, ViewConfig, build_view_transform
from selfsup.engine.optim import OptimizerConfig, ParamOverride, build_optimizer, scaled_lr
from selfsup.engine.schedules import LRFactor
from selfsup.errors import ConfigError, TrainingDiverged
from selfsup.eval.features import POOLED, extract_named_features, top_k_accuracy

if TYPE_CHECKING:
    from selfsup.eval.bench import BenchContext

log = logging.getLogger("selfsup")

OPTIMIZERS = ("sgd", "adamw", "lars")
POLICIES = ("cosine", "step")


@dataclass
class TrainRecipe:
    """How a classifier is trained; every value resolved (the benchmarks fill in their defaults)."""

    epochs: int
    batch_size: int  # images per step (at most the number of training images)
    optimizer: str  # sgd | adamw | lars
    lr: float  # for ``base_batch_size`` images per step; scaled linearly to the batch actually used
    base_batch_size: int
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD / LARS momentum (AdamW: betas 0.9, 0.999)
    nesterov: bool = False
    policy: str = "cosine"  # cosine | step
    milestones: list[float] = field(default_factory=list)  # epochs (policy step), may be fractional
    gamma: float = 0.1  # lr factor at each milestone
    warmup_epochs: float = 0.0  # linear warm-up from 1e-3 of the lr
    min_lr_ratio: float = 0.0  # cosine: the lr ends at this fraction
    label_smoothing: float = 0.0
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off); with both, each batch picks one at random
    no_decay_norm_bias: bool = True  # 1-D parameters (norms, biases) and no_weight_decay() names: wd 0
    lr_mults: dict[str, float] = field(default_factory=dict)  # parameter-name substring -> lr factor


def check_options(
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup_epochs: float | None = None,
    milestones: Sequence[float] | None = None,
    optimizer: str | None = None,
    schedule: str | None = None,
    crop_scale: Sequence[float] | None = None,
    hflip: float | None = None,
) -> None:
    """The common option checks of the benchmarks (``None`` = not given); a bad value is a
    :class:`ConfigError` that names the option ``bench.<key>``."""

    def bad(key: str, rule: str, value: Any) -> ConfigError:
        return ConfigError(f"bench.{key} must be {rule}, got {value}")

    if epochs is not None and not epochs >= 1:
        raise bad("epochs", ">= 1", epochs)
    if batch_size is not None and not batch_size >= 1:
        raise bad("batch_size", ">= 1", batch_size)
    if lr is not None and not lr > 0:
        raise bad("lr", "> 0", lr)
    if weight_decay is not None and not weight_decay >= 0:
        raise bad("weight_decay", ">= 0", weight_decay)
    if warmup_epochs is not None and not warmup_epochs >= 0:
        raise bad("warmup_epochs", ">= 0", warmup_epochs)
    if epochs is not None and warmup_epochs is not None and warmup_epochs > epochs:
        raise ConfigError(
            f"bench.warmup_epochs={warmup_epochs} is longer than bench.epochs={epochs}: lower bench.warmup_epochs"
        )
    if milestones is not None and any(not 0 < m <= (epochs or math.inf) for m in milestones):
        raise bad("milestones", f"epochs in (0, bench.epochs={epochs}]", list(milestones))
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise bad("optimizer", " | ".join(OPTIMIZERS), optimizer)
    if schedule is not None and schedule not in POLICIES:
        raise bad("schedule", " | ".join(POLICIES), schedule)
    if crop_scale is not None:
        pair = [float(v) for v in crop_scale]
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= 1:
            raise bad("crop_scale", "two numbers [min, max] with 0 < min <= max <= 1", pair)
    if hflip is not None and not 0 <= hflip <= 1:
        raise bad("hflip", "a probability in [0, 1]", hflip)


def require_single_process(bench: str) -> None:
    if distributed.get_world_size() > 1:
        raise ConfigError(
            f"bench={bench} trains in one process; start python -m selfsup.benchmark without torchrun (the "
            "feature-based benchmarks knn, svm and linear mode=fast run under several processes)"
        )


# --------------------------------------------------------------------------------------------
# classifiers


class LinearHead(nn.Module):
    """[B, D] -> logits [B, C]: optionally BatchNorm without affine (MAE's ``ClsBatchNormNeck``, the
    SimCLR/BYOL linear-eval BN), then a linear layer initialised N(0, 0.01), bias 0 (MMSelfSup's heads)."""

    def __init__(self, dim: int, num_classes: int, bn: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.bn(x.float()))


class FrozenProbe(nn.Module):
    """Linear heads on features of a frozen backbone (MMSelfSup's linear benchmark, ``frozen_stages``
    = all). The backbone is not a sub-module: it is neither in ``parameters()`` nor in ``state_dict()``,
    stays in eval mode (BatchNorm uses its pretrained statistics and does not update them), and runs
    without gradients."""

    def __init__(
        self, features: Callable[[Tensor], dict[str, Tensor]], dims: dict[str, int], num_classes: int, bn: bool
    ):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleDict({name: LinearHead(dim, num_classes, bn) for name, dim in dims.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            feats = self.features(x)
        return {name: head(feats[name].detach()) for name, head in self.heads.items()}


class FineTuneClassifier(nn.Module):
    """A backbone trained end to end with a new linear head on its pooled feature (``backbone(x)``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, name: str = POOLED) -> None:
        super().__init__()
        dim = getattr(backbone, "num_features", None)
        if not isinstance(dim, int):
            raise ConfigError(f"{type(backbone).__name__} does not say its feature size (num_features)")
        self.backbone, self.name = backbone, name
        self.head = LinearHead(dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        inner: set[str] = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in inner}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.name: self.head(self.backbone(x))}


def layer_decay_mults(backbone: nn.Module, decay: float, prefix: str = "backbone.") -> dict[str, float]:
    """Layer-wise lr decay of a ViT (BEiT; MAE's ``lr_decay.py``; MMSelfSup's
    ``LearningRateDecayOptimWrapperConstructor``): with depth L, ``blocks.k`` (k = 0 .. L-1) gets
    ``decay ** (L - k)``, the patch embedding / CLS token / position embedding ``decay ** (L + 1)``, and
    the final norm and the head 1. ``{name substring: lr factor}``; empty for a backbone without
    transformer ``blocks`` (a ResNet)."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or decay == 1.0:
        return {}
    depth = len(blocks)
    mults = {f"{prefix}{k}": decay ** (depth + 1) for k in ("patch_embed.", "cls_token", "pos_embed")}
    mults.update({f"{prefix}blocks.{k}.": decay ** (depth - k) for k in range(depth)})
    return mults


# --------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(
    model: nn.Module, recipe: TrainRecipe, batch: int, steps_per_epoch: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, float]:
    """(optimizer, per-step lr scheduler, lr) for ``model``'s trainable parameters; lr = the recipe's lr
    scaled from ``base_batch_size`` to ``batch`` images per step."""
    lr = scaled_lr(recipe.lr, batch, recipe.base_batch_size)
    cfg = OptimizerConfig(
        name=recipe.optimizer,  # type: ignore[arg-type]
        lr=lr,
        base_batch_size=recipe.base_batch_size,
        weight_decay=recipe.weight_decay,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        no_decay_norm_bias=recipe.no_decay_norm_bias,
        paramwise={k: ParamOverride(lr_mult=float(v)) for k, v in recipe.lr_mults.items()},
    )
    fused = device.type == "cuda" and recipe.optimizer != "lars"
    optimizer = build_optimizer(model, cfg, lr, fused=fused)
    total = recipe.epochs * steps_per_epoch
    factor = LRFactor(
        recipe.policy,
        total,
        warmup_steps=min(total, int(round(recipe.warmup_epochs * steps_per_epoch))),
        min_ratio=recipe.min_lr_ratio,
        milestones=[int(round(m * steps_per_epoch)) for m in recipe.milestones],
        gamma=recipe.gamma,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), lr


def batch_mixer(recipe: TrainRecipe, num_classes: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """torchvision's MixUp / CutMix (one of them per batch when both are on), or None."""
    mixers: list[Callable] = []
    if recipe.mixup > 0:
        mixers.append(v2.MixUp(alpha=recipe.mixup, num_classes=num_classes))
    if recipe.cutmix > 0:
        mixers.append(v2.CutMix(alpha=recipe.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


# --------------------------------------------------------------------------------------------
# data


def train_transform(image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5) -> Callable:
    """MMSelfSup's classification training pipeline: RandomResizedCrop to ``image_size`` + flip."""
    return build_view_transform(ViewConfig(size=image_size, crop_scale=list(crop_scale), hflip=hflip))


def training_loader(
    dataset: ImageDataset,
    indices: Sequence[int],
    transform: Callable,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Epoch ``epoch`` of the items ``indices`` of ``dataset`` (a training split), shuffled and augmented
    with a seed per (seed, epoch, item). Batches of ``batch_size``; a last batch of a single image is
    dropped (BatchNorm cannot train on it)."""
    views = SeededViews(Subset(dataset, list(indices)), [transform])
    sampler = SeededSampler(views, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return DataLoader(
        views,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=len(indices) % batch_size == 1,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + epoch),
    )


# --------------------------------------------------------------------------------------------
# training and evaluation


@dataclass
class FitResult:
    steps: int
    lr: float  # the scaled peak learning rate
    batch_size: int
    loss: float  # mean loss of the last epoch


def fit(
    model: nn.Module,
    dataset: ImageDataset,
    indices: Sequence[int],
    recipe: TrainRecipe,
    *,
    transform: Callable,
    normalize: Normalize,
    autocast: Callable[[], AbstractContextManager] | None = None,
    fp16: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    num_classes: int,
    tag: str = "classifier",
) -> FitResult:
    """Train ``model`` (images -> {head: logits}) on the items ``indices`` of ``dataset`` with
    ``recipe``; its trainable parameters are those with ``requires_grad``. A non-finite loss is a
    :class:`TrainingDiverged` error."""
    if len(indices) < 2:
        raise ConfigError(f"{tag}: {len(indices)} training image(s); at least 2 are needed")
    device = normalize.device
    batch = min(recipe.batch_size, len(indices))
    steps_per_epoch = len(indices) // batch if len(indices) % batch == 1 else math.ceil(len(indices) / batch)
    optimizer, scheduler, lr = make_optimizer(model, recipe, batch, steps_per_epoch, device)
    mixer = batch_mixer(recipe, num_classes)
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    log.info(
        "%s: %d images, %d epochs of %d steps, batch %d, %s lr %.4g (%.4g at batch %d), wd %g",
        tag,
        len(indices),
        recipe.epochs,
        steps_per_epoch,
        batch,
        recipe.optimizer,
        lr,
        recipe.lr,
        recipe.base_batch_size,
        recipe.weight_decay,
    )
    steps, mean_loss = 0, math.nan
    for epoch in range(recipe.epochs):
        model.train()
        total = torch.zeros((), device=device)
        count = 0
        loader = training_loader(
            dataset, indices, transform, batch, seed, epoch, num_workers, pin_memory=device.type == "cuda"
        )
        for item in loader:
            x = normalize(item["views"][0])
            y = item["label"].to(device, non_blocking=True)
            if mixer is not None:
                x, y = mixer(x, y)
            with autocast() if autocast is not None else nullcontext():
                logits = model(x)
            loss = sum(
                F.cross_entropy(out.float(), y, label_smoothing=recipe.label_smoothing) for out in logits.values()
            )
            assert isinstance(loss, Tensor)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            total += loss.detach()
            count += 1
            steps += 1
        mean_loss = float(total) / max(1, count)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"{tag}: the loss became {mean_loss} in epoch {epoch + 1} (lr {lr:.4g}); lower bench.lr"
            )
        log.info("%s: epoch %d/%d loss %.4f", tag, epoch + 1, recipe.epochs, mean_loss)
    model.eval()
    return FitResult(steps, lr, batch, mean_loss)


def accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) accuracy in percent."""
    return {k: 100.0 * v for k, v in top_k_accuracy(logits, labels, num_classes).items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: ImageDataset,
    normalize: Normalize,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """({head: logits [N, C]}, labels [N]) of ``model`` in eval mode on ``dataset`` (deterministic eval
    transform, in order)."""
    if len(dataset) == 0:
        raise ConfigError("cannot evaluate on an empty held-out split")
    model.eval()
    return extract_named_features(model, dataset, normalize, batch_size, num_workers, autocast)


def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    normalize: Normalize,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, dict[str, float]]:
    """{head: {"top1": %, "top5": %}} of ``model`` on ``dataset`` (the held-out split)."""
    logits, labels = predict(model, dataset, normalize, batch_size, num_workers, autocast)
    return {name: accuracy(value, labels, dataset.num_classes) for name, value in logits.items()}


def fit_on_train(
    ctx: BenchContext, model: nn.Module, indices: Sequence[int], recipe: TrainRecipe, transform: Callable, tag: str
) -> FitResult:
    """:func:`fit` on the items ``indices`` of the benchmark's training split, with the encoder's device,
    normalisation and precision and the run's seed and workers."""
    enc = ctx.encoder
    return fit(
        model,
        ctx.train,
        indices,
        recipe,
        transform=transform,
        normalize=enc.normalize(ctx.train),
        autocast=enc.autocast,
        fp16=enc.precision == "fp16",
        seed=ctx.cfg.seed,
        num_workers=ctx.cfg.num_workers,
        num_classes=ctx.num_classes,
        tag=tag,
    )


def evaluate_on_val(ctx: BenchContext, model: nn.Module) -> dict[str, dict[str, float]]:
    """:func:`evaluate` on the benchmark's held-out split."""
    enc = ctx.encoder
    return evaluate(model, ctx.val, enc.normalize(ctx.val), ctx.cfg.batch_size, ctx.cfg.num_workers, enc.autocast)
