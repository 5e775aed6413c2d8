"""Momentum (exponential-moving-average) target networks: BYOL, MoCo, DINO-style teachers.

The target network's parameters xi follow the online network's parameters theta:

    xi <- m * xi + (1 - m) * theta          BYOL (Grill et al. 2020, Eq. 1, tau = m)
                                            MoCo (He et al. 2020, Eq. 2: theta_k <- m theta_k + (1 - m) theta_q)

so ``m`` weighs the *target* (the old average): m = 1 freezes the target, m = 0 copies the online network.
(MMEngine/MMPretrain's ``ExponentialMovingAverage`` calls ``1 - m`` "momentum"; here ``m`` is the papers' m/tau,
like MMSelfSup 1.x's ``CosineEMA(momentum=0.996)``.) BYOL anneals m from 0.996 to 1 with a cosine
:class:`~selfsup.engine.schedules.ScalarSchedule`.

Buffers: floating-point buffers (BatchNorm ``running_mean`` / ``running_var``) are *copied* from the online network,
not averaged, and so are integer buffers (``num_batches_tracked``). This is MMEngine's ``BaseAveragedModel`` with
``update_buffers=False``, the default of MMSelfSup 1.x's momentum encoders (``CosineEMA`` for BYOL / MoCo v3).
(MoCo's official code and lightly's ``update_momentum`` average parameters only and leave the key encoder's
BatchNorm statistics to its own forward passes in train mode.) With copies, the target's evaluation-mode statistics
are the online network's, the ones that belong to weights close to the target's; running statistics that a
train-mode target forward pass accumulates in between are overwritten at the next update.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.errors import ConfigError


def _check_momentum(m: float, name: str = "m") -> float:
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise ConfigError(f"momentum {name}={m!r} must be a number in [0, 1] (e.g. 0.996)")
    m = float(m)
    if not 0.0 <= m <= 1.0:  # also rejects NaN
        raise ConfigError(
            f"momentum {name}={m} is outside [0, 1]; it weighs the target network: "
            "target <- m * target + (1 - m) * online (BYOL/MoCo use 0.99 - 0.999)"
        )
    return m


def _matching(kind: str, online: dict[str, Tensor], target: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The tensors of ``target`` and ``online`` in the same (name) order, after checking names and shapes."""
    if online.keys() != target.keys():
        only_online = sorted(online.keys() - target.keys())[:5]
        only_target = sorted(target.keys() - online.keys())[:5]
        raise ValueError(
            f"the online and target networks have different {kind}: only in online {only_online}, only in "
            f"target {only_target}; the target must be a copy of the online network (copy.deepcopy)"
        )
    for name, t in target.items():
        if t.shape != online[name].shape:
            raise ValueError(
                f"{kind[:-1]} {name!r} has shape {tuple(online[name].shape)} in the online network and "
                f"{tuple(t.shape)} in the target; the target must be a copy of the online network (copy.deepcopy)"
            )
    names = list(target)
    return [target[n].detach() for n in names], [online[n].detach() for n in names]


def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """In place: ``target <- m * target + (1 - m) * online`` for every parameter; buffers copied from ``online``.

    BYOL (Grill et al. 2020, Eq. 1) / MoCo (He et al. 2020, Eq. 2). The parameters are updated with two fused
    ``torch._foreach_*`` calls over all tensors (no Python loop per tensor), under ``torch.no_grad``; every buffer
    (BatchNorm running mean/var, ``num_batches_tracked``) is copied from ``online`` (see the module docstring).

    Args:
        online: the network trained by the optimizer (theta).
        target: its momentum copy (xi), same parameter and buffer names and shapes.
        m: momentum in [0, 1], the weight of the target's current value.

    Raises:
        ConfigError: ``m`` outside [0, 1].
        ValueError: ``online`` is ``target``, or their parameter/buffer names or shapes differ.
    """
    m = _check_momentum(m)
    if online is target:
        raise ValueError("update_momentum got the same module as online and target; pass the momentum copy as target")
    t_params, o_params = _matching("parameters", dict(online.named_parameters()), dict(target.named_parameters()))
    t_bufs, o_bufs = _matching("buffers", dict(online.named_buffers()), dict(target.named_buffers()))
    with torch.no_grad():
        if t_params:
            if m == 0.0:  # exact copy (0 * inf would give NaN)
                torch._foreach_copy_(t_params, o_params)
            elif m != 1.0:
                torch._foreach_mul_(t_params, m)
                torch._foreach_add_(t_params, o_params, alpha=1.0 - m)
        if t_bufs:
            torch._foreach_copy_(t_bufs, o_bufs)


class MomentumEncoder(nn.Module):
    """A momentum (EMA) copy of a network: MoCo's key encoder, BYOL's target network.

    Holds ``copy.deepcopy(module)`` (as ``self.module``) with ``requires_grad=False`` on every parameter; its
    parameters and buffers are part of this module's ``state_dict``, so a checkpoint of the algorithm that owns it
    saves and restores the EMA weights. ``train()`` / ``eval()`` behave as for any module (MoCo and BYOL run their
    target in train mode, so its BatchNorm normalises with batch statistics). ``forward`` runs the copy under
    ``torch.no_grad``; ``update(online, m)`` applies :func:`update_momentum`.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"MomentumEncoder needs an nn.Module to copy, got {type(module).__name__}")
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)  # (nn.Parameter's deepcopy does not copy .grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def update(self, online: nn.Module, m: float) -> None:
        """``self.module <- m * self.module + (1 - m) * online`` (buffers copied): :func:`update_momentum`."""
        update_momentum(online, self.module, m)
