"""MoCo v1/v2: the momentum key encoder (official order, once per optimizer step), the queue, shuffling BN
and its one-process emulation (SplitBatchNorm), bf16, the recipes, and 2 processes == 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.algorithms.moco import MoCo, MoCoV2Neck
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.models.resnet import ResNet
from selfsup.models.split_batchnorm import SplitBatchNorm, convert_split_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    kwargs = {"out_dim": 16, "queue_size": 32, **kwargs}
    return MoCo(ResNet("resnet18", stem="imagenet"), **kwargs)


def _batch(n: int = 8, seed: int = 1, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, size, size, generator=g) for _ in range(2)], "index": torch.arange(n)}


def _step(model, batch, step: int) -> dict:
    out = model(batch)
    out["loss"].backward()
    model.after_step(TrainState(step=step, steps_per_epoch=10, epochs=1))
    return out


def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy whose SplitBatchNorms normalise the whole batch (plain BatchNorm)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, SplitBatchNorm):
            m.num_splits = 1
    return out


# ---------------------------------------------------------------- encoders


def test_heads_and_state():
    v1, v2 = _moco(), _moco(neck="mlp", hidden_dim=24)
    assert isinstance(v1.neck, nn.Linear) and (v1.neck.in_features, v1.neck.out_features) == (512, 16)
    layers = [type(m) for m in v2.neck.mlp]
    assert isinstance(v2.neck, MoCoV2Neck) and layers == [nn.Linear, nn.ReLU, nn.Linear]  # no BN (MoCoV2Neck)
    assert v2.neck.mlp[0].bias is not None and v2.neck.mlp[0].out_features == 24
    assert {k.split(".")[0] for k in v1.state_dict()} == {"backbone", "neck", "key_encoder", "queue"}
    assert v1.queue.features.shape == (32, 16) and v1.loss_fn.temperature == 0.07 and v1.momentum == 0.999


def test_key_encoder_is_a_frozen_copy_that_gets_no_gradient():
    moco = _moco()
    query = dict(moco.query_encoder().named_parameters())
    key = dict(moco.key_encoder.module.named_parameters())
    assert query.keys() == key.keys() and all(torch.equal(query[n], key[n]) for n in query)
    assert not any(p.requires_grad for p in key.values())
    moco(_batch())["loss"].backward()
    assert all(p.grad is None for p in key.values())
    assert all(p.grad is not None for p in query.values())


def test_momentum_update_runs_once_per_step_before_the_keys():
    """Official order: after_step marks the update, the next forward applies it before computing keys:
    key <- m key + (1 - m) query (m weighs the key). A second forward of the same step (gradient
    accumulation) does not apply it again."""
    moco = _moco(momentum=0.9)
    _step(moco, _batch(), 1)
    with torch.no_grad():  # the optimizer's step
        for p in moco.query_encoder().parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.clone() for n, p in moco.key_encoder.module.named_parameters()}
    query = {n: p.clone() for n, p in moco.query_encoder().named_parameters()}
    moco.after_step(TrainState(step=2, steps_per_epoch=10, epochs=1))
    assert all(torch.equal(p, before[n]) for n, p in moco.key_encoder.module.named_parameters())  # not yet
    moco(_batch(seed=2))
    for n, p in moco.key_encoder.module.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * query[n], atol=1e-6, rtol=0)
    once = {n: p.clone() for n, p in moco.key_encoder.module.named_parameters()}
    moco(_batch(seed=3))  # the next micro-batch of the same optimizer step
    assert all(torch.equal(p, once[n]) for n, p in moco.key_encoder.module.named_parameters())


def test_keys_of_a_step_come_from_the_updated_key_encoder():
    """The keys enqueued at a step are those of the key encoder after that step's update (official order)."""
    moco = _moco(momentum=0.5)
    _step(moco, _batch(), 1)
    with torch.no_grad():
        for p in moco.query_encoder().parameters():
            p.mul_(1.5)
    moco.after_step(TrainState(step=2, steps_per_epoch=10, epochs=1))
    batch = _batch(seed=4)
    moco(batch)
    with torch.no_grad():
        expected = F.normalize(moco.key_encoder(batch["views"][1]), dim=1)
    torch.testing.assert_close(moco.queue.features[8:16], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- queue and loss


def test_loss_uses_the_queue_of_older_keys_then_enqueues_the_new_ones_in_batch_order():
    moco = _moco()
    _step(moco, _batch(), 1)
    old_queue = moco.queue.features.clone()
    batch = _batch(seed=5)
    out = moco(batch)
    x_q, x_k = batch["views"]
    with torch.no_grad():
        q = F.normalize(moco.neck(moco.backbone(x_q)), dim=1)
        k = F.normalize(moco.key_encoder(x_k), dim=1)  # plain BN: the shuffle changes nothing but rounding
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ old_queue.T], 1) / 0.07  # MoCo Algorithm 1
    expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    torch.testing.assert_close(moco.queue.features[8:16], k, atol=1e-5, rtol=0)  # row i = image i's key
    torch.testing.assert_close(moco.queue.features[16:], old_queue[16:], atol=0, rtol=0)
    assert int(moco.queue.ptr) == 16


