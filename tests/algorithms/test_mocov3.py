"""MoCo v3: the MLPs of the official code for ResNet and ViT, the symmetric contrastive loss with the 2T factor,
the cosine momentum schedule, the frozen random patch projection of a ViT, 2 processes == 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.algorithms.mocov3 import MoCoV3
from selfsup.engine.optim import build_optimizer
from selfsup.engine.schedules import ScalarSchedule
from selfsup.engine.state import TrainState
from selfsup.models.resnet import ResNet
from selfsup.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet_mocov3(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(ResNet("resnet18"), hidden_dim=32, out_dim=16, **kwargs)


def _vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _vit_mocov3(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(_vit(), hidden_dim=32, out_dim=16, **kwargs)


def _batch(n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], "index": torch.arange(n)}


def _layers(mlp: nn.Module) -> list[str]:
    """The MLP as a list of 'Linear(bias)', 'BN(affine)', 'ReLU'."""
    out = []
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            out.append(f"Linear{m.in_features}-{m.out_features}" + ("+b" if m.bias is not None else ""))
        elif isinstance(m, nn.BatchNorm1d):
            out.append("BN" + ("+affine" if m.affine else ""))
        elif isinstance(m, nn.ReLU):
            out.append("ReLU")
    return out


def test_resnet_mlps_are_the_official_ones():
    """Official MoCo_ResNet: projector _build_mlp(2, 512, 4096, 256) with the last BN without affine, predictor
    _build_mlp(2, 256, 4096, 256, last_bn=False); no Linear has a bias; T = 1.0."""
    model = _resnet_mocov3()
    assert _layers(model.projector) == ["Linear512-32", "BN+affine", "ReLU", "Linear32-16", "BN"]
    assert _layers(model.predictor) == ["Linear16-32", "BN+affine", "ReLU", "Linear32-16"]
    assert model.temperature == 1.0 and model.loss_fn.temperature == 1.0


def test_vit_mlps_and_temperature_are_the_official_ones():
    """Official MoCo_ViT: 3-layer projector, predictor with the last BN (no affine); the paper's T = 0.2."""
    model = _vit_mocov3()
    assert _layers(model.projector) == [
        "Linear32-32", "BN+affine", "ReLU", "Linear32-32", "BN+affine", "ReLU", "Linear32-16", "BN",
    ]  # fmt: skip
    assert _layers(model.predictor) == ["Linear16-32", "BN+affine", "ReLU", "Linear32-16", "BN"]
    assert model.temperature == 0.2
    explicit = _vit_mocov3(projector_layers=2, predictor_last_bn=False, temperature=0.5)
    assert len(_layers(explicit.projector)) == 5 and _layers(explicit.predictor)[-1] == "Linear32-16"
    assert explicit.loss_fn.temperature == 0.5


def test_momentum_encoder_is_a_frozen_copy_of_backbone_and_projector():
    model = _resnet_mocov3()
    base = dict(model.online().named_parameters())
    momentum = dict(model.target.module.named_parameters())
    assert base.keys() == momentum.keys() and all(torch.equal(base[k], momentum[k]) for k in base)
    assert not any(p.requires_grad for p in momentum.values())
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "projector", "predictor", "target"}


@pytest.mark.parametrize("make", [_resnet_mocov3, _vit_mocov3], ids=["resnet", "vit"])
def test_loss_is_the_symmetric_contrastive_loss_with_keys_of_the_other_view(make):
    model = make()
    batch = _batch()
    torch.manual_seed(5)
    loss = model(batch)["loss"]
    x1, x2 = batch["views"]
    with torch.no_grad():  # the same forward passes (train mode: batch statistics), by hand
        q1 = model.predictor(model.projector(model.backbone(x1)))
        q2 = model.predictor(model.projector(model.backbone(x2)))
        k1, k2 = model.target(x1), model.target(x2)
    t = model.temperature

    def ctr(q, k):  # 2T * CE(q k^T / T, arange(n)), from the paper's Algorithm 1
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
        log_p = logits.double().log_softmax(dim=1)
        return -log_p.diagonal().mean() * 2 * t

    expected = ctr(q1, k2) + ctr(q2, k1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected - (ctr(q1, k1) + ctr(q2, k2))) > 1e-4  # keys of the same view would differ


