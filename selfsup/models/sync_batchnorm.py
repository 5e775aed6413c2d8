"""Synchronised batch normalisation for every device: torch's ``SyncBatchNorm`` on CUDA, and the
same statistics over a CPU (gloo) process group, which torch's does not support.

Batch normalisation over the *global* batch (Ioffe & Szegedy 2015; synchronised across devices as
in SimCLR/MoCo/BYOL recipes): for a channel with values x over all n_r samples of all ranks r,

    N = sum_r n_r,   mean = sum_r sum x / N,   var = sum_r sum x^2 / N - mean^2   (biased)
    y = (x - mean) / sqrt(var + eps) * weight + bias
    running_var <- (1 - m) * running_var + m * var * N / (N - 1)                   (unbiased)

Each rank all-gathers its per-channel ``[sum x, sum x^2, n]`` *with gradients*
(``selfsup.distributed.all_gather_with_grad``), so autograd gives every rank the exact gradient of
the global normalisation; with DDP's gradient averaging, 2 processes x 8 images train like
1 process x 16 images (``tests/test_distributed.py``). The CPU path exists so that multi-process
runs can be checked on any machine; on CUDA torch's fused kernels are used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup import distributed


class CPUSyncBatchNorm(_BatchNorm):
    """Batch normalisation over the global batch of a CPU (gloo) process group; plain batch
    normalisation in eval mode or in a single process. Any input [N, C, *] (1-D, 2-D, 3-D)."""

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's argument name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [N, C, ...], got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's argument name
        if not self.training or distributed.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0, *range(2, input.dim())]
        x64 = input.double()  # E[x^2] - E[x]^2 in float64: no cancellation for large means
        local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), x64.new_tensor([input.numel() / input.shape[1]])])
        total = distributed.all_gather_with_grad(local[None]).sum(0)
        c = input.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype)
        y = (input - mean.to(input.dtype).view(shape)) * scale.view(shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def replace_batchnorm(module: nn.Module, kind: type[_BatchNorm], make: Callable[[_BatchNorm], _BatchNorm]) -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``module`` that is not a ``kind`` already by ``make(bn)``, which
    gets the same parameter and buffer tensors and train/eval mode (state-dict keys unchanged). Returns the
    converted module (``module`` itself unless it is a BatchNorm)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, kind):
        out = make(module)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, replace_batchnorm(child, kind, make))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``module`` by a synchronised one: torch's ``SyncBatchNorm``
    for a CUDA ``device``, :class:`CPUSyncBatchNorm` otherwise (parameters, buffers and train/eval
    mode kept; state-dict keys unchanged). Returns the converted module."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return replace_batchnorm(
        module,
        CPUSyncBatchNorm,
        lambda bn: CPUSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats),
    )
