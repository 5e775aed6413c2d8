"""Per-device batch normalisation emulated in one process (MoCo's "SplitBatchNorm").

With several GPUs and plain (unsynchronised) BatchNorm, every device normalises its own share of the
global batch with that share's statistics. MoCo relies on this: its shuffling BN (He et al. 2020,
Sec. 3.3) computes the keys of a *shuffled* batch, so that the statistics of a device's keys and of its
queries come from different images. On one device, the official MoCo CIFAR-10 demo
(facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``, ``SplitBatchNorm``) imitates it by splitting
the batch for the BatchNorm layers only. Here, for ``num_splits = s`` and a batch of N = s * m samples::

    training:  y[g*m:(g+1)*m] = BN(x[g*m:(g+1)*m])    for each group g of m *consecutive* samples,
                                                      with that group's mean and (biased) variance
               running_stat <- mean over the groups of what BN's update gives for each group
    eval:      plain BatchNorm with the running statistics

so one process with ``num_splits = s`` computes what s processes with per-device BatchNorm compute when
rank r holds rows r*m..(r+1)*m-1 (outputs and gradients; a group is normalised by the same kernel on the
same-shaped input as on its own device). The running statistics are the mean of the s per-device
updates (the demo's rule); algorithms that train with per-device BatchNorm on several processes average
their ranks' running statistics after each step to match (:func:`average_batchnorm_statistics`).
(The demo reshapes [N, C, ...] to [N / s, s * C, ...], which puts every s-th sample in one group;
consecutive groups are what several devices hold.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup import distributed
from selfsup.errors import ConfigError
from selfsup.models.sync_batchnorm import CPUSyncBatchNorm, replace_batchnorm


class SplitBatchNorm(_BatchNorm):
    """BatchNorm over each of ``num_splits`` consecutive groups of the batch separately (training mode);
    plain BatchNorm in eval mode. Any input [N, C, *] with N divisible by ``num_splits``. Parameter and
    buffer names are BatchNorm's, so state dicts are interchangeable with ``nn.BatchNorm*d``."""

    def __init__(
        self,
        num_features: int,
        num_splits: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ConfigError(f"SplitBatchNorm needs num_splits >= 1 (an integer), got {num_splits!r}")
        self.num_splits = num_splits

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's argument name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [N, C, ...], got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's argument name
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        self._check_input_dim(input)
        s, n = self.num_splits, input.shape[0]
        if n % s:
            raise ValueError(
                f"SplitBatchNorm with num_splits={s} needs a batch divisible by {s}, got {n} samples; "
                "make the per-process batch a multiple of bn_splits"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        tracking = self.track_running_stats and self.running_mean is not None and self.running_var is not None
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # once per forward, as on each device
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        outs, means, variances = [], [], []
        for group in input.chunk(s):
            mean = self.running_mean.clone() if tracking else None  # type: ignore[union-attr]
            var = self.running_var.clone() if tracking else None  # type: ignore[union-attr]
            outs.append(F.batch_norm(group, mean, var, self.weight, self.bias, True, factor, self.eps))
            means.append(mean)
            variances.append(var)
        if tracking:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))  # type: ignore[union-attr,arg-type]
                self.running_var.copy_(torch.stack(variances).mean(0))  # type: ignore[union-attr,arg-type]
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``module`` by a :class:`SplitBatchNorm` of ``num_splits`` groups
    (the same parameter and buffer tensors, train/eval mode kept; state-dict keys unchanged). Returns the
    converted module (``module`` itself unless it is a BatchNorm)."""
    return replace_batchnorm(
        module,
        SplitBatchNorm,
        lambda bn: SplitBatchNorm(bn.num_features, num_splits, bn.eps, bn.momentum, bn.affine, bn.track_running_stats),
    )


def _is_synchronised(bn: nn.Module) -> bool:
    return isinstance(bn, (nn.SyncBatchNorm, CPUSyncBatchNorm))


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Average the running mean and variance of every per-device (not synchronised) BatchNorm in ``module``
    over the processes, in place, with one all-reduce: the multi-process counterpart of
    :class:`SplitBatchNorm`'s rule, so that every rank (and the checkpoint rank 0 writes) holds the same
    statistics. A no-op in one process and for synchronised BatchNorms (equal on every rank already)."""
    if distributed.get_world_size() == 1:
        return
    stats = [
        buf
        for bn in module.modules()
        if isinstance(bn, _BatchNorm) and not _is_synchronised(bn)
        for buf in (bn.running_mean, bn.running_var)
        if buf is not None
    ]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1).float() for s in stats])
    distributed.all_reduce_(flat, op="mean")
    offset = 0
    for s in stats:
        s.copy_(flat[offset : offset + s.numel()].view_as(s))
        offset += s.numel()
