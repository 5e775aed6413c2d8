"""LARS optimizer (You et al., "Large Batch Training of Convolutional Networks", 2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and a per-layer trust ratio, as in MMSelfSup / SimCLR / BYOL recipes.

    For a parameter w with gradient g (weight decay wd, coefficient eta)::

        local_lr = eta * |w| / (|g| + wd * |w| + eps)     (1 if |w| = 0 or |g| = 0, or if the
                                                           group has lars_exclude=True)
        u = (g + wd * w) * lr * local_lr
        buf = momentum * buf + u ;  w -= buf              (nesterov: w -= u + momentum * buf)

    Groups with ``lars_exclude=True`` (biases and norm layers in the recipes) take plain SGD steps.
    No host synchronisation: the trust ratio stays on the device. ``foreach=True`` (the default) updates a
    group with a few multi-tensor ``torch._foreach_*`` kernels (norms, trust ratios, update, momentum) instead of
    ~8 kernel launches per parameter from a Python loop (~10 ms per ResNet-50 step on a GPU); ``foreach=False``
    is the loop, the reference it is tested against.
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
        foreach: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS arguments lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, nesterov=nesterov, lars_exclude=False
        )
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.foreach:
                self._foreach_step(group)
                continue
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

    def _foreach_step(self, group: dict[str, Any]) -> None:
        """The loop's arithmetic, in the same order, on all of a group's parameters at once."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        wd, mom, eta, eps, lr = group["weight_decay"], group["momentum"], group["eta"], group["eps"], group["lr"]
        if group["lars_exclude"]:
            scales = [torch.ones((), device=p.device, dtype=p.dtype) * lr for p in params]
        else:  # trust ratios of all parameters as one vector (per device and dtype)
            w_norm, g_norm = torch._foreach_norm(params), torch._foreach_norm(grads)
            scales = [torch.empty(0)] * len(params)
            kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for k, w in enumerate(w_norm):
                kinds.setdefault((w.device, w.dtype), []).append(k)
            for idx in kinds.values():
                w, g = torch.stack([w_norm[k] for k in idx]), torch.stack([g_norm[k] for k in idx])
                ratio = eta * w / (g + wd * w + eps)
                local = torch.where((w > 0) & (g > 0), ratio, torch.ones_like(ratio)) * lr
                for k, scale in zip(idx, local.unbind(0), strict=True):
                    scales[k] = scale
        updates: list[Tensor] = list(torch._foreach_add(grads, params, alpha=wd))
        torch._foreach_mul_(updates, scales)
        if mom != 0:
            old = [(self.state[p]["momentum_buffer"], u) for p, u in zip(params, updates, strict=True)
                   if "momentum_buffer" in self.state[p]]  # fmt: skip
            if old:  # buf = mom * buf + update
                torch._foreach_mul_([b for b, _ in old], mom)
                torch._foreach_add_([b for b, _ in old], [u for _, u in old])
            for p, u in zip(params, updates, strict=True):  # first step: the buffer is the update
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = u.clone()
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            updates = list(torch._foreach_add(updates, bufs, alpha=mom)) if group["nesterov"] else bufs
        torch._foreach_sub_(params, updates)
