"""DenseCL: the dense correspondence (backbone features, float32), the two losses and their weight lambda
(0 before lambda_start_iters), the two queues, the recipe, and 2 processes == 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfsup.algorithms.densecl import DenseCL, DenseCLNeck, dense_correspondence
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.models.resnet import ResNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _densecl(stem: str = "cifar", **kwargs) -> DenseCL:
    torch.manual_seed(0)
    kwargs = {"hidden_dim": 32, "out_dim": 16, "queue_size": 32, **kwargs}
    return DenseCL(ResNet("resnet18", stem=stem), **kwargs)  # cifar stem: 32 px -> a 4 x 4 feature map


def _batch(n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], "index": torch.arange(n)}


def _after(model, step: int) -> None:
    model.after_step(TrainState(step=step, steps_per_epoch=10, epochs=1))


def _argmax_of_cosines(qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
    """By hand, in float64: for each image n and query location i, the key location j of the largest cosine."""
    n, _, length = qf.shape
    out = torch.empty(n, length, dtype=torch.long)
    for b in range(n):
        for i in range(length):
            q = qf[b, :, i].double()
            cos = [float(q @ kf[b, :, j].double() / (q.norm() * kf[b, :, j].double().norm())) for j in range(length)]
            out[b, i] = max(range(length), key=cos.__getitem__)
    return out


def test_dense_correspondence_is_the_argmax_of_cosine_similarity():
    torch.manual_seed(0)
    qf = torch.randn(3, 8, 6)
    kf = torch.randn(3, 8, 6) * torch.rand(1, 1, 6) * 10  # per-location scales: cosine, not dot product
    assert torch.equal(dense_correspondence(qf, kf), _argmax_of_cosines(qf, kf))
    dot = torch.bmm(qf.transpose(1, 2), kf).argmax(2)
    assert not torch.equal(dot, _argmax_of_cosines(qf, kf))  # (an unnormalised key would pick other locations)
    with pytest.raises(ValueError, match=r"two \[N, C, L\] feature tensors of the same shape"):
        dense_correspondence(qf, kf[:, :, :5])


def test_dense_correspondence_under_bf16_autocast_equals_float32():
    """bf16 features of many near-equal similarities: the correspondence under autocast is the float32 one on the
    same values (a bf16 similarity matrix rounds near-ties together and picks other locations)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        qf = F.relu(lin(torch.randn(4, 49, 32))).transpose(1, 2)  # [4, 256, 49] bf16, post-ReLU like a ResNet map
        kf = F.relu(lin(torch.randn(4, 49, 32))).transpose(1, 2)
        assert qf.dtype == torch.bfloat16
        match = dense_correspondence(qf, kf)
        in_bf16 = torch.bmm(F.normalize(qf, dim=1).transpose(1, 2), F.normalize(kf, dim=1)).argmax(2)
    expected = dense_correspondence(qf.float(), kf.float())
    assert torch.equal(match, expected)
    assert torch.equal(expected, _argmax_of_cosines(qf.float(), kf.float()))
    assert not torch.equal(in_bf16, expected)


def test_neck_gives_global_dense_and_mean_dense_projections():
    neck = DenseCLNeck(8, 12, 5)
    fmap = torch.randn(2, 8, 3, 3)
    g, dense, mean = neck(fmap)
    assert (g.shape, dense.shape, mean.shape) == ((2, 5), (2, 5, 9), (2, 5))
    pooled = fmap.mean(dim=(2, 3))
    torch.testing.assert_close(g, neck.global_mlp(pooled))
    w1, b1 = neck.dense_mlp[0].weight[:, :, 0, 0], neck.dense_mlp[0].bias
    w2, b2 = neck.dense_mlp[2].weight[:, :, 0, 0], neck.dense_mlp[2].bias
    hidden = F.relu(torch.einsum("hc,ncl->nhl", w1, fmap.flatten(2)) + b1[:, None])  # 1x1 conv = per location
    by_location = torch.einsum("oc,ncl->nol", w2, hidden)
    torch.testing.assert_close(dense, by_location + b2[:, None], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, dense.mean(2))


def test_losses_queues_and_correspondence_follow_the_paper():
    """Recomputed by hand from the encoders after the step's momentum update: the dense positives are the key
    projections at the locations of most similar *backbone* features, both losses use the queues as they were
    before the step, and the queues receive k and the normalised mean dense key."""
    model = _densecl(lambda_start_iters=0)
    model(_batch(seed=9))
    _after(model, 1)
    global_queue, dense_queue = model.global_queue.features.clone(), model.dense_queue.features.clone()
    batch = _batch(seed=2)
    torch.manual_seed(5)
    out = model(batch)
    torch.manual_seed(5)
    perm = torch.randperm(4)
    undo = torch.argsort(perm)
    x_q, x_k = batch["views"]
    key_backbone, key_neck = model.key_encoder.module
    with torch.no_grad():
        fq = model.backbone.forward_stages(x_q)[-1]
        q, rq, _ = model.neck(fq)
        fk = key_backbone.forward_stages(x_k[perm])[-1][undo]
        k, rk, k2 = key_neck(fk)
    q, rq, k, rk = F.normalize(q, dim=1), F.normalize(rq, dim=1), F.normalize(k, dim=1), F.normalize(rk, dim=1)
    match = _argmax_of_cosines(fq.flatten(2), fk.flatten(2))
    by_projection = _argmax_of_cosines(rq, rk)
    assert not torch.equal(match, by_projection)  # matching on the projections would pick other positives

    def infonce(qs, ks, negs):
        logits = torch.cat([(qs * ks).sum(1, keepdim=True), qs @ negs.T], 1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(qs), dtype=torch.long)).item()

    positives = torch.stack([rk[b][:, match[b]] for b in range(4)])  # [4, 16, 16]: key at the matched location
    dense = infonce(rq.transpose(1, 2).reshape(-1, 16), positives.transpose(1, 2).reshape(-1, 16), dense_queue)
    single = infonce(q, k, global_queue)
    assert out["loss_dense"].item() == pytest.approx(dense, rel=1e-4)
    assert out["loss_global"].item() == pytest.approx(single, rel=1e-4)
    assert out["loss"].item() == pytest.approx(0.5 * single + 0.5 * dense, rel=1e-4)
    torch.testing.assert_close(model.global_queue.features[4:8], k, atol=1e-5, rtol=0)
    k2_expected = F.normalize(k2, dim=1)  # the normalised mean of the raw dense keys
    torch.testing.assert_close(model.dense_queue.features[4:8], k2_expected, atol=1e-5, rtol=0)
    assert (F.normalize(rk.mean(2), dim=1) - k2_expected).abs().max() > 1e-3  # not the mean of normalised ones


