"""Gradient accumulation: `accumulate` micro-batches make one optimizer step with their mean gradient."""

from __future__ import annotations

import torch

from conftest import compose_cfg, tiny
from selfsup.engine.trainer import Trainer


def _batch(trainer: Trainer, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]
    return {"views": views, "index": torch.arange(16), "label": torch.zeros(16, dtype=torch.long)}


def test_two_micro_batches_make_one_step_with_the_mean_gradient(tmp_path):
    overrides = tiny("simclr") + [
        "schedule.accumulate=2",
        "schedule.policy=constant",
        "algo.optimizer.name=sgd",
        "algo.optimizer.momentum=0",
        "algo.optimizer.weight_decay=0",
        "knn.enabled=false",
    ]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    assert trainer.state.steps_per_epoch == trainer.micro_per_epoch // 2 and trainer.global_batch == 32
    params = dict(trainer.algo.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}
    b1, b2 = _batch(trainer, 1), _batch(trainer, 2)

    # reference: the two gradients separately, from the same starting weights
    grads = []
    for b in (b1, b2):
        trainer.algo.zero_grad()
        trainer.algo(b)["loss"].backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
    trainer.algo.zero_grad()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(start[k])

    trainer.train_step(b1, last_micro=False)
    assert trainer.step == 0 and all(torch.equal(p, start[k]) for k, p in params.items())
    trainer.train_step(b2, last_micro=True)
    assert trainer.step == 1
    lr = trainer.optimizer.param_groups[0]["lr"]
    for k, p in params.items():
        expected = start[k] - lr * (grads[0][k] + grads[1][k]) / 2
        assert torch.allclose(p, expected, atol=1e-6, rtol=1e-4), k
        assert p.grad is None  # cleared after the step
