"""``bench=linear``: linear classification on the frozen encoder's features (MMSelfSup's linear
benchmark, ``configs/benchmarks/classification/imagenet/*linear*``), in two modes.

``mode=fast`` (default): the features of every image are extracted ONCE (deterministic resize + centre
crop, the backbone in eval mode), then a linear classifier is trained on the cached features: the
features standardised with the training split's mean and std (= BatchNorm without affine, with exact
statistics), a linear layer, SGD (momentum 0.9, Nesterov) with a cosine schedule over minibatches of the
cached features. With no augmentation it usually lands a little below the augmented protocol's
number, at a cost orders of magnitude lower than MMSelfSup's 100 epochs of full forward passes
(one forward pass per image, then seconds of training). It is the quick, comparable number.

``mode=protocol``: MMSelfSup's recipes WITH augmentation (RandomResizedCrop + flip, new crops every epoch;
the backbone frozen in eval mode and run forward every step), ``recipe=``:

* ``moco``   (``resnet50_linear-8xb32-steplr-100e``): SGD lr 30 at batch 256, wd 0, 100 epochs, lr x0.1
  after epochs 60 and 80, plain linear head;
* ``simclr`` (``resnet50_linear-8xb512-coslr-90e``): LARS lr 1.6 at batch 4096, wd 0, cosine over 90
  epochs, BatchNorm (no affine) before the linear layer;
* ``swav``   (``resnet50_linear-8xb32-coslr-100e``): SGD lr 0.3 at batch 256, wd 1e-6, cosine over 100
  epochs, plain linear head;
* ``mae``    (``vit-base-p16_linear-8xb2048-coslr-90e``): LARS lr 0.1 at batch 256 (6.4 at its 16384),
  wd 0, 10 warm-up epochs then cosine, 90 epochs in all, BatchNorm (no affine) on the CLS token.

(``simclr`` is also BYOL's and SimSiam's setting, ``swav`` BarlowTwins'; momentum 0.9 everywhere.) The
default ``recipe=auto`` takes the recipe of the checkpoint's algorithm (:func:`recipe_for`; e.g. a SimCLR
checkpoint gets ``simclr``: moco's lr 30 suits MoCo's features, not SimCLR's). Each recipe trains at its
reference batch size (moco/swav 256, simclr 4096, mae 16384) unless ``batch_size`` is set (at most the
number of training images); the learning rate is always scaled linearly from the recipe's reference
batch to the batch used (the linear scaling rule). Every knob can be set (``None`` = the recipe's
value), so the recipes can be run small: a shortened run keeps the recipe's shape (milestones and
warm-up are the same fractions of the run, e.g. moco's steps at 60% and 80%). The recipes are made for
their full length on ImageNet: LARS (simclr, mae) moves each weight by about lr x 0.001 (its trust
coefficient) of its norm per step, so a run of a few hundred steps barely trains the head (digits, 60
steps of the simclr recipe: 13.6% top-1; with ``optimizer=sgd`` 65.6%; ``mode=fast`` 90.8%), and
RandomResizedCrop down to 8% of a 32 px image leaves little of a digit.

``stages``: one linear head per listed stage (``pooled`` = the encoder's feature; ``layer1`` ..
``layer4``, ``stem`` of a ResNet, ``block1`` .. ``blockN`` of a ViT, ``last``), trained together on the
same batches (MMSelfSup's multi-head ``resnet50_mhead_linear``: each stage globally average-pooled; a
ViT stage's CLS token, or the patch-token mean with ``token=mean``). Metrics: ``top1_<stage>`` and
``top5_<stage>`` (top-5 with more than 5 classes), in percent on the held-out split; the headline is the
top-1 of the LAST listed stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError, TrainingDiverged
from selfsup.eval.bench import BenchContext, Benchmark
from selfsup.eval.features import stage_fn
from selfsup.eval.supervised import (
    POOLED,
    FrozenProbe,
    TrainRecipe,
    accuracy,
    check_options,
    evaluate_on_val,
    fit_on_train,
    make_optimizer,
    require_single_process,
    train_transform,
)

log = logging.getLogger("selfsup")


@dataclass(frozen=True)
class LinearRecipe:
    """A linear-probe recipe; ``milestones`` and ``warmup`` are fractions of the run."""

    optimizer: str
    lr: float  # at base_batch_size
    base_batch_size: int
    batch_size: int
    epochs: int
    weight_decay: float
    schedule: str
    milestones: tuple[float, ...] = ()
    warmup: float = 0.0
    head_bn: bool = False
    nesterov: bool = False


RECIPES: dict[str, LinearRecipe] = {
    # resnet50_linear-8xb32-steplr-100e (MoCo v1/v2, and most 0.x entries)
    "moco": LinearRecipe("sgd", 30.0, 256, 256, 100, 0.0, "step", milestones=(0.6, 0.8)),
    # resnet50_linear-8xb512-coslr-90e (SimCLR, BYOL, SimSiam)
    "simclr": LinearRecipe("lars", 1.6, 4096, 4096, 90, 0.0, "cosine", head_bn=True),
    # resnet50_linear-8xb32-coslr-100e (SwAV, BarlowTwins)
    "swav": LinearRecipe("sgd", 0.3, 256, 256, 100, 1e-6, "cosine"),
    # vit-base-p16_linear-8xb2048-coslr-90e (MAE): ClsBatchNormNeck, 10 of 90 epochs warm-up
    "mae": LinearRecipe("lars", 0.1, 256, 16384, 90, 0.0, "cosine", warmup=10 / 90, head_bn=True),
}
# mode=fast: a converged probe on cached (standardised) features in seconds (digits: ~1 s on a CPU)
FAST = LinearRecipe("sgd", 0.1, 256, 256, 100, 0.0, "cosine", head_bn=True, nesterov=True)


class Standardize(nn.Module):
    """(x - mean) / std with fixed statistics (BatchNorm without affine, exact training statistics)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def feature_probe(x: Tensor, num_classes: int, standardize: bool = True) -> nn.Sequential:
    """An untrained probe for features like ``x`` [N, D]: standardisation by ``x``'s statistics, then a
    linear layer initialised N(0, 0.01), bias 0."""
    x = x.float()
    mean = x.mean(0) if standardize else torch.zeros(x.shape[1], device=x.device)
    std = x.std(0).clamp_min(1e-6) if standardize and len(x) > 1 else torch.ones(x.shape[1], device=x.device)
    fc = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(Standardize(mean, std), fc)


