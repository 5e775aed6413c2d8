"""BYOL: online/target networks, the symmetric loss, the cosine EMA of the target after each step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.algorithms.byol import BYOL
from selfsup.engine.schedules import ScalarSchedule
from selfsup.engine.state import TrainState
from selfsup.models.resnet import ResNet


def _byol(m0: float = 0.9) -> BYOL:
    torch.manual_seed(0)
    return BYOL(ResNet("resnet18"), hidden_dim=32, out_dim=16, momentum=ScalarSchedule(start=m0, end=1.0))


def _batch(n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], "index": torch.arange(n)}


def test_target_is_a_frozen_copy_of_backbone_and_projector():
    byol = _byol()
    online = dict(byol.online().named_parameters())
    target = dict(byol.target.module.named_parameters())
    assert online.keys() == target.keys() and all(torch.equal(online[k], target[k]) for k in online)
    assert not any(p.requires_grad for p in target.values())
    assert all(p.requires_grad for p in byol.predictor.parameters())
    assert {k.split(".")[0] for k in byol.state_dict()} == {"backbone", "projector", "predictor", "target"}


def test_loss_is_the_symmetric_normalised_mse_of_prediction_and_other_views_target():
    byol = _byol()
    batch = _batch()
    loss = byol(batch)["loss"]
    x1, x2 = batch["views"]
    with torch.no_grad():
        p1 = byol.predictor(byol.projector(byol.backbone(x1)))
        p2 = byol.predictor(byol.projector(byol.backbone(x2)))
        z1, z2 = byol.target(x1), byol.target(x2)

    def mse(p, z):  # 2 - 2 cos, from the paper (Eq. 2), by hand
        return (2 - 2 * (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))).mean()

    expected = mse(p1, z2) + mse(p2, z1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected - (mse(p1, z1) + mse(p2, z2))) > 1e-4  # pairing the same view would differ


def test_gradients_reach_the_online_network_only():
    byol = _byol()
    byol(_batch())["loss"].backward()
    assert all(p.grad is not None for p in byol.predictor.parameters())
    assert all(p.grad is not None for p in byol.projector.parameters())
    assert all(p.grad is None for p in byol.target.parameters())


def test_after_step_applies_the_cosine_ema():
    """target <- m target + (1 - m) online with m = 1 - (1 - m0)(cos(pi k / K) + 1) / 2 after step k."""
    byol = _byol(m0=0.9)
    with torch.no_grad():  # move the online network away from the target
        for p in byol.online().parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {k: v.clone() for k, v in byol.target.module.named_parameters()}
    online = {k: v.clone() for k, v in byol.online().named_parameters()}
    state = TrainState(step=3, steps_per_epoch=10, epochs=1)
    out = byol.after_step(state)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert out == {"momentum": pytest.approx(m)}
    for k, v in byol.target.module.named_parameters():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * online[k], atol=1e-6, rtol=0)
    # BN running statistics follow the online network
    bn = "0.bn1.running_mean"
    assert torch.equal(dict(byol.target.module.named_buffers())[bn], dict(byol.online().named_buffers())[bn])


def test_the_last_step_uses_momentum_one():
    byol = _byol()
    before = {k: v.clone() for k, v in byol.target.module.named_parameters()}
    with torch.no_grad():
        for p in byol.online().parameters():
            p.add_(1.0)
    assert byol.after_step(TrainState(step=10, steps_per_epoch=10, epochs=1)) == {"momentum": 1.0}
    assert all(torch.equal(v, before[k]) for k, v in byol.target.module.named_parameters())


def test_extract_uses_the_online_backbone():
    byol = _byol().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(byol.extract(x), byol.backbone(x))
    assert isinstance(byol.target.module[0], nn.Module) and byol.target.module[0] is not byol.backbone