def test_gradients_reach_the_base_encoder_and_predictor_only():
    model = _resnet_mocov3()
    model(_batch())["loss"].backward()
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())
    assert model.backbone.conv1.weight.grad is not None
    assert all(p.grad is None for p in model.target.parameters())


@pytest.mark.parametrize("m0", [0.99, 0.996])
def test_after_step_applies_the_cosine_momentum(m0):
    """f_k <- m f_k + (1 - m) f_q after step k with m = 1 - (1 - m0)(cos(pi k / K) + 1) / 2 (official
    adjust_moco_momentum, per iteration); m = m0 at the start and 1 at the end."""
    model = _resnet_mocov3(momentum=ScalarSchedule(start=m0, end=1.0))
    with torch.no_grad():  # move the base encoder away from the momentum encoder
        for p in model.online().parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {k: v.clone() for k, v in model.target.module.named_parameters()}
    base = {k: v.clone() for k, v in model.online().named_parameters()}
    out = model.after_step(TrainState(step=30, steps_per_epoch=10, epochs=10))
    m = 1 - (1 - m0) * (math.cos(math.pi * 30 / 100) + 1) / 2
    assert out == {"momentum": pytest.approx(m)}
    for k, v in model.target.module.named_parameters():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * base[k], atol=1e-6, rtol=0)
    state = TrainState(steps_per_epoch=10, epochs=10)
    assert model.momentum(state) == pytest.approx(m0)
    state.step = 100
    assert model.momentum(state) == 1.0


def test_vit_patch_projection_stays_random():
    """Sec. 4.2: the patch embedding gets no gradient and no update (requires_grad False, so the optimizer never
    holds it), while the rest of the ViT trains."""
    model = _vit_mocov3()
    patch = model.backbone.patch_embed
    assert not patch.weight.requires_grad and not patch.bias.requires_grad
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}, 1e-2)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(patch.weight) not in held and id(patch.bias) not in held
    before = patch.weight.clone(), patch.bias.clone()
    block_before = model.backbone.blocks[0].attn.qkv.weight.clone()
    for step in range(2):
        opt.zero_grad()
        model(_batch(seed=step))["loss"].backward()
        assert patch.weight.grad is None and patch.bias.grad is None
        opt.step()
        model.after_step(TrainState(step=step + 1, steps_per_epoch=2, epochs=1))
    assert torch.equal(patch.weight, before[0]) and torch.equal(patch.bias, before[1])
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, block_before)
    momentum_patch = model.target.module[0].patch_embed
    torch.testing.assert_close(momentum_patch.weight, before[0], atol=1e-7, rtol=0)  # EMA of a constant
    trainable = _vit_mocov3(freeze_patch_embed=False)
    assert trainable.backbone.patch_embed.weight.requires_grad


def test_extract_uses_the_base_backbone():
    model = _resnet_mocov3().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.extract(x), model.backbone(x))


def test_bad_hyper_parameters_are_one_clear_error():
    from selfsup.errors import ConfigError

    with pytest.raises(ConfigError, match="projector_layers must be >= 1"):
        _resnet_mocov3(projector_layers=0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        _resnet_mocov3(temperature=0.0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one():
    """Keys gathered from both ranks (labels offset by rank) and SyncBN in the MLPs and the ResNet: 2 x 4 images
    train like 1 x 8. Two steps: with a third, a relative change of 1e-7 in the initial weights alone moves some
    last-step gradients of the (zero-init-residual) ResNet by up to 1.5% in one process, above the harness's 1%."""
    from ranks import check_algorithm_ranks

    check_algorithm_ranks("mocov3", global_batch=8, steps=2, sync_bn=True)