def test_queue_keeps_the_newest_keys_and_wraps_around():
    moco = _moco(queue_size=20)
    keys = []
    for s in range(3):
        batch = _batch(seed=10 + s)
        moco(batch)
        with torch.no_grad():
            keys.append(F.normalize(moco.key_encoder(batch["views"][1]), dim=1))
        moco.after_step(TrainState(step=s + 1, steps_per_epoch=10, epochs=1))
    stream = torch.cat(keys)  # 24 keys in global order: the last 20 remain, slot = position mod 20
    assert int(moco.queue.ptr) == 4
    torch.testing.assert_close(moco.queue.features[4:], stream[4:20], atol=1e-5, rtol=0)
    torch.testing.assert_close(moco.queue.features[:4], stream[20:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- shuffling BN and its one-process emulation


def test_shuffled_keys_belong_to_the_right_images():
    """bn_splits=2: the keys are computed on the shuffled batch, BatchNorm per group of 4 shuffled images (what
    2 GPUs compute), and put back: row i of the new queue rows is image i's key."""
    moco = _moco(bn_splits=2)
    batch = _batch()
    torch.manual_seed(7)
    moco(batch)
    torch.manual_seed(7)
    perm = torch.randperm(8)  # the permutation batch_shuffle drew
    key = _plain_copy(moco.key_encoder.module)
    x_k = batch["views"][1]
    expected = torch.empty(8, 16)
    with torch.no_grad():
        for group in perm.view(2, 4):
            expected[group] = F.normalize(key(x_k[group]), dim=1)
    torch.testing.assert_close(moco.queue.features[:8], expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # without the shuffle the groups would be rows 0-3 and 4-7: other keys
        unshuffled = torch.cat([F.normalize(key(x_k[g]), dim=1) for g in torch.arange(8).view(2, 4)])
    assert (unshuffled - expected).abs().max() > 1e-2


def test_split_batchnorm_is_batchnorm_on_each_group():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    split = convert_split_batchnorm(copy.deepcopy(bn), 2)
    assert isinstance(split, SplitBatchNorm) and split.state_dict().keys() == bn.state_dict().keys()
    halves = [copy.deepcopy(bn), copy.deepcopy(bn)]
    x = torch.randn(8, 3, 4, 4) * 3 + torch.arange(8.0).view(8, 1, 1, 1)  # the halves have other statistics
    xs, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(8, 3, 4, 4)
    y = split(xs)
    (y * w).sum().backward()
    yh = torch.cat([halves[0](xh[:4]), halves[1](xh[4:])])
    (yh * w).sum().backward()
    torch.testing.assert_close(y, yh, atol=1e-5, rtol=0)
    torch.testing.assert_close(xs.grad, xh.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.weight.grad, halves[0].weight.grad + halves[1].weight.grad, atol=1e-4, rtol=0)
    # running statistics: the mean of the two devices' updates; one count per forward
    torch.testing.assert_close(split.running_mean, (halves[0].running_mean + halves[1].running_mean) / 2)
    torch.testing.assert_close(split.running_var, (halves[0].running_var + halves[1].running_var) / 2)
    assert int(split.num_batches_tracked) == 1
    whole = copy.deepcopy(bn)(x)  # one BatchNorm over all 8 is something else
    assert (whole - yh).abs().max() > 0.1
    split.eval(), bn.eval()
    bn.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), bn(x))  # eval: the running statistics, no split


def test_split_batchnorm_on_1d_input_and_uneven_batches():
    split = SplitBatchNorm(5, num_splits=2)
    x = torch.randn(6, 5)
    y = split(x)
    ref = nn.BatchNorm1d(5)
    torch.testing.assert_close(y[3:], ref(x[3:]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_splits=2 needs a batch divisible by 2, got 5 samples"):
        split(torch.randn(5, 5))
    with pytest.raises(ConfigError, match="num_splits >= 1"):
        SplitBatchNorm(5, num_splits=0)


def test_bn_splits_converts_both_encoders():
    moco = _moco(bn_splits=2)
    for module in (moco.backbone, moco.key_encoder.module):
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, SplitBatchNorm) and m.num_splits == 2 for m in bns)
    assert moco.state_dict().keys() == _moco().state_dict().keys()
    with pytest.raises(ConfigError, match="bn_splits=2 needs a per-process batch divisible by it, got 7"):
        moco(_batch(n=7))


# ---------------------------------------------------------------- precision, options, recipes


def test_queue_under_bf16_autocast_holds_the_float32_normalised_keys():
    """Under bf16 autocast the key encoder's output is bf16; the queue stores its float32 normalisation (a
    bf16 normalisation would be off by ~1e-3), the same slots as in float32, close to the float32 run."""
    fp32, bf16 = _moco(), _moco()
    batch = _batch()
    torch.manual_seed(3)
    fp32(batch)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16(batch)
        torch.manual_seed(3)
        perm = torch.randperm(8)
        raw = bf16.key_encoder(batch["views"][1][perm])[torch.argsort(perm)]
    assert raw.dtype == torch.bfloat16 and bf16.queue.features.dtype == torch.float32
    expected = F.normalize(raw.float(), dim=1)
    torch.testing.assert_close(bf16.queue.features[:8], expected, atol=1e-7, rtol=0)
    assert (F.normalize(raw, dim=1).float() - expected).abs().max() > 1e-4  # what bf16 normalisation would store
    assert int(bf16.queue.ptr) == int(fp32.queue.ptr) == 8
    assert (bf16.queue.features - fp32.queue.features).abs().max() < 0.05
    torch.testing.assert_close(bf16.queue.features[8:], fp32.queue.features[8:], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neck": "conv"}, "neck='conv' must be 'linear'"),
        ({"bn_splits": 0}, "bn_splits >= 1"),
        ({"queue_size": 0}, "queue_size >= 1"),
        ({"momentum": 1.5}, r"momentum in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be a number > 0"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        _moco(**kwargs)


def test_extract_uses_the_query_backbone():
    moco = _moco().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(moco.extract(x), moco.backbone(x))


def test_works_with_a_vit_backbone():
    from selfsup.models.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    moco = MoCo(vit, neck="mlp", hidden_dim=32, out_dim=16, queue_size=16, temperature=0.2)
    out = moco(_batch(n=4))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and int(moco.queue.ptr) == 4


def test_recipes():
    from conftest import compose_cfg

    v1 = compose_cfg(["experiment=mocov1_resnet50_8xb32-steplr-200e_in1k", "dataset.root=/x"])
    v2 = compose_cfg(["experiment=mocov2_resnet50_8xb32-coslr-200e_in1k", "dataset.root=/x"])
    assert (v1.algo.model.neck, v1.algo.model.temperature, v2.algo.model.neck, v2.algo.model.temperature) == (
        "linear",
        0.07,
        "mlp",
        0.2,
    )
    assert (v1.schedule.policy, list(v1.schedule.milestones), v1.schedule.gamma) == ("step", [120, 160], 0.1)
    assert (v2.schedule.policy, v2.schedule.warmup_epochs, v1.schedule.warmup_epochs) == ("cosine", 0, 0)
    for cfg in (v1, v2):
        assert (cfg.algo.optimizer.name, cfg.algo.optimizer.lr, cfg.algo.optimizer.weight_decay) == ("sgd", 0.03, 1e-4)
        assert (cfg.schedule.batch_size, cfg.schedule.epochs, cfg.algo.optimizer.base_batch_size) == (32, 200, 256)
        assert (cfg.algo.model.queue_size, cfg.algo.model.momentum, cfg.sync_bn) == (65536, 0.999, False)
        view = cfg.algo.views[0]
        assert (view.copies, list(view.crop_scale), view.grayscale, view.hflip) == (2, [0.2, 1.0], 0.2, 0.5)
    keys = ("color_jitter", "brightness", "contrast", "saturation", "hue", "blur")
    assert [v1.algo.views[0][k] for k in keys] == [1.0, 0.4, 0.4, 0.4, 0.4, 0.0]  # jitter always, hue 0.4
    assert [v2.algo.views[0][k] for k in keys] == [0.8, 0.4, 0.4, 0.4, 0.1, 0.5]  # p=0.8, hue 0.1, blur


# ---------------------------------------------------------------- 2 processes == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["mocov1", "mocov2"])
def test_two_processes_with_sync_bn_equal_one(name):
    """SyncBN: the shuffle is invisible, but the key gather, the permutation drawn for the global batch, the
    unshuffle and the queue's global order must agree (queue_size 12: the third step wraps around)."""
    check_algorithm_ranks = pytest.importorskip("ranks").check_algorithm_ranks
    one = check_algorithm_ranks(name, overrides=["algo.model.queue_size=12"], global_batch=8, steps=3, sync_bn=True)
    assert int(one["state"]["queue.ptr"]) == 24 % 12


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_with_per_device_bn_equal_one_with_bn_splits():
    """Shuffling BN as it runs on 2 GPUs (per-device BatchNorm, sync_bn=false) == one process with bn_splits=2."""
    check_algorithm_ranks = pytest.importorskip("ranks").check_algorithm_ranks
    check_algorithm_ranks(
        "mocov2", one_process_overrides=["algo.model.bn_splits=2"], global_batch=8, steps=3, sync_bn=False
    )
