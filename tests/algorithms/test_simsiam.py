"""SimSiam: projector/predictor as in the paper, the symmetric loss with its stop-gradient, and the predictor's
fixed learning rate through the real trainer's schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose_cfg, tiny
from selfsup.algorithms.simsiam import SimSiam
from selfsup.models.resnet import ResNet


def _simsiam() -> SimSiam:
    torch.manual_seed(0)
    return SimSiam(ResNet("resnet18"), hidden_dim=32, out_dim=16, pred_hidden_dim=8)


def _batch(n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], "index": torch.arange(n)}


def _layers(module: nn.Module) -> list[tuple[str, tuple]]:
    out = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out.append(("linear", (m.in_features, m.out_features, m.bias is not None)))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("bn", (m.num_features, m.affine)))
        elif isinstance(m, nn.ReLU):
            out.append(("relu", ()))
    return out


def test_projector_and_predictor_are_the_papers():
    """Projector: 3 x (Linear without bias -> BN), ReLU between, the output BN without affine; predictor:
    a 512 bottleneck with BN + ReLU, its output Linear with a bias and no BN (official builder.py)."""
    simsiam = SimSiam(ResNet("resnet18"))
    assert _layers(simsiam.projector) == [
        ("linear", (512, 2048, False)), ("bn", (2048, True)), ("relu", ()),
        ("linear", (2048, 2048, False)), ("bn", (2048, True)), ("relu", ()),
        ("linear", (2048, 2048, False)), ("bn", (2048, False)),
    ]  # fmt: skip
    assert _layers(simsiam.predictor) == [
        ("linear", (2048, 512, False)), ("bn", (512, True)), ("relu", ()), ("linear", (512, 2048, True)),
    ]  # fmt: skip
    assert {k.split(".")[0] for k in simsiam.state_dict()} == {"backbone", "projector", "predictor"}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def test_loss_is_the_symmetric_negative_cosine_of_prediction_and_other_views_projection():
    simsiam = _simsiam()
    batch = _batch()
    loss = simsiam(batch)["loss"]
    x1, x2 = batch["views"]
    with torch.no_grad():
        z1, z2 = simsiam.projector(simsiam.backbone(x1)), simsiam.projector(simsiam.backbone(x2))
        p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)
    expected = -_cos(p1, z2) / 2 - _cos(p2, z1) / 2  # Eq. 2, by hand
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected - (-_cos(p1, z1) / 2 - _cos(p2, z2) / 2)) > 1e-3  # pairing the same view would differ


def test_stop_gradient_on_the_projections():
    """Every parameter's gradient is that of D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 computed by hand: without
    the stop-gradient, the projections' own gradient would be added (and the model collapses, Fig. 2)."""
    simsiam = _simsiam().double()  # float64: a random ResNet amplifies float32 rounding in its gradients
    batch = _batch()
    batch["views"] = [v.double() for v in batch["views"]]
    simsiam(batch)["loss"].backward()
    got = {n: p.grad.clone() for n, p in simsiam.named_parameters()}
    simsiam.zero_grad()
    x1, x2 = batch["views"]
    z1, z2 = simsiam.projector(simsiam.backbone(x1)), simsiam.projector(simsiam.backbone(x2))
    p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)
    (-_cos(p1, z2.detach()) / 2 - _cos(p2, z1.detach()) / 2).backward(retain_graph=True)
    for name, p in simsiam.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    simsiam.zero_grad()
    (-_cos(p1, z2) / 2 - _cos(p2, z1) / 2).backward()  # no stop-gradient: clearly other gradients
    w = "projector.mlp.0.weight"
    assert (got[w] - dict(simsiam.named_parameters())[w].grad).norm() > 0.05 * got[w].norm()


def test_extract_is_the_backbone():
    simsiam = _simsiam().eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(simsiam.extract(x), simsiam.backbone(x))


@pytest.mark.timeout(240)
def test_predictor_lr_stays_fixed_through_the_trainers_schedule_while_the_rest_decays(tmp_path):
    """algo.optimizer.paramwise.predictor.fixed_lr (MMSelfSup's SimSiamHook): through a real training with a
    warm-up and a cosine schedule, the predictor's groups keep the initial (batch-scaled) lr at every step,
    every other group follows warm-up + cosine to 0."""
    from selfsup.engine.schedules import scheduled_value
    from selfsup.engine.trainer import Trainer

    overrides = tiny("simsiam") + ["schedule.epochs=2", "schedule.warmup_epochs=1", "knn.enabled=false"]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    assert trainer.state.steps_per_epoch == 4
    names = {id(p): n for n, p in trainer.algo.named_parameters()}
    groups = trainer.optimizer.param_groups
    is_pred = [all(names[id(p)].startswith("predictor.") for p in g["params"]) for g in groups]
    assert [any(names[id(p)].startswith("predictor.") for p in g["params"]) for g in groups] == is_pred
    assert sum(is_pred) == 2 and len(groups) == 4  # predictor: with and without weight decay
    lr0 = trainer.lr
    assert lr0 == pytest.approx(0.05 * 16 / 256)
    seen: list[list[float]] = []
    after_step = trainer.algo.after_step

    def record(state):
        seen.append([g["lr"] for g in groups])
        return after_step(state)

    trainer.algo.after_step = record  # type: ignore[method-assign]
    trainer.fit()
    assert len(seen) == 8
    for step, lrs in enumerate(seen, start=1):  # the lr of the next step, set after each step
        factor = scheduled_value(step, 8, 1.0, 0.0, "cosine", 4, trainer.cfg.schedule.warmup_start_factor)
        for lr, pred in zip(lrs, is_pred, strict=True):
            assert lr == pytest.approx(lr0 if pred else lr0 * factor, abs=1e-12), (step, pred)
    assert seen[-1][is_pred.index(False)] == pytest.approx(0.0, abs=1e-12)  # the others decayed to 0
