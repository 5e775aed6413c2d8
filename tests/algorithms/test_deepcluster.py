"""DeepCluster: PCA-whitening, k-means pseudo-labels every epoch (not again on a mid-epoch resume), the
re-initialised head, uniform sampling over clusters, the Sobel input, bf16, 2 processes == 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, tiny
from selfsup.algorithms.deepcluster import (
    HEAD_STD,
    DeepCluster,
    SobelConv2d,
    pca_whitening,
    uniform_over_clusters,
    whiten_and_normalise,
)
from selfsup.clustering import torch_kmeans
from selfsup.config import typed
from selfsup.engine.optim import build_optimizer
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.models.resnet import ResNet


class _Ctx:
    """TrainContext with fixed features; counts the extractions."""

    def __init__(self, features: torch.Tensor, epoch: int = 0, seed: int = 0) -> None:
        self.features, self.seed, self.state, self.calls = features, seed, TrainState(epoch=epoch), 0

    def extract_features(self, fn):
        self.calls += 1
        return self.features


def _blobs(n_per: int = 30, k: int = 5, d: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` well separated Gaussian blobs in ``d`` dims (one scale per dim): features and true cluster ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    truth = torch.arange(k).repeat_interleave(n_per)
    x = centres[truth] + torch.randn(len(truth), d, generator=g)
    return x * torch.rand(d, generator=g) * 3, truth


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def _algo(num_clusters: int = 5, n: int = 150, **kw) -> DeepCluster:
    torch.manual_seed(0)
    algo = DeepCluster(ResNet("resnet18"), num_clusters=num_clusters, pca_dim=kw.pop("pca_dim", 16), **kw)
    algo.setup(n)
    return algo


# ---------------------------------------------------------------------------------------------- PCA + k-means
def test_pca_whitening_gives_identity_covariance_along_the_top_principal_axes():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g) * torch.logspace(-1, 1, 12)  # correlated, very unequal variances
    x = (torch.randn(400, 12, generator=g) @ mix + 5.0).float()
    mean, proj = pca_whitening(x, 6)
    y = (x.double() - mean) @ proj
    torch.testing.assert_close(y.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.T @ y / len(x), torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)
    # the directions are the 6 leading eigenvectors of the covariance (numpy, independently)
    xc = x.double().numpy() - x.double().numpy().mean(0)
    values, vectors = np.linalg.eigh(xc.T @ xc / len(x))
    top = vectors[:, ::-1][:, :6]
    cos = np.abs((proj.numpy() / np.linalg.norm(proj.numpy(), axis=0)).T @ top)
    np.testing.assert_allclose(np.diag(cos), np.ones(6), atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(proj.numpy(), axis=0), values[::-1][:6] ** -0.5, rtol=1e-8)


def test_pca_whitening_of_rank_deficient_features_stays_finite():
    """Fewer images than dims: the null directions get scale 0, not inf/NaN."""
    x = torch.randn(5, 20)
    mean, proj = pca_whitening(x, 10)
    y = whiten_and_normalise(x, mean, proj)
    assert torch.isfinite(proj).all() and torch.isfinite(y).all()
    assert (proj.norm(dim=0)[4:] == 0).all()  # 5 centred points span 4 dims


def test_labels_are_the_k_means_of_the_whitened_normalised_features():
    x, truth = _blobs()
    algo = _algo(pca_dim=4)  # 5 blobs span 4 dims; whitened noise dims beyond them would drown them
    ctx = _Ctx(x)
    algo.on_epoch_start(ctx)
    mean, proj = pca_whitening(x, 4)
    y = whiten_and_normalise(x, mean, proj)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(len(x)))
    want, _ = torch_kmeans(y, 5, iters=20, seed=(0 * 1_000_003 + 0) * 8 + 0)
    assert torch.equal(algo.labels, want)
    assert _same_partition(algo.labels, truth)  # the planted blobs are found
    assert int(algo.labels_epoch) == 0 and ctx.calls == 1


def test_labels_under_bf16_autocast_equal_fp32():
    """The clustering decides discrete labels: under autocast it must still run in float32/float64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 512, generator=g) @ torch.randn(512, 512, generator=g) / 20  # no clean blobs: near ties
    fp32 = _algo(num_clusters=20, n=300).cluster(x, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _algo(num_clusters=20, n=300).cluster(x, seed=3)
    assert torch.equal(fp32, bf16)


# ---------------------------------------------------------------------------------------------- epochs and resume
def test_head_is_reinitialised_each_epoch_but_not_on_a_mid_epoch_resume():
    x, _ = _blobs()
    algo = _algo()
    algo.on_epoch_start(_Ctx(x, epoch=0, seed=7))
    head0 = algo.head.weight.clone()
    assert head0.std().item() == pytest.approx(HEAD_STD, rel=0.05) and (algo.head.bias == 0).all()
    with torch.no_grad():  # training moves the head and the backbone
        algo.head.weight.add_(1.0)
        algo.head.bias.add_(1.0)
    trained, labels0 = algo.head.weight.clone(), algo.labels.clone()

    # a run resumed in the middle of epoch 0: a fresh model loads the checkpoint, on_epoch_start runs again
    resumed = _algo()
    resumed.load_state_dict(algo.state_dict())
    ctx = _Ctx(torch.randn_like(x), epoch=0, seed=7)
    resumed.on_epoch_start(ctx)
    assert ctx.calls == 0  # no re-clustering ...
    assert torch.equal(resumed.head.weight, trained) and torch.equal(resumed.labels, labels0)  # ... and no re-init

    # the next epoch: new labels, a fresh head, the same on every rank (seeded by seed and epoch)
    x1 = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    algo.on_epoch_start(_Ctx(x1, epoch=1, seed=7))
    resumed.on_epoch_start(_Ctx(x1, epoch=1, seed=7))
    assert int(algo.labels_epoch) == 1 and not torch.equal(algo.labels, labels0)
    assert not torch.equal(algo.head.weight, head0) and (algo.head.bias == 0).all()
    assert torch.equal(algo.head.weight, resumed.head.weight)
    assert algo.head.weight.std().item() == pytest.approx(HEAD_STD, rel=0.05)


def test_loss_is_the_cross_entropy_of_the_head_against_the_pseudo_labels():
    x, _ = _blobs()
    algo = _algo()
    algo.on_epoch_start(_Ctx(x))
    index = torch.tensor([3, 40, 77, 140])
    batch = {"views": [torch.randn(4, 3, 32, 32)], "index": index}
    loss = algo(batch)["loss"]
    with torch.no_grad():
        logits = algo.head(algo.backbone(batch["views"][0])).double()
    want = sum(torch.logsumexp(logits[i], 0) - logits[i, algo.labels[j]] for i, j in enumerate(index.tolist())) / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_the_head_gets_no_momentum_in_the_recipe():
    c = typed(compose_cfg(tiny("deepcluster")))
    algo = DeepCluster(ResNet("resnet18"), num_clusters=4, pca_dim=8)
    opt = build_optimizer(algo, c.algo.optimizer, c.algo.optimizer.lr)
    momentum = {id(p): g["momentum"] for g in opt.param_groups for p in g["params"]}
    assert momentum[id(algo.head.weight)] == 0.0 and momentum[id(algo.head.bias)] == 0.0
    assert momentum[id(algo.backbone.layer1[0].conv1.weight)] == 0.9


# ---------------------------------------------------------------------------------------------- uniform sampling
def test_uniform_sampling_balances_the_clusters():
    sizes = {0: 70, 1: 20, 3: 8, 4: 2}  # cluster 2 is empty
    labels = torch.cat([torch.full((s,), c) for c, s in sizes.items()])
    labels = labels[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    order = uniform_over_clusters(labels, torch.Generator().manual_seed(1))
    assert order.dtype == torch.long and len(order) == 100
    counts = torch.bincount(labels[order], minlength=5)
    # 100 // 4 + 1 = 26 drawn from each non-empty cluster, 104 shuffled, cut to 100: 22..26 each
    assert counts[2] == 0 and all(22 <= int(counts[c]) <= 26 for c in sizes), counts
    big = order[labels[order] == 0]
    assert len(set(big.tolist())) == len(big)  # 70 > 26: drawn without replacement
    assert set(order[labels[order] == 4].tolist()) == set((labels == 4).nonzero()[:, 0].tolist())  # with


def test_epoch_indices_follow_the_labels_seed_and_epoch():
    x, truth = _blobs(n_per=30, k=5)
    x = x[: 30 * 4 + 3]  # a small fifth cluster of 3 images
    algo = _algo(n=len(x))
    algo.on_epoch_start(_Ctx(x, epoch=0))
    order = algo.epoch_indices(0, seed=5)
    assert order.device.type == "cpu" and order.dtype == torch.long and len(order) == len(x)
    counts = torch.bincount(algo.labels[order], minlength=5)
    assert int(counts.min()) >= 20, counts  # the 3-image cluster is drawn as often as the others
    assert torch.equal(order, algo.epoch_indices(0, seed=5))
    assert not torch.equal(order, algo.epoch_indices(0, seed=6))
    with pytest.raises(RuntimeError, match="before on_epoch_start"):
        algo.epoch_indices(1, seed=5)
    assert _algo(uniform_sampling=False).epoch_indices(0, seed=5) is None


# ---------------------------------------------------------------------------------------------- Sobel
def test_sobel_input_is_grey_edges_into_a_two_channel_conv1():
    torch.manual_seed(0)
    algo = DeepCluster(ResNet("resnet18"), num_clusters=4, pca_dim=8).eval()
    conv = algo.backbone.conv1
    assert isinstance(conv, SobelConv2d) and conv.weight.shape == (64, 2, 7, 7)
    assert "backbone.conv1.sobel" not in algo.state_dict()  # a constant, not state
    x = torch.randn(2, 3, 32, 32)
    grey = x.mean(dim=1, keepdim=True)
    sx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    edges = F.conv2d(grey, torch.stack([sx, sx.T])[:, None], padding=1)  # Sobel x and y (the transpose)
    want = F.conv2d(edges, conv.weight, stride=2, padding=3)
    torch.testing.assert_close(conv(x), want, atol=1e-5, rtol=1e-5)
    # extract() (kNN, benchmarks) takes RGB and applies it: colour permutations do not matter
    torch.testing.assert_close(algo.extract(x), algo.extract(x[:, [2, 0, 1]]), atol=1e-5, rtol=1e-5)
    plain = DeepCluster(ResNet("resnet18"), num_clusters=4, pca_dim=8, sobel=False)
    assert type(plain.backbone.conv1) is torch.nn.Conv2d and plain.backbone.conv1.in_channels == 3
    assert algo.state_dict().keys() == plain.state_dict().keys()


def test_sobel_on_a_vit_patch_embedding():
    from selfsup.models.vit import VisionTransformer

    algo = DeepCluster(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), 4, 8)
    assert isinstance(algo.backbone.patch_embed, SobelConv2d)
    assert algo.extract(torch.randn(2, 3, 32, 32)).shape == (2, 32)


# ---------------------------------------------------------------------------------------------- errors
class _NoConv(torch.nn.Flatten):
    num_features = 8


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"more clusters \(algo.model.num_clusters=200\) than training images \(64\)"):
        DeepCluster(ResNet("resnet18"), num_clusters=200).setup(64)
    with pytest.raises(ConfigError, match="pca_dim=1024 must be between 1 and the backbone's feature size 512"):
        DeepCluster(ResNet("resnet18"), pca_dim=1024)
    with pytest.raises(ConfigError, match="sobel=true needs a backbone whose first layer is a conv"):
        DeepCluster(_NoConv(), num_clusters=4, pca_dim=1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one():
    """k-means on each rank's shard + all-gathered labels, the seeded head and the epoch order are those of
    one process (the labels and labels_epoch are compared exactly)."""
    from ranks import check_algorithm_ranks

    one = check_algorithm_ranks("deepcluster", global_batch=8, steps=3)
    assert len(torch.unique(one["state"]["labels"])) > 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_resumed_in_the_middle_of_an_epoch_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Ctrl-C at step 6 (epoch 2 of 2, 4 steps each), resume: the same labels, head and weights bit for bit, as
    the resumed epoch neither re-clusters nor re-initialises the head, and follows the same cluster-uniform order."""
    import os
    import signal

    from conftest import run_training
    from selfsup.engine import checkpoint as ckpt_io
    from selfsup.engine.trainer import Trainer
    from selfsup.errors import TrainingInterrupted

    overrides = tiny("deepcluster") + ["schedule.epochs=2", "deterministic=true", "knn.enabled=false"]
    straight = run_training(overrides, tmp_path / "straight")
    trainer = Trainer(compose_cfg(overrides), tmp_path / "run")
    after_step = trainer.algo.after_step

    def interrupt_at_6(state):
        if state.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return after_step(state)

    monkeypatch.setattr(trainer.algo, "after_step", interrupt_at_6)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    ckpt = ckpt_io.load(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], int(ckpt["model"]["labels_epoch"])) == (1, 6, 1)
    resumed = run_training(overrides + ["resume=auto"], tmp_path / "run")
    assert resumed.steps == straight.steps == 8
    a = ckpt_io.load(tmp_path / "straight" / "last.pt")["model"]
    b = ckpt_io.load(tmp_path / "run" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
