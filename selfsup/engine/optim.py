"""Optimizer construction: parameter groups (no decay on norms/biases, per-name overrides) and
SGD / AdamW (fused on CUDA) / LARS."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from selfsup.engine.lars import LARS
from selfsup.errors import ConfigError


def scaled_lr(base_lr: float, global_batch: int, base_batch_size: int, enabled: bool = True) -> float:
    """Linear scaling rule (Goyal et al. 2017; MMSelfSup's ``new_lr = old_lr * new_ngpus / old_ngpus``):
    ``lr = base_lr * global_batch / base_batch_size``, where global batch = per-device batch x world
    size x gradient-accumulation steps. ``enabled=False`` returns ``base_lr`` unchanged."""
    if base_batch_size < 1:
        raise ConfigError(f"algo.optimizer.base_batch_size must be >= 1, got {base_batch_size}")
    return base_lr * global_batch / base_batch_size if enabled else base_lr


def param_groups(model: nn.Module, cfg: Mapping[str, Any], lr: float) -> list[dict[str, Any]]:
    """Group trainable parameters by their options.

    Defaults: lr, cfg.weight_decay, cfg.momentum. With ``no_decay_norm_bias``, 1-D parameters
    (biases, norm weights) and the model's ``no_weight_decay()`` names get weight decay 0 (and are
    excluded from LARS' trust ratio with ``lars_exclude_norm_bias``). Then every ``paramwise``
    entry whose key is a substring of the parameter name applies its lr_mult / decay_mult /
    momentum / lars_exclude.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    paramwise = dict(cfg.get("paramwise") or {})
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        opts: dict[str, Any] = {"lr": lr, "weight_decay": float(cfg["weight_decay"]), "lars_exclude": False}
        if cfg["name"] != "adamw":
            opts["momentum"] = float(cfg["momentum"])
        if cfg["no_decay_norm_bias"] and (p.ndim <= 1 or name in skip):
            opts["weight_decay"] = 0.0
            opts["lars_exclude"] = bool(cfg["lars_exclude_norm_bias"])
        for key, over in paramwise.items():
            if key in name:
                opts["lr"] *= float(over["lr_mult"])
                opts["weight_decay"] *= float(over["decay_mult"])
                if over.get("momentum") is not None and "momentum" in opts:
                    opts["momentum"] = float(over["momentum"])
                if over.get("lars_exclude") is not None:
                    opts["lars_exclude"] = bool(over["lars_exclude"])
        if cfg["name"] != "lars":
            opts.pop("lars_exclude")
        group = groups.setdefault(tuple(sorted(opts.items())), {**opts, "params": []})
        group["params"].append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """``cfg`` is ``algo.optimizer``; ``lr`` the effective (possibly batch-scaled) learning rate."""
    groups = param_groups(model, cfg, lr)
    name = str(cfg["name"])
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=cfg["momentum"],
            nesterov=cfg["nesterov"],
            weight_decay=cfg["weight_decay"],
            fused=fused or None,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=lr,
            betas=tuple(cfg["betas"]),
            eps=cfg["eps"],
            weight_decay=cfg["weight_decay"],
            fused=fused or None,
        )
    if name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
            eta=cfg["lars_eta"],
            nesterov=cfg["nesterov"],
        )
    raise ConfigError(f"algo.optimizer.name={name!r} must be sgd, adamw or lars")
