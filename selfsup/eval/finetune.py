"""``bench=finetune``: the whole backbone plus a new linear head trained end to end on the labelled
training split with augmentation, measured (top-1 / top-5, percent) on the held-out split.

Defaults follow MMSelfSup's ``vit-base-p16_ft-8xb128-coslr-100e`` (MAE/BEiT fine-tuning): AdamW
(betas 0.9, 0.999), lr 2e-3 at a batch of 1024 (scaled linearly to ``batch_size``), weight decay 0.05
(none on norms, biases and the CLS token), 5 warm-up epochs + cosine to 0 over 100 epochs, layer-wise
lr decay 0.65, drop path 0.1, label smoothing 0.1, RandomResizedCrop + flip. MixUp (0.8) / CutMix
(1.0) of the reference are OFF by default (``mixup``/``cutmix`` > 0 turns on torchvision's v2 MixUp /
CutMix); RandAugment and random erasing of the reference are not applied. Shorten with ``epochs=``
(``warmup_epochs`` defaults to 5% of the run).

* layer-wise lr decay (ViT only; :func:`~selfsup.eval.supervised.layer_decay_mults`): ``blocks.k``
  (k = 0 .. L-1) trains at lr x ``layer_decay ** (L - k)``, the patch embedding / CLS token at
  ``layer_decay ** (L + 1)``, the final norm and the head at lr; 1.0 = off; a ResNet ignores it (logged);
* drop path (ViT only): the backbone is rebuilt from the checkpoint's backbone config with
  ``drop_path_rate`` and ALL its weights loaded (the load is reported; a missing or unexpected key is an
  error); a ResNet has none (logged);
* BatchNorm trains (batch statistics, running statistics updated), as in MMSelfSup's fine-tuning;
* ``head_lr_mult``: the head's lr factor (semi-supervised recipes use 1 .. 100);
* the head reads the backbone's own pooled output, as the checkpoint configured it (a ViT's normalised
  CLS token with ``global_pool=token``); MAE's fine-tuning averages the patch tokens instead
  (``global_pool=avg``), which is not switched here.

The encoder itself is not modified: the benchmark fine-tunes a copy (kept as ``self.model`` after
``run``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from selfsup.errors import CheckpointError, ConfigError
from selfsup.eval.bench import BenchContext, Benchmark
from selfsup.eval.supervised import (
    FineTuneClassifier,
    TrainRecipe,
    check_options,
    evaluate_on_val,
    fit_on_train,
    layer_decay_mults,
    require_single_process,
    train_transform,
)

if TYPE_CHECKING:  # selfsup.config imports the benchmark classes (their schemas); these import selfsup.config
    from selfsup.eval.encoder import Encoder

log = logging.getLogger("selfsup")


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(getattr(backbone, "blocks", None), nn.Sequential) and hasattr(backbone, "patch_embed")


def trainable_copy(encoder: Encoder, backbone_node: Any = None, drop_path_rate: float = 0.0) -> nn.Module:
    """A trainable copy of the encoder's backbone (every parameter ``requires_grad``). With
    ``drop_path_rate`` > 0 a ViT is rebuilt from its config (the checkpoint's, or ``backbone_node`` for an
    exported backbone) with that rate and every weight loaded; other backbones are copied as they are."""
    from selfsup.config import to_plain
    from selfsup.engine.build import build_backbone
    from selfsup.engine.pretrained import load_state

    source = encoder.backbone
    if drop_path_rate > 0 and not is_vit(source):
        log.info("finetune: drop_path_rate=%g ignored: %s has no drop path", drop_path_rate, type(source).__name__)
    if drop_path_rate > 0 and is_vit(source):
        node = encoder.config.backbone if encoder.config is not None else backbone_node
        if node is None:
            raise ConfigError(
                "finetune: drop path needs the backbone's config; pass backbone=<name> or bench.drop_path_rate=0"
            )
        plain = to_plain(node)
        plain["drop_path_rate"] = float(drop_path_rate)
        net = build_backbone(plain)
        where = f"{encoder.source} (backbone rebuilt with drop_path_rate={drop_path_rate:g})"
        report = load_state(net, source.state_dict(), where, required="")
        if report.missing or report.unexpected:
            raise CheckpointError(f"{where}: the weights do not fit the rebuilt backbone ({report})")
    else:
        net = copy.deepcopy(source)
    net.requires_grad_(True)
    return net.to(encoder.device)


class FineTuneBenchmark(Benchmark):
    """``bench=finetune`` (see the module docstring).

    Args:
        epochs: training epochs (reference 100).
        warmup_epochs: linear warm-up; ``None`` = 5% of ``epochs`` (the reference's 5 of 100).
        batch_size: images per step (reference 8 x 128 = 1024).
        optimizer: sgd | adamw | lars.
        lr: at ``base_batch_size`` images per step, scaled linearly to the batch used.
        head_lr_mult: the new head's lr factor.
        weight_decay: not applied to norms, biases and the CLS token.
        momentum: SGD / LARS momentum.
        schedule: ``cosine`` (to ``min_lr_ratio`` x lr) or ``step`` (x ``gamma`` at each of ``milestones``, epochs).
        layer_decay: ViT layer-wise lr decay (1.0 = off).
        drop_path_rate: ViT stochastic depth (rebuilds the backbone; 0 = as trained).
        label_smoothing: of the cross-entropy.
        mixup, cutmix: alphas of torchvision's MixUp / CutMix (0 = off).
        crop_scale, hflip: RandomResizedCrop scale range and flip probability.
    """

    name = "finetune"
    headline = "top1"

    def __init__(
        self,
        epochs: int = 100,
        warmup_epochs: float | None = None,
        batch_size: int = 128,
        optimizer: Literal["sgd", "adamw", "lars"] = "adamw",
        lr: float = 2e-3,
        base_batch_size: int = 1024,
        head_lr_mult: float = 1.0,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        schedule: Literal["cosine", "step"] = "cosine",
        milestones: list[float] = [],  # noqa: B006 - Hydra passes lists
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        layer_decay: float = 0.65,
        drop_path_rate: float = 0.1,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        crop_scale: list[float] = [0.08, 1.0],  # noqa: B006
        hflip: float = 0.5,
    ) -> None:
        warmup = 0.05 * epochs if warmup_epochs is None else warmup_epochs
        check_options(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup,
            milestones=milestones,
            optimizer=optimizer,
            schedule=schedule,
            crop_scale=crop_scale,
            hflip=hflip,
        )
        checks = {
            "base_batch_size": (base_batch_size >= 1, ">= 1"),
            "head_lr_mult": (head_lr_mult > 0, "> 0"),
            "momentum": (0 <= momentum <= 1, "in [0, 1]"),
            "gamma": (gamma > 0, "> 0"),
            "min_lr_ratio": (0 <= min_lr_ratio <= 1, "in [0, 1]"),
            "layer_decay": (0 < layer_decay <= 1, "in (0, 1] (1 = off)"),
            "drop_path_rate": (0 <= drop_path_rate < 1, "in [0, 1)"),
            "label_smoothing": (0 <= label_smoothing < 1, "in [0, 1)"),
            "mixup": (mixup >= 0, ">= 0 (0 = off)"),
            "cutmix": (cutmix >= 0, ">= 0 (0 = off)"),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"bench.{key} must be {rule}, got {locals()[key]}")
        self.layer_decay, self.drop_path_rate, self.head_lr_mult = layer_decay, drop_path_rate, head_lr_mult
        self.crop_scale, self.hflip = [float(v) for v in crop_scale], float(hflip)
        self.recipe = TrainRecipe(
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            base_batch_size=base_batch_size,
            weight_decay=weight_decay,
            momentum=momentum,
            policy=schedule,
            milestones=[float(m) for m in milestones],
            gamma=gamma,
            warmup_epochs=warmup,
            min_lr_ratio=min_lr_ratio,
            label_smoothing=label_smoothing,
            mixup=mixup,
            cutmix=cutmix,
        )

    def build_model(self, ctx: BenchContext) -> tuple[FineTuneClassifier, dict[str, float]]:
        """(the classifier to fine-tune, its lr factors by parameter-name substring)."""
        backbone = trainable_copy(ctx.encoder, ctx.cfg.backbone, self.drop_path_rate)
        torch.manual_seed(ctx.cfg.seed)
        model = FineTuneClassifier(backbone, ctx.num_classes).to(ctx.encoder.device)
        mults = layer_decay_mults(backbone, self.layer_decay)
        if self.layer_decay != 1.0 and not mults:
            log.info(
                "finetune: layer_decay=%g ignored: %s has no transformer blocks",
                self.layer_decay,
                type(backbone).__name__,
            )
        if self.head_lr_mult != 1.0:
            mults["head."] = self.head_lr_mult
        return model, mults

    def run(self, ctx: BenchContext) -> dict[str, Any]:
        require_single_process(self.name)
        model, mults = self.build_model(ctx)
        self.model = model
        recipe = replace(self.recipe, lr_mults=mults)
        fit_on_train(
            ctx,
            model,
            range(len(ctx.train)),
            recipe,
            train_transform(ctx.train.image_size, self.crop_scale, self.hflip),
            "finetune",
        )
        result = evaluate_on_val(ctx, model)
        return dict(result[model.name])
