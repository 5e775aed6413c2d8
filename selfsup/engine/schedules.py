"""Per-iteration learning-rate factors: linear warm-up, then cosine, step or constant."""

from __future__ import annotations

import math
from collections.abc import Sequence

from selfsup.errors import ConfigError


class LRFactor:
    """``factor(step)`` multiplies each parameter group's initial lr (used with ``LambdaLR``).

    * warm-up, steps [0, W): ``start + (1 - start) * step / W`` (MMSelfSup's LinearLR)
    * cosine: ``m + (1 - m) * (1 + cos(pi * t)) / 2`` with t = (step - W) / (T - W), m = min_ratio
    * step:   ``gamma ** (number of milestones <= step)``
    * constant: 1

    Holds only plain numbers and strings, so its state survives ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        policy: str,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start: float = 1e-3,
        min_ratio: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        if policy not in ("cosine", "step", "constant"):
            raise ConfigError(f"schedule.policy={policy!r} must be cosine, step or constant")
        if total_steps < 1:
            raise ConfigError(f"the schedule has no steps (total_steps={total_steps}); raise schedule.epochs")
        if not 0 <= warmup_steps <= total_steps:
            raise ConfigError(f"warm-up ({warmup_steps} steps) is longer than training ({total_steps} steps)")
        self.policy, self.total_steps, self.warmup_steps = str(policy), int(total_steps), int(warmup_steps)
        self.warmup_start, self.min_ratio = float(warmup_start), float(min_ratio)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps
        if self.policy == "cosine":
            t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if self.policy == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0
