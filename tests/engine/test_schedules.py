"""Scalar schedules (EMA momentum, temperatures, weight decay): the same function as the lr's."""

from __future__ import annotations

import math

import pytest

from selfsup.engine.schedules import Policy, ScalarSchedule, scheduled_value
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError


def _byol_tau(k: int, total: int, tau_base: float) -> float:
    """BYOL Sec. 3.2: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2 (MMSelfSup's CosineEMA)."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / total) + 1) / 2


def _state(step: int, steps_per_epoch: int = 10, epochs: int = 4) -> TrainState:
    return TrainState(epoch=step // steps_per_epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs)


def test_cosine_schedule_is_byols_momentum():
    momentum = ScalarSchedule(start=0.99, end=1.0, policy="cosine")
    values = [momentum(_state(k)) for k in range(41)]
    for k, v in enumerate(values):
        assert v == pytest.approx(_byol_tau(k, 40, 0.99), abs=1e-15), k
    assert values[0] == pytest.approx(0.99) and values[-1] == 1.0
    assert all(a < b for a, b in zip(values, values[1:]))  # increases from start to end
    assert momentum(_state(1000)) == 1.0  # past the end: the final value


def test_cosine_midpoint_and_quarter():
    s = ScalarSchedule(start=0.9, end=0.95)
    assert s(_state(20)) == pytest.approx(0.925, abs=1e-15)
    assert s(_state(10)) == pytest.approx(0.95 - 0.05 * (math.sqrt(0.5) + 1) / 2, abs=1e-15)


def test_warmup_then_constant_is_dinos_teacher_temperature():
    """DINO: teacher temperature 0.04 -> 0.07 linearly over the first 30 epochs, then 0.07."""
    temp = ScalarSchedule(start=0.07, policy="constant", warmup_epochs=3, warmup_start=0.04)
    assert temp(_state(0)) == pytest.approx(0.04)
    assert temp(_state(15)) == pytest.approx(0.055)
    assert temp(_state(30)) == temp(_state(39)) == pytest.approx(0.07)


def test_linear_and_step_policies():
    assert scheduled_value(5, 10, 1.0, 3.0, Policy.linear) == pytest.approx(2.0)
    assert scheduled_value(7, 10, 2.0, 0.0, "step", milestones=[3, 6], gamma=0.5) == pytest.approx(0.5)
    assert ScalarSchedule(start=0.5)(_state(17)) == 0.5  # no end: constant after warm-up


def test_bad_policy_and_warmup():
    with pytest.raises(ConfigError, match="schedule policy 'exp' must be one of cosine, linear, constant, step"):
        ScalarSchedule(start=1.0, policy="exp")
    with pytest.raises(ConfigError, match="warmup_epochs must be >= 0, got -1"):
        ScalarSchedule(start=1.0, warmup_epochs=-1)
