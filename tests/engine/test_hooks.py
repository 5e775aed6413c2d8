"""The algorithm contract: when the trainer calls each hook and with what state; the weight-decay schedule."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg, tiny
from selfsup.algorithms.simclr import SimCLR
from selfsup.engine.trainer import Trainer

CALLS: list[tuple] = []


class RecordingSimCLR(SimCLR):
    """SimCLR that records every hook call; before the optimizer step it zeroes the projection's last layer
    gradient (what SwAV does to its prototypes and DINO to its last layer), so that layer must not move."""

    def on_train_start(self, ctx):
        CALLS.append(("train_start", ctx.state.epoch, ctx.state.step))

    def on_epoch_start(self, ctx):
        CALLS.append(("epoch_start", ctx.state.epoch, ctx.state.step))

    def before_optimizer_step(self, state):
        grad = self.neck.mlp[3].weight.grad
        CALLS.append(("before_step", state.epoch, state.step, grad is not None and bool(grad.abs().sum() > 0)))
        self.neck.mlp[3].weight.grad.zero_()

    def after_step(self, state):
        CALLS.append(("after_step", state.epoch, state.step, state.steps_per_epoch, state.total_steps))
        return {"hook_step": float(state.step)}


def test_hooks_are_called_in_order_with_the_training_state(tmp_path):
    CALLS.clear()
    overrides = tiny("simclr") + [
        f"algo.model._target_={__name__}.RecordingSimCLR",
        "schedule.epochs=2",
        "algo.optimizer.name=sgd",
        "algo.optimizer.weight_decay=0",
        "knn.enabled=false",
        "log.interval=1",
    ]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    frozen = trainer.algo.neck.mlp[3].weight.detach().clone()
    first = trainer.algo.neck.mlp[0].weight.detach().clone()
    trainer.fit()
    spe = 4  # 64 images / batch 16
    expected = [("train_start", 0, 0)]
    for epoch in range(2):
        expected.append(("epoch_start", epoch, epoch * spe))
        for i in range(spe):
            step = epoch * spe + i
            expected += [("before_step", epoch, step, True), ("after_step", epoch, step + 1, spe, 2 * spe)]
    assert expected == CALLS
    assert torch.equal(trainer.algo.neck.mlp[3].weight, frozen)  # its gradient was zeroed before every step
    assert not torch.equal(trainer.algo.neck.mlp[0].weight, first)  # while the layer before it trained
    import json

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["hook_step"] for r in logged if r["kind"] == "train"] == [float(s) for s in range(1, 9)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_follows_its_cosine_schedule(optimizer, tmp_path):
    """algo.optimizer.weight_decay_end: the decay of every group goes from its base value to base x end /
    weight_decay along a cosine over the run (DINO), and 1-D parameters keep 0."""
    overrides = tiny("simclr") + [
        f"algo.optimizer.name={optimizer}",
        "algo.optimizer.weight_decay=0.04",
        "algo.optimizer.weight_decay_end=0.4",
        "knn.enabled=false",
        "schedule.epochs=2",
    ]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(sorted({g["weight_decay"] for g in opt.param_groups}))
    )
    trainer.fit()
    total = 8
    for k, decays in enumerate(seen):
        expected = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * k / total))
        assert decays == [0.0, pytest.approx(expected)], k
    assert len(seen) == total
