"""Masked-patch pixel reconstruction loss of MAE."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MAEReconstructionLoss(nn.Module):
    """Mean squared error on the masked patches only (He et al., "Masked Autoencoders Are
    Scalable Vision Learners", CVPR 2022, Sec. 3 "Reconstruction target").

    With predictions p and targets t of shape [B, L, P] (L patches of P = patch^2 * C pixels) and
    mask m in {0, 1}^[B, L] (1 = removed)::

        t_hat = (t - mean_P(t)) / sqrt(var_P(t) + eps)      if norm_pix (per-patch normalisation)
        L = sum_{b,l} m_bl * mean_P (p_bl - t_hat_bl)^2  /  sum_{b,l} m_bl

    ``var_P`` is the unbiased variance over the P values of a patch, as in the official code.

    Args:
        norm_pix: normalise each target patch by its own mean and variance (paper default: True).
        eps: added to the variance (official: 1e-6).
    """

    def __init__(self, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.norm_pix = norm_pix
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred and target must both be [B, L, P], got {pred.shape}, {target.shape}")
        if mask.shape != pred.shape[:2]:
            raise ValueError(f"mask must be [B, L] = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target, mask = pred.float(), target.float(), mask.float()
            if self.norm_pix:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + self.eps).sqrt()
            per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, L]
            return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
