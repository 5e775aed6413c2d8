"""Per-iteration schedules for any scalar: the learning rate, the weight decay, an EMA momentum, a
temperature (dinov2 builds five such schedules; every one here is the same function).

    value(step) = warmup_start + (start - warmup_start) * step / W            for step < W (warm-up)
                  then, with t = (step - W) / (T - W) in [0, 1]:
    cosine:       end + (start - end) * (1 + cos(pi * t)) / 2                 (SGDR, BYOL's momentum)
    linear:       start + (end - start) * t
    constant:     start
    step:         start * gamma ** (number of milestones <= step)           (MMSelfSup's steplr)

T = total optimizer steps, W = warm-up steps. The learning rate uses it as a factor of each parameter
group's lr (start = 1, end = ``min_lr_ratio``, warm-up from ``warmup_start_factor``: MMSelfSup's
LinearLR + CosineAnnealingLR); algorithms declare theirs as :class:`ScalarSchedule` arguments, e.g.
BYOL's ``momentum: {start: 0.99, end: 1.0, policy: cosine}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError


class Policy(str, Enum):
    cosine = "cosine"  # warm-up, then half-cosine from start to end
    linear = "linear"  # warm-up, then a straight line from start to end
    constant = "constant"  # warm-up, then start
    step = "step"  # warm-up, then start x gamma at each milestone


def scheduled_value(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    policy: Policy | str = Policy.cosine,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The value at optimizer step ``step`` (formula in the module docstring); steps past the end keep
    the final value."""
    policy = Policy(policy)
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if policy is Policy.cosine:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if policy is Policy.linear:
        return start + (end - start) * t
    if policy is Policy.step:
        return start * gamma ** sum(step >= m for m in milestones)
    return start


@dataclass(frozen=True)
class ScalarSchedule:
    """A scheduled hyper-parameter of an algorithm (momentum, temperature, loss weight, ...).

    ``start`` after ``warmup_epochs`` of linear warm-up from ``warmup_start`` (default: start), then
    ``policy`` towards ``end`` (default: start) by the end of training. ``schedule(state)`` gives the
    value at the trainer's current step.
    """

    start: float = 0.0
    end: float | None = None
    policy: Policy = Policy.cosine
    warmup_epochs: float = 0.0
    warmup_start: float | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "policy", Policy(self.policy))
        except ValueError:
            raise ConfigError(
                f"schedule policy {self.policy!r} must be one of {', '.join(p.value for p in Policy)}"
            ) from None
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def __call__(self, state: TrainState) -> float:
        end = self.start if self.end is None else self.end
        warmup_start = self.start if self.warmup_start is None else self.warmup_start
        warmup = min(state.total_steps, int(round(self.warmup_epochs * state.steps_per_epoch)))
        return scheduled_value(state.step, state.total_steps, self.start, end, self.policy, warmup, warmup_start)


class LRFactor:
    """``factor(step)`` multiplies each parameter group's initial lr (used with ``LambdaLR``):
    :func:`scheduled_value` with start 1, end ``min_ratio`` and warm-up from ``warmup_start``.

    Holds only plain numbers and strings, so its state survives ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        policy: Policy | str,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start: float = 1e-3,
        min_ratio: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        try:
            policy = Policy(policy)
        except ValueError:
            raise ConfigError(
                f"schedule.policy={policy!r} must be one of {', '.join(p.value for p in Policy)}"
            ) from None
        if total_steps < 1:
            raise ConfigError(f"the schedule has no steps (total_steps={total_steps}); raise schedule.epochs")
        if not 0 <= warmup_steps <= total_steps:
            raise ConfigError(f"warm-up ({warmup_steps} steps) is longer than training ({total_steps} steps)")
        self.policy, self.total_steps, self.warmup_steps = policy.value, int(total_steps), int(warmup_steps)
        self.warmup_start, self.min_ratio = float(warmup_start), float(min_ratio)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)

    def __call__(self, step: int) -> float:
        return scheduled_value(
            step,
            self.total_steps,
            1.0,
            self.min_ratio,
            self.policy,
            self.warmup_steps,
            self.warmup_start,
            self.milestones,
            self.gamma,
        )


@dataclass
class ScheduleConfig:
    """The ``schedule`` group: how long, how big a batch, and the learning-rate schedule."""

    epochs: int = 10
    batch_size: int = 64  # per device (process)
    accumulate: int = 1  # gradient accumulation steps
    policy: Policy = Policy.cosine
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 1e-3  # warm-up starts at this fraction of the lr
    min_lr_ratio: float = 0.0  # the lr ends at this fraction (cosine / linear)
    milestones: list[int] = field(default_factory=list)  # epochs (policy=step)
    gamma: float = 0.1  # lr factor at each milestone (policy=step)
    # linear scaling rule: lr = algo.optimizer.lr * global batch / algo.optimizer.base_batch_size
    scale_lr: bool = True
    clip_grad: float | None = None  # max global grad norm

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "accumulate"):
            value = getattr(self, key)
            if not value >= 1:
                raise ConfigError(f"schedule.{key} must be >= 1, got {value}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"schedule.warmup_epochs must be in [0, schedule.epochs={self.epochs}], got {self.warmup_epochs}"
            )
        if not 0 < self.warmup_start_factor <= 1:
            raise ConfigError(
                f"schedule.warmup_start_factor must be in (0, 1] (the warm-up starts at this fraction of the lr), "
                f"got {self.warmup_start_factor}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"schedule.min_lr_ratio must be in [0, 1] (the lr ends at this fraction), got {self.min_lr_ratio}"
            )
        milestones = list(self.milestones)
        if not all(1 <= m <= self.epochs for m in milestones):
            raise ConfigError(
                f"schedule.milestones must be epochs in [1, schedule.epochs={self.epochs}], got {milestones}"
            )
        if not self.gamma > 0:
            raise ConfigError(f"schedule.gamma must be > 0, got {self.gamma}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"schedule.clip_grad must be > 0 or null (no clipping), got {self.clip_grad}")
