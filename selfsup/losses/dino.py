"""DINO's self-distillation loss: cross-entropy from the centred, sharpened teacher to the student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student distributions over crops (Caron et al., "Emerging
    Properties in Self-Supervised Vision Transformers", ICCV 2021, Eq. 3 and Algorithm 1; official
    ``DINOLoss``).

    For teacher logits t_a of the G global crops (a = 0..G-1), student logits s_b of all V crops
    (b = 0..V-1, the global crops first, in the teacher's order), the center c [K] and the temperatures::

        P_t(a) = softmax((t_a - c) / T_t)          (centring and sharpening; no gradient)
        L      = 1 / #pairs * sum_{a, b: a != b} mean_i sum_k -P_t(a)_ik * log_softmax(s_b / T_s)_ik

    over the G * V - G pairs of *different* crops (a student crop never predicts the teacher's output of
    the same crop). The center is updated by the algorithm after the loss (see ``selfsup.algorithms.dino``).

    Computed in float32 outside autocast: a softmax over K = 65536 outputs at T_t = 0.04 in bf16 loses most of
    the teacher's distribution.

    Args:
        student_temp: T_s > 0 (paper: 0.1).
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = float(student_temp)

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, teacher_temp: float | Tensor
    ) -> Tensor:
        """student: V tensors [n, K] (global crops first); teacher: G <= V tensors [n, K] (the global crops);
        center: [K] or [1, K]; teacher_temp: T_t > 0 (a number, or a 0-d tensor on the logits' device, which
        spares a host synchronisation). Returns the scalar loss."""
        if not 1 <= len(teacher) <= len(student) or len(student) < 2:
            raise ValueError(
                f"expected 1 <= G <= V teacher (global) and student crops with V >= 2, got G={len(teacher)}, "
                f"V={len(student)}"
            )
        shape = student[0].shape
        if len(shape) != 2 or any(x.shape != shape for x in [*student, *teacher]):
            raise ValueError(
                f"expected every crop's logits as [n, K] of one shape, got {[tuple(x.shape) for x in student]}"
            )
        if center.numel() != shape[1]:
            raise ValueError(f"expected a center of {shape[1]} values, got shape {tuple(center.shape)}")
        if not isinstance(teacher_temp, Tensor) and not teacher_temp > 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        with torch.autocast(device_type=student[0].device.type, enabled=False):
            c = center.detach().float().reshape(1, -1)
            targets = [F.softmax((t.detach().float() - c) / teacher_temp, dim=1) for t in teacher]
            log_probs = [F.log_softmax(s.float() / self.student_temp, dim=1) for s in student]
            terms = [
                -(p * log_probs[b]).sum(dim=1).mean()
                for a, p in enumerate(targets)
                for b in range(len(log_probs))
                if b != a
            ]
            return torch.stack(terms).mean()
