"""DINO: head (weight-normalised last layer), multi-crop forward (one backbone pass per resolution, teacher on
the global crops only), the loss over pairs of different crops, the center (formula, raw teacher outputs, fp32
under bf16 autocast, all-reduced), the teacher temperature warm-up, last-layer freezing, the EMA teacher, the
ViT path with local crops at another resolution, 2 processes == 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.algorithms.dino import DINO, DINOHead, WeightNormLinear, vit_features
from selfsup.engine.optim import build_optimizer
from selfsup.engine.schedules import Policy, ScalarSchedule
from selfsup.engine.state import TrainState
from selfsup.losses.dino import DINOLoss
from selfsup.models.resnet import ResNet
from selfsup.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 24


def _dino(backbone: nn.Module | None = None, **kwargs) -> DINO:
    torch.manual_seed(0)
    kwargs = {"out_dim": K, "hidden_dim": 32, "bottleneck_dim": 8, "num_local_crops": 2, **kwargs}
    return DINO(backbone if backbone is not None else ResNet("resnet18"), **kwargs)


def _vit(drop_path_rate: float = 0.0) -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=drop_path_rate
    )


def _batch(n: int = 4, seed: int = 1, local: int = 16, num_local: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)]
    views += [torch.randn(n, 3, local, local, generator=g) for _ in range(num_local)]
    return {"views": views, "index": torch.arange(n)}


# ------------------------------------------------------------------------------------------------ the head


def test_head_is_a_3_layer_mlp_an_l2_normalised_bottleneck_and_a_weight_normalised_last_layer():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=K, hidden_dim=32, bottleneck_dim=8)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    last = head.last_layer
    assert last.weight_v.shape == (K, 8) and torch.equal(last.weight_g, torch.ones(K, 1))
    assert not last.weight_g.requires_grad and last.weight_v.requires_grad  # norm_last_layer
    x = torch.randn(5, 16)
    z = F.normalize(head.mlp(x), dim=1)
    w = last.weight_v / last.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), z @ w.T)
    assert DINOHead(16, K, 32, 8, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_weight_norm_linear_equals_torch_weight_norm():
    layer = WeightNormLinear(6, 5)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    ref = nn.Linear(6, 5, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref, dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(layer.weight_g)
        ref.parametrizations.weight.original1.copy_(layer.weight_v)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), ref(x))


# ------------------------------------------------------------------------------------------- the forward pass


def test_teacher_is_a_frozen_copy_without_stochastic_depth():
    model = _dino(_vit(drop_path_rate=0.5))
    student = dict(model.student().named_parameters())
    teacher = dict(model.teacher.module.named_parameters())
    assert student.keys() == teacher.keys() and all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in teacher.values())
    drops = [m.p for m in model.backbone.modules() if type(m).__name__ == "StochasticDepth"]
    teacher_drops = [m.p for m in model.teacher.modules() if type(m).__name__ == "StochasticDepth"]
    assert drops and all(p > 0 for p in drops) and all(p == 0.0 for p in teacher_drops)
    model.train()  # in train mode the teacher's output is deterministic
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.teacher(x), model.teacher(x))
    buffers = {"center", "teacher_temp_value"}
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head", "teacher", *buffers}


def test_backbone_runs_once_per_resolution_and_the_teacher_sees_the_global_crops_only():
    model = _dino(num_local_crops=3)
    calls: list[tuple[str, tuple]] = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(("student", tuple(i[0].shape))))
    model.teacher.module[0].register_forward_hook(lambda m, i, o: calls.append(("teacher", tuple(i[0].shape))))
    model(_batch(n=4, num_local=3))
    assert sorted(calls) == [("student", (8, 3, 32, 32)), ("student", (12, 3, 16, 16)), ("teacher", (8, 3, 32, 32))]


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_loss_is_dino_loss_over_the_crops_and_the_center_follows_the_raw_teacher_outputs(backbone):
    model = _dino(_vit() if backbone == "vit" else None)
    with torch.no_grad():
        model.center.normal_()  # a non-zero center, so that centring matters
        model.teacher_temp_value.fill_(0.05)
        for p in model.teacher.parameters():  # a teacher unlike the student (as after some EMA steps)
            p.add_(0.05 * torch.randn_like(p))
    center = model.center.clone()
    batch = _batch()
    loss = model(batch)["loss"]
    views = batch["views"]
    with torch.no_grad():  # the same forward passes by hand
        if backbone == "vit":
            feats = [
                vit_features(model.backbone, torch.cat(views[:2])),
                vit_features(model.backbone, torch.cat(views[2:])),
            ]
        else:
            feats = [model.backbone(torch.cat(views[:2])), model.backbone(torch.cat(views[2:]))]
        student = model.head(torch.cat(feats)).chunk(4)
        teacher = model.teacher(torch.cat(views[:2]))
    expected = DINOLoss(0.1)(list(student), list(teacher.chunk(2)), center, 0.05)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # C <- 0.9 C + 0.1 * mean of the teacher outputs *before* centring, over both global crops
    torch.testing.assert_close(model.center, 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True))
    student_global = torch.cat(student[:2]).mean(dim=0)  # the student's outputs would give another center
    assert (student_global - teacher.mean(dim=0)).abs().max() > 1e-2
    centred = 0.9 * center + 0.1 * (teacher - center).mean(dim=0, keepdim=True)
    assert (model.center - centred).abs().max() > 1e-3


def test_center_is_not_updated_in_eval_mode_and_local_crops_do_not_move_it():
    model = _dino()
    model.eval()
    before = model.center.clone()
    with torch.no_grad():
        model(_batch())
    assert torch.equal(model.center, before)
    model.train()
    a, b = _dino(), _dino()
    batch = _batch()
    other = {**batch, "views": batch["views"][:2] + [torch.randn_like(v) for v in batch["views"][2:]]}
    a(batch)
    b(other)
    assert torch.equal(a.center, b.center) and not torch.equal(a.center, before)


def test_center_update_under_bf16_autocast_equals_float32():
    """The center averages teacher outputs that autocast gives in bf16: the average must be taken in float32
    (a bf16 sum of 2 x 64 rows rounds the mean to ~3 digits)."""
    model = _dino(out_dim=256)
    gen = torch.Generator().manual_seed(0)
    teacher = (3.0 + torch.randn(128, 256, generator=gen)).to(torch.bfloat16)
    reference = _dino(out_dim=256)
    with torch.no_grad():
        for m in (model, reference):
            m.center.copy_(torch.randn(1, 256, generator=torch.Generator().manual_seed(1)))
    reference.update_center(teacher.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.update_center(teacher)
    assert model.center.dtype == torch.float32
    assert torch.equal(model.center, reference.center)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a bf16 average would give
        bf16_mean = teacher.sum(dim=0, keepdim=True) / 128
    assert (bf16_mean.float() - teacher.float().mean(dim=0, keepdim=True)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- schedules


def test_teacher_temperature_warms_up_from_0_04_to_0_07_over_30_epochs():
    """Epoch 0: 0.04, epoch 15: 0.055, epoch 30 and later: 0.07 (linear per step, then constant)."""
    model = _dino()
    assert model.teacher_temp_value.item() == pytest.approx(0.04)
    values = {}
    for epoch in (0, 15, 30, 40):
        state = TrainState(epoch=epoch, step=epoch * 10, steps_per_epoch=10, epochs=100)
        values[epoch] = model.after_step(state)["teacher_temp"]  # the value for the next step
        assert model.teacher_temp_value.item() == pytest.approx(values[epoch])
    assert values == pytest.approx({0: 0.04, 15: 0.055, 30: 0.07, 40: 0.07})

    class Ctx:
        state = TrainState(epoch=15, step=150, steps_per_epoch=10, epochs=100)

    model.on_epoch_start(Ctx())  # a resumed run sets it from where training stands
    assert model.teacher_temp_value.item() == pytest.approx(0.055)


def test_the_forward_pass_uses_the_scheduled_teacher_temperature():
    model = _dino(teacher_temp=ScalarSchedule(start=0.5, policy=Policy.constant))
    ref = _dino(teacher_temp=ScalarSchedule(start=0.04, policy=Policy.constant))
    batch = _batch()
    assert model(batch)["loss"].item() != pytest.approx(ref(batch)["loss"].item(), rel=1e-3)


def test_after_step_applies_the_cosine_ema_to_the_teacher():
    model = _dino(momentum=ScalarSchedule(start=0.9, end=1.0))
    with torch.no_grad():
        for p in model.student().parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {k: v.clone() for k, v in model.teacher.module.named_parameters()}
    student = {k: v.clone() for k, v in model.student().named_parameters()}
    out = model.after_step(TrainState(step=3, steps_per_epoch=10, epochs=1))
    m = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert out["momentum"] == pytest.approx(m)
    for k, v in model.teacher.module.named_parameters():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * student[k], atol=1e-6, rtol=0)


def test_last_layer_gets_no_gradient_and_no_update_in_the_first_epoch():
    model = _dino(norm_last_layer=False)
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-2, "weight_decay": 0.04}, 1e-2)
    last = model.head.last_layer
    for epoch in (0, 1):
        v, g = last.weight_v.clone(), last.weight_g.clone()
        opt.zero_grad()
        model(_batch(seed=epoch))["loss"].backward()
        assert last.weight_v.grad is not None and last.weight_v.grad.abs().sum() > 0
        model.before_optimizer_step(TrainState(epoch=epoch, step=epoch * 5, steps_per_epoch=5, epochs=3))
        opt.step()
        if epoch == 0:  # no gradient: AdamW leaves it alone (no weight decay either), as the official p.grad = None
            assert last.weight_v.grad is None and last.weight_g.grad is None
            assert torch.equal(last.weight_v, v) and torch.equal(last.weight_g, g)
            assert model.head.mlp[0].weight.grad.abs().sum() > 0  # the rest trains
        else:
            assert last.weight_v.grad.abs().sum() > 0 and last.weight_g.grad.abs().sum() > 0
            assert not torch.equal(last.weight_v, v) and not torch.equal(last.weight_g, g)


# ----------------------------------------------------------------------------------------------- ViT crops


def test_vit_features_at_the_own_size_are_the_vit_and_other_sizes_interpolate_positions():
    torch.manual_seed(0)
    vit = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit_features(vit, x), vit(x))
        small = vit_features(vit, torch.randn(2, 3, 16, 16))
        # by hand: the 4 x 4 grid of positions resized to 2 x 2 (bicubic), CLS token, blocks, norm of CLS
        pos = vit.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(2, 2), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        y = torch.randn(2, 3, 16, 16, generator=None)
    assert small.shape == (2, 32)
    with torch.no_grad():
        tokens = vit.patch_embed(y).flatten(2).transpose(1, 2) + pos
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
        want = vit.norm(vit.blocks(torch.cat([cls, tokens], dim=1))[:, 0])
        torch.testing.assert_close(vit_features(vit, y), want)


def test_vit_crop_that_the_patch_size_does_not_divide_is_one_clear_error():
    from selfsup.errors import ConfigError

    model = _dino(_vit())
    with pytest.raises(ConfigError, match="12x12 crop, which the ViT's patch size 8 does not divide"):
        model(_batch(local=12))


def test_bad_hyper_parameters_are_one_clear_error():
    from selfsup.errors import ConfigError

    with pytest.raises(ConfigError, match="center_momentum must be in"):
        _dino(center_momentum=1.5)
    with pytest.raises(ConfigError, match="num_local_crops must be >= 0"):
        _dino(num_local_crops=-1)
    assert _dino(num_local_crops=0).num_views == 2 and _dino().num_views == 4


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one():
    """The center averages the teacher outputs of the global batch (all-reduce) and the BatchNorms are
    synchronised: 2 x 4 images train like 1 x 8, the center included."""
    from ranks import check_algorithm_ranks

    one = check_algorithm_ranks("dino", ["algo.model.freeze_last_layer=0"], global_batch=8, steps=3, sync_bn=True)
    assert one["state"]["center"].abs().sum() > 0
