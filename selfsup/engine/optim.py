"""Optimizer construction: parameter groups (no decay on norms/biases, per-name overrides) and
SGD / AdamW (fused on CUDA) / LARS, configured by :class:`OptimizerConfig` (``algo.optimizer``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from selfsup.engine.lars import LARS
from selfsup.errors import ConfigError


class OptimizerName(str, Enum):
    sgd = "sgd"
    adamw = "adamw"
    lars = "lars"


@dataclass
class ParamOverride:
    """Per-parameter options for every parameter whose name contains the key (``paramwise``)."""

    lr_mult: float = 1.0
    decay_mult: float = 1.0
    momentum: float | None = None
    lars_exclude: bool | None = None
    fixed_lr: bool = False  # keep the base lr: no schedule (SimSiam's predictor)

    def __post_init__(self) -> None:
        where = "algo.optimizer.paramwise.<name>"
        for key, of in (("lr_mult", "learning rate"), ("decay_mult", "weight decay")):
            value = getattr(self, key)
            if not value >= 0:
                raise ConfigError(f"{where}.{key} must be >= 0 (a factor of the {of}), got {value}")
        if self.momentum is not None and not 0 <= self.momentum <= 1:
            raise ConfigError(f"{where}.momentum must be in [0, 1] or null, got {self.momentum}")


@dataclass
class OptimizerConfig:
    """``algo.optimizer``: the optimizer of an algorithm's recipe. ``lr`` is for a global batch of
    ``base_batch_size`` images (linear scaling rule, ``schedule.scale_lr``)."""

    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.1
    base_batch_size: int = 256
    weight_decay: float = 0.0
    # cosine schedule of the weight decay from weight_decay to this value (DINO); null = constant
    weight_decay_end: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lars_eta: float = 0.001
    # 1-D parameters (biases, norm weights) and the algorithm's no_weight_decay() names get wd 0
    no_decay_norm_bias: bool = True
    # also exclude them from LARS' trust ratio (SimCLR/BYOL recipes)
    lars_exclude_norm_bias: bool = True
    paramwise: dict[str, ParamOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, rule: str, value: Any) -> ConfigError:
            return ConfigError(f"algo.optimizer.{key} must be {rule}, got {value}")

        if not self.lr > 0:
            raise bad("lr", "> 0", self.lr)
        if not self.base_batch_size >= 1:
            raise bad("base_batch_size", ">= 1", self.base_batch_size)
        if not self.weight_decay >= 0:
            raise bad("weight_decay", ">= 0", self.weight_decay)
        if self.weight_decay_end is not None and not self.weight_decay_end >= 0:
            raise bad("weight_decay_end", ">= 0 or null (a constant weight decay)", self.weight_decay_end)
        if not 0 <= self.momentum <= 1:
            raise bad("momentum", "in [0, 1]", self.momentum)
        betas = list(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise bad("betas", "two numbers in [0, 1), e.g. [0.9, 0.999]", betas)
        if not self.eps > 0:
            raise bad("eps", "> 0", self.eps)
        if not self.lars_eta > 0:
            raise bad("lars_eta", "> 0", self.lars_eta)


def scaled_lr(base_lr: float, global_batch: int, base_batch_size: int, enabled: bool = True) -> float:
    """Linear scaling rule (Goyal et al. 2017; MMSelfSup's ``new_lr = old_lr * new_ngpus / old_ngpus``):
    ``lr = base_lr * global_batch / base_batch_size``, where global batch = per-device batch x world
    size x gradient-accumulation steps. ``enabled=False`` returns ``base_lr`` unchanged."""
    if base_batch_size < 1:
        raise ConfigError(f"algo.optimizer.base_batch_size must be >= 1, got {base_batch_size}")
    return base_lr * global_batch / base_batch_size if enabled else base_lr


def _name(name: Any) -> OptimizerName:
    try:
        return OptimizerName(name)
    except ValueError:
        raise ConfigError(f"algo.optimizer.name={name!r} must be sgd, adamw or lars") from None


def _as_config(cfg: OptimizerConfig | dict[str, Any]) -> OptimizerConfig:
    if isinstance(cfg, OptimizerConfig):
        return cfg
    values = dict(cfg)
    values["paramwise"] = {
        k: v if isinstance(v, ParamOverride) else ParamOverride(**v) for k, v in (values.get("paramwise") or {}).items()
    }
    return OptimizerConfig(**values)


def param_groups(model: nn.Module, cfg: OptimizerConfig | dict[str, Any], lr: float) -> list[dict[str, Any]]:
    """Group trainable parameters by their options.

    Defaults: lr, cfg.weight_decay, cfg.momentum. With ``no_decay_norm_bias``, 1-D parameters
    (biases, norm weights) and the model's ``no_weight_decay()`` names get weight decay 0 (and are
    excluded from LARS' trust ratio with ``lars_exclude_norm_bias``). Then every ``paramwise``
    entry whose key is a substring of the parameter name applies its lr_mult / decay_mult /
    momentum / lars_exclude / fixed_lr. Each group records its ``base_weight_decay`` (for a weight
    decay schedule) and ``fixed_lr``.
    """
    cfg = _as_config(cfg)
    name_ = _name(cfg.name)
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        opts: dict[str, Any] = {"lr": lr, "weight_decay": float(cfg.weight_decay), "lars_exclude": False}
        opts["fixed_lr"] = False
        if name_ is not OptimizerName.adamw:
            opts["momentum"] = float(cfg.momentum)
        if cfg.no_decay_norm_bias and (p.ndim <= 1 or name in skip):
            opts["weight_decay"] = 0.0
            opts["lars_exclude"] = bool(cfg.lars_exclude_norm_bias)
        for key, over in cfg.paramwise.items():
            if key in name:
                opts["lr"] *= float(over.lr_mult)
                opts["weight_decay"] *= float(over.decay_mult)
                if over.momentum is not None and "momentum" in opts:
                    opts["momentum"] = float(over.momentum)
                if over.lars_exclude is not None:
                    opts["lars_exclude"] = bool(over.lars_exclude)
                opts["fixed_lr"] = opts["fixed_lr"] or bool(over.fixed_lr)
        if name_ is not OptimizerName.lars:
            opts.pop("lars_exclude")
        opts["base_weight_decay"] = opts["weight_decay"]
        group = groups.setdefault(tuple(sorted(opts.items())), {**opts, "params": []})
        group["params"].append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig | dict[str, Any], lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    """``cfg`` is ``algo.optimizer``; ``lr`` the effective (possibly batch-scaled) learning rate."""
    cfg = _as_config(cfg)
    groups = param_groups(model, cfg, lr)
    name = _name(cfg.name)
    if name is OptimizerName.sgd:
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    if name is OptimizerName.adamw:
        return torch.optim.AdamW(
            groups,
            lr=lr,
            betas=(float(cfg.betas[0]), float(cfg.betas[1])),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    return LARS(
        groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta, nesterov=cfg.nesterov
    )