def test_lambda_is_zero_before_start_iters_and_survives_resume():
    model = _densecl(lambda_start_iters=2)
    for step in range(2):
        out = model(_batch(seed=step))
        assert out["loss_lambda"].item() == 0.0 and out["loss"].item() == out["loss_global"].item()
        _after(model, step + 1)
    out = model(_batch(seed=2))  # step index 2 = start_iters: lambda on
    assert out["loss_lambda"].item() == 0.5
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_global"].item() + 0.5 * out["loss_dense"].item())
    resumed = _densecl(lambda_start_iters=2)
    resumed.load_state_dict(model.state_dict())  # the step count is a buffer
    assert int(resumed.steps_done) == 2 and resumed(_batch(seed=3))["loss_lambda"].item() == 0.5


def test_dense_loss_trains_the_dense_head_only_once_lambda_is_on():
    model = _densecl(lambda_start_iters=1)
    model(_batch())["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.neck.dense_mlp.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.neck.global_mlp.parameters())
    model.zero_grad()
    _after(model, 1)
    model(_batch(seed=2))["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in model.neck.dense_mlp.parameters())
    assert all(p.grad is None for p in model.key_encoder.parameters())


def test_queues_under_bf16_autocast_hold_float32_keys():
    fp32, bf16 = _densecl("imagenet"), _densecl("imagenet")  # (bf16 convolutions are slow on a CPU)
    batch = _batch()
    torch.manual_seed(3)
    fp32(batch)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16(batch)
    for name in ("global_queue", "dense_queue"):
        a, b = getattr(fp32, name), getattr(bf16, name)
        assert b.features.dtype == torch.float32 and int(a.ptr) == int(b.ptr) == 4
        torch.testing.assert_close(b.features[:4].norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
        assert (a.features - b.features).abs().max() < 0.25  # bf16 rounding through a ResNet, not other keys


def test_bad_hyper_parameters_and_backbone():
    from selfsup.models.vit import VisionTransformer

    with pytest.raises(ConfigError, match="DenseCL needs a backbone with forward_stages"):
        DenseCL(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ConfigError, match=r"loss_lambda in \[0, 1\]"):
        _densecl(loss_lambda=1.5)
    with pytest.raises(ConfigError, match="lambda_start_iters >= 0"):
        _densecl(lambda_start_iters=-1)


def test_recipe():
    from conftest import compose_cfg

    cfg = compose_cfg(["experiment=densecl_resnet50_8xb32-coslr-200e_in1k", "dataset.root=/x"])
    m = cfg.algo.model
    assert (m.hidden_dim, m.out_dim, m.queue_size, m.momentum, m.temperature, m.loss_lambda) == (
        2048,
        128,
        65536,
        0.999,
        0.2,
        0.5,
    )
    default = compose_cfg(["algo=densecl", "dataset=fake"]).algo.model.lambda_start_iters
    assert m.lambda_start_iters == 0 and default == 1000  # MMSelfSup's config registers no DenseCLHook
    assert (cfg.schedule.policy, cfg.schedule.warmup_epochs, cfg.schedule.epochs, cfg.schedule.batch_size) == (
        "cosine",
        0,
        200,
        32,
    )
    assert (cfg.algo.optimizer.lr, cfg.algo.optimizer.weight_decay, cfg.sync_bn) == (0.03, 1e-4, False)
    view = cfg.algo.views[0]
    assert (view.color_jitter, view.hue, view.blur, list(view.crop_scale)) == (0.8, 0.1, 0.5, [0.2, 1.0])


# ---------------------------------------------------------------- 2 processes == 1

RANKS = ["backbone.stem=cifar", "algo.model.lambda_start_iters=1", "algo.model.queue_size=12"]  # 4 x 4 maps


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_with_sync_bn_equal_one():
    check_algorithm_ranks = pytest.importorskip("ranks").check_algorithm_ranks
    one = check_algorithm_ranks("densecl", overrides=RANKS, global_batch=8, steps=3, sync_bn=True)
    assert int(one["state"]["dense_queue.ptr"]) == 24 % 12 and int(one["state"]["steps_done"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_with_per_device_bn_equal_one_with_bn_splits():
    check_algorithm_ranks = pytest.importorskip("ranks").check_algorithm_ranks
    check_algorithm_ranks(
        "densecl", overrides=RANKS, one_process_overrides=["algo.model.bn_splits=2"], global_batch=8, sync_bn=False
    )