def fit_feature_probe(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    recipe: TrainRecipe,
    seed: int = 0,
    standardize: bool = True,
) -> nn.Sequential:
    """A linear probe trained on fixed features ``x`` [N, D] with labels ``y`` [N] (``mode=fast``): shuffled
    minibatches (one permutation per epoch from ``seed``), ``recipe``'s optimizer and schedule."""
    if len(x) != len(y) or len(x) < 2:
        raise ConfigError(f"a linear probe needs at least 2 labelled feature rows, got {len(x)} rows, {len(y)} labels")
    torch.manual_seed(seed)
    probe = feature_probe(x, num_classes, standardize)
    batch = min(recipe.batch_size, len(x))
    steps_per_epoch = math.ceil(len(x) / batch)
    optimizer, scheduler, _ = make_optimizer(probe, recipe, batch, steps_per_epoch, x.device)
    gen = torch.Generator().manual_seed(seed)
    y = y.to(x.device)
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        total = torch.zeros((), device=x.device)
        for idx in order.split(batch):
            loss = F.cross_entropy(probe(x[idx].float()), y[idx], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach()
        if not math.isfinite(float(total)):
            raise TrainingDiverged(f"linear probe: the loss became {float(total)} in epoch {epoch + 1}; lower bench.lr")
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 (percent) of a feature probe."""
    return accuracy(probe.eval()(x.float()), y, num_classes)


def recipe_for(encoder: Any) -> str:
    """The linear recipe of the algorithm the encoder was trained with (``recipe=auto``): SimCLR, BYOL,
    SimSiam -> simclr; SwAV, BarlowTwins -> swav; MAE and other ViT encoders -> mae; others (MoCo, ODC,
    NPID, DeepCluster, ...) -> moco, MMSelfSup's default linear setting."""
    config = getattr(encoder, "config", None)
    target = str(getattr(getattr(getattr(config, "algo", None), "model", None), "_target_", "") or "")
    algo = target.rsplit(".", 1)[-1].lower()
    if algo in ("simclr", "byol", "simsiam"):
        return "simclr"
    if algo in ("swav", "barlowtwins"):
        return "swav"
    if algo == "mae" or isinstance(getattr(encoder.backbone, "blocks", None), nn.Sequential):
        return "mae"
    return "moco"


class LinearBenchmark(Benchmark):
    """``bench=linear``: a linear classifier on the frozen encoder (see the module docstring).

    Args:
        mode: ``fast`` (cached centre-crop features) or ``protocol`` (MMSelfSup's augmented recipe).
        recipe: the protocol preset: moco | simclr | swav | mae, or ``auto``: the one of the checkpoint's
            algorithm (:func:`recipe_for`). Fast mode has its own preset: SGD 0.1 at batch 256, Nesterov,
            cosine, 100 epochs, standardised features.
        stages: the features, one linear head per entry (``pooled``, ``layer4``, ``block2``, ``last`` ...).
        token: ViT stages: ``cls`` token or ``mean`` of the patch tokens.
        epochs, batch_size, base_batch_size, optimizer, weight_decay, schedule, milestones, warmup_epochs,
            head_bn: ``None`` = the recipe's (or fast preset's) value; milestones and warm-up in epochs.
        lr: at the recipe's reference batch (``base_batch_size``), scaled linearly to the batch used.
        crop_scale, hflip: protocol mode's RandomResizedCrop scale range and flip probability.
    """

    name = "linear"
    headline = "top1_pooled"

    def __init__(
        self,
        mode: Literal["fast", "protocol"] = "fast",
        recipe: Literal["auto", "moco", "simclr", "swav", "mae"] = "auto",
        stages: list[str] = [POOLED],  # noqa: B006 - Hydra passes lists
        token: Literal["cls", "mean"] = "cls",
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        base_batch_size: int | None = None,
        optimizer: Literal["sgd", "adamw", "lars"] | None = None,
        weight_decay: float | None = None,
        schedule: Literal["cosine", "step"] | None = None,
        milestones: list[float] | None = None,
        warmup_epochs: float | None = None,
        head_bn: bool | None = None,
        crop_scale: list[float] = [0.08, 1.0],  # noqa: B006
        hflip: float = 0.5,
    ) -> None:
        if mode not in ("fast", "protocol"):
            raise ConfigError(f"bench.mode={mode!r} must be fast or protocol")
        if recipe != "auto" and recipe not in RECIPES:
            raise ConfigError(f"bench.recipe={recipe!r} is not a linear recipe: choose auto, {', '.join(RECIPES)}")
        stages = [str(s) for s in stages]
        if not stages or len(set(stages)) != len(stages):
            raise ConfigError(f"bench.stages must list at least one stage, each once, got {stages}")
        if token not in ("cls", "mean"):
            raise ConfigError(f"bench.token={token!r} must be cls or mean")
        if base_batch_size is not None and not base_batch_size >= 1:
            raise ConfigError(f"bench.base_batch_size must be >= 1, got {base_batch_size}")
        check_options(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            milestones=milestones,
            optimizer=optimizer,
            schedule=schedule,
            crop_scale=crop_scale,
            hflip=hflip,
        )
        self.mode, self.recipe, self.stages, self.token = mode, recipe, stages, token
        self.crop_scale, self.hflip = [float(v) for v in crop_scale], float(hflip)
        self.overrides: dict[str, Any] = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "base_batch_size": base_batch_size,
            "optimizer": optimizer,
            "weight_decay": weight_decay,
            "schedule": schedule,
            "milestones": None if milestones is None else [float(m) for m in milestones],
            "warmup_epochs": warmup_epochs,
            "head_bn": head_bn,
        }
        self.headline = f"top1_{stages[-1]}"  # type: ignore[misc]

    def resolve(self, recipe: str) -> tuple[TrainRecipe, bool]:
        """(the training recipe, BN before the linear layer) of ``recipe`` (or of the fast preset) with the
        options set by the user; ``milestones``/``warm-up`` not set keep the preset's fractions of the run."""
        preset = FAST if self.mode == "fast" else RECIPES[recipe]
        o = {k: v for k, v in self.overrides.items() if v is not None}
        epochs = o.get("epochs", preset.epochs)
        milestones = o.get("milestones", [m * epochs for m in preset.milestones])
        warmup = o.get("warmup_epochs", preset.warmup * epochs)
        check_options(epochs=epochs, warmup_epochs=warmup, milestones=milestones)
        train = TrainRecipe(
            epochs=epochs,
            batch_size=o.get("batch_size", preset.batch_size),
            optimizer=o.get("optimizer", preset.optimizer),
            lr=o.get("lr", preset.lr),
            base_batch_size=o.get("base_batch_size", preset.base_batch_size),
            weight_decay=o.get("weight_decay", preset.weight_decay),
            nesterov=preset.nesterov,
            policy=o.get("schedule", preset.schedule),
            milestones=milestones,
            warmup_epochs=warmup,
        )
        return train, bool(o.get("head_bn", preset.head_bn))

    def run(self, ctx: BenchContext) -> dict[str, Any]:
        results = self._fast(ctx) if self.mode == "fast" else self._protocol(ctx)
        metrics: dict[str, Any] = {}
        for stage in self.stages:
            metrics.update({f"{k}_{stage}": v for k, v in results[stage].items()})
        return metrics

    def _fast(self, ctx: BenchContext) -> dict[str, dict[str, float]]:
        recipe, standardize = self.resolve("fast")
        train, train_labels = ctx.features(ctx.train, self.stages, self.token)
        val, val_labels = ctx.features(ctx.val, self.stages, self.token)
        results = {}
        for stage in self.stages:
            probe = fit_feature_probe(train[stage], train_labels, ctx.num_classes, recipe, ctx.cfg.seed, standardize)
            results[stage] = probe_accuracy(probe, val[stage], val_labels, ctx.num_classes)
            log.info("linear (fast) %s: %s", stage, results[stage])
        return results

    def _protocol(self, ctx: BenchContext) -> dict[str, dict[str, float]]:
        require_single_process(self.name)
        enc = ctx.encoder
        name = recipe_for(enc) if self.recipe == "auto" else self.recipe
        if self.recipe == "auto":
            log.info("linear: recipe=auto -> %s (the checkpoint's algorithm)", name)
        recipe, head_bn = self.resolve(name)
        features = stage_fn(enc.extract, enc.backbone, self.stages, self.token)
        size = ctx.train.image_size
        with torch.no_grad(), enc.autocast():
            dims = {k: int(v.shape[1]) for k, v in features(torch.zeros(2, 3, size, size, device=enc.device)).items()}
        torch.manual_seed(ctx.cfg.seed)
        model = FrozenProbe(features, {s: dims[s] for s in self.stages}, ctx.num_classes, head_bn).to(enc.device)
        self.model = model
        fit_on_train(
            ctx,
            model,
            range(len(ctx.train)),
            recipe,
            train_transform(size, self.crop_scale, self.hflip),
            f"linear ({name} recipe)",
        )
        return evaluate_on_val(ctx, model)
