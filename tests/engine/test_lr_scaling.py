"""Linear LR scaling: lr = base lr x global batch / base batch, logged at start, switchable."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import compose_cfg, tiny
from selfsup.engine.optim import scaled_lr
from selfsup.engine.trainer import Trainer
from selfsup.errors import ConfigError


def test_scaled_lr_formula():
    assert scaled_lr(0.3, 256, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096, 256) == pytest.approx(4.8)  # MMSelfSup simclr 16xb256: lr 4.8
    assert scaled_lr(0.3, 512, 256) == pytest.approx(0.6)  # MMSelfSup simclr 8xb64: lr 0.6
    assert scaled_lr(1.5e-4, 4096, 256) == pytest.approx(2.4e-3)  # MAE: blr x 4096 / 256
    assert scaled_lr(0.3, 4096, 256, enabled=False) == 0.3
    with pytest.raises(ConfigError, match="base_batch_size must be >= 1, got 0"):
        scaled_lr(0.1, 64, 0)


@pytest.mark.parametrize(
    "batch, accumulate, scale, expected",
    [(16, 1, True, 0.3 * 16 / 256), (16, 2, True, 0.3 * 32 / 256), (16, 2, False, 0.3)],
)
def test_trainer_uses_and_logs_the_scaled_lr(batch, accumulate, scale, expected, tmp_path, caplog):
    overrides = tiny("simclr") + [
        f"schedule.batch_size={batch}",
        f"schedule.accumulate={accumulate}",
        f"schedule.scale_lr={str(scale).lower()}",
        "algo.optimizer.lr=0.3",
        "algo.optimizer.base_batch_size=256",
        "schedule.policy=constant",
        "knn.enabled=false",
    ]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    assert trainer.global_batch == batch * accumulate and trainer.lr == pytest.approx(expected)
    assert all(g["initial_lr"] == pytest.approx(expected) for g in trainer.optimizer.param_groups)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        trainer.fit()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("lr: base"))
    assert "base 0.3 for batch 256" in line and f"for batch {batch * accumulate}" in line
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["kind"] == "config" and record["base_lr"] == 0.3 and record["lr"] == pytest.approx(expected)


def test_paramwise_lr_mult_scales_with_the_effective_lr(tmp_path):
    overrides = tiny("odc") + [
        "algo.optimizer.paramwise.head.lr_mult=10",
        "algo.optimizer.lr=0.5",
        "algo.optimizer.base_batch_size=32",
        "knn.enabled=false",
    ]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([0.25, 2.5])  # 0.5 x 16/32, and x10 for the head
