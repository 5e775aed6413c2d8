"""LARS optimizer (You et al., "Large Batch Training of Convolutional Networks", 2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and a per-layer trust ratio, as in MMSelfSup / SimCLR / BYOL recipes.

    For a parameter w with gradient g (weight decay wd, coefficient eta)::

        local_lr = eta * |w| / (|g| + wd * |w| + eps)     (1 if |w| = 0 or |g| = 0, or if the
                                                           group has lars_exclude=True)
        u = (g + wd * w) * lr * local_lr
        buf = momentum * buf + u ;  w -= buf              (nesterov: w -= u + momentum * buf)

    Groups with ``lars_exclude=True`` (biases and norm layers in the recipes) take plain SGD steps.
    No host synchronisation: the trust ratio stays on the device.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS arguments lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, nesterov=nesterov, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, eta, eps = group["weight_decay"], group["momentum"], group["eta"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars_exclude"]:
                    local_lr = torch.ones((), device=p.device, dtype=p.dtype)
                else:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = eta * w_norm / (g_norm + wd * w_norm + eps)
                    local_lr = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                update = g.add(p, alpha=wd).mul_(local_lr * group["lr"])
                if mom != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(mom).add_(update)
                    buf = state["momentum_buffer"]
                    update = update.add(buf, alpha=mom) if group["nesterov"] else buf
                p.sub_(update)
        return loss
