"""Relative-Loc: the loss against a float64 reference of the paper's pair classifier, the [centre,
neighbour] pairing and its targets from the grid, one backbone pass, the paper's patch preprocessing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.algorithms.relative_loc import RelativeLoc
from selfsup.data.views import MultiViewDataset, ViewPipeline
from selfsup.errors import ConfigError
from selfsup.models.resnet import ResNet

pytestmark = pytest.mark.usefixtures("one_thread")

GRID_TARGETS = [0, 1, 2, 3, -1, 4, 5, 6, 7]  # what views.py emits for a 3 x 3 grid (row-major, centre -1)
# the paper's 8 classes: the neighbour's (row, col) offset from the centre, in row-major order
OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _plain(**kw) -> RelativeLoc:
    """No random preprocessing and no dropout: a deterministic function of the patches."""
    torch.manual_seed(0)
    args = {"hidden_dim": 16, "dropout": 0.0, "color": "keep", "patch_norm": False, "downsample": 0.0, **kw}
    return RelativeLoc(ResNet("resnet18"), **args)


def _batch(b: int = 3, p: int = 16, seed: int = 1, targets: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, p, p, generator=g) for _ in range(9)]
    if targets is None:
        targets = torch.tensor(GRID_TARGETS).repeat(b, 1)
    return {"views": views, "view_targets": targets}


def _shuffled_targets(b: int, seed: int = 2) -> torch.Tensor:
    """Per image, a random assignment of the classes 0..7 to the 8 neighbour slots (centre stays -1)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((b, 9), -1, dtype=torch.long)
    for i in range(b):
        out[i, [0, 1, 2, 3, 5, 6, 7, 8]] = torch.randperm(8, generator=g)
    return out


def _reference_loss(algo: RelativeLoc, batch: dict) -> float:
    """The paper's objective by hand, float64: for image i and each neighbour patch j,
    logits = W2 relu(BN(W1 [f(centre_i); f(patch_j)] + b1)) + b2, loss = mean of -log softmax[target_ij]
    (eval mode: BN with running statistics, patches through the backbone one image at a time)."""
    with torch.no_grad():
        feats = [algo.backbone(v).double().numpy() for v in batch["views"]]  # 9 x [B, C]
    fc, bn, head = algo.neck.fc, algo.neck.bn, algo.head
    w1, b1 = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    w2, b2 = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    targets = batch["view_targets"].numpy()
    total, count = 0.0, 0
    for i in range(targets.shape[0]):
        centre = [j for j in range(9) if targets[i, j] == -1]
        assert centre == [4]
        for j in range(9):
            if j == 4:
                continue
            pair = np.concatenate([feats[4][i], feats[j][i]])
            h = w1 @ pair + b1
            h = (h - mean) / np.sqrt(var + bn.eps) * gamma + beta
            logits = w2 @ np.maximum(h, 0.0) + b2
            m = logits.max()
            log_z = m + math.log(sum(math.exp(v - m) for v in logits))
            total += log_z - logits[targets[i, j]]
            count += 1
    return total / count


def _perturb_bn(algo: RelativeLoc) -> None:
    """Non-trivial running statistics and affine parameters, so the reference checks the BN too."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in algo.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        algo.head.weight.mul_(100)  # logits of order 1: a wrong pairing changes the loss visibly


@pytest.mark.parametrize("shuffled", [False, True], ids=["grid-targets", "shuffled-targets"])
def test_loss_is_the_cross_entropy_of_the_centre_neighbour_pair_classifier(shuffled):
    algo = _plain()
    _perturb_bn(algo)
    algo.eval()
    b = 3
    batch = _batch(b, targets=_shuffled_targets(b) if shuffled else None)
    loss = algo(batch)["loss"]
    expected = _reference_loss(algo, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the test can tell a wrong pairing: [neighbour, centre] gives another loss
    with torch.no_grad():
        feats = torch.stack([algo.backbone(v) for v in batch["views"]])
        centre, neighbours = feats[4], feats[[0, 1, 2, 3, 5, 6, 7, 8]]
        wrong = torch.cat([neighbours, centre.expand_as(neighbours)], dim=2).flatten(0, 1)
        labels = batch["view_targets"][:, [0, 1, 2, 3, 5, 6, 7, 8]].T.reshape(-1)
        wrong_loss = nn.functional.cross_entropy(algo.head(algo.neck(wrong)), labels)
    assert abs(wrong_loss.item() - expected) > 1e-3 * abs(expected)


def test_gradients_reach_backbone_neck_and_head():
    algo = _plain()
    algo(_batch())["loss"].backward()
    for name, module in (("backbone", algo.backbone), ("neck", algo.neck), ("head", algo.head)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


class _Coordinates(nn.Module):
    """A 'backbone' that returns where a patch came from: its top-left pixel's (row, col), which the
    test image stores in its first two channels. Counts its calls and the rows it saw."""

    num_features = 2

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x[:, :2, 0, 0]


def test_targets_follow_the_grid_layout_and_the_pair_is_centre_then_neighbour():
    """End to end from the view declaration: every pair the classifier gets is [centre, neighbour],
    and its target is the neighbour's position relative to the centre (the paper's 8 classes)."""
    size, p, b = 48, 12, 4
    rows = torch.arange(size).view(1, size, 1).expand(1, size, size)
    cols = torch.arange(size).view(1, 1, size).expand(1, size, size)
    image = torch.cat([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)
    spec = {"size": size, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip": 0.0}
    spec["grid"] = {"cells": 3, "patch_size": p}
    ds = MultiViewDataset([(image, 0, i) for i in range(b)], [ViewPipeline(spec)])
    torch.manual_seed(0)
    items = [ds[i] for i in range(b)]
    batch = {
        "views": [torch.stack([it["views"][j] for it in items]).float() for j in range(9)],
        "view_targets": torch.stack([it["view_targets"] for it in items]),
    }
    backbone = _Coordinates()
    algo = RelativeLoc(backbone, hidden_dim=8, dropout=0.0, color="keep", patch_norm=False, downsample=0.0)
    seen: dict[str, torch.Tensor] = {}
    algo.neck.register_forward_pre_hook(lambda m, args: seen.update(pairs=args[0].detach().clone()))
    algo.loss_fn.register_forward_pre_hook(lambda m, args: seen.update(labels=args[1].clone()))
    algo(batch)
    assert backbone.calls == [9 * b]  # the 9 patches of every image in one pass
    pairs, labels = seen["pairs"], seen["labels"]
    assert pairs.shape == (8 * b, 4) and labels.shape == (8 * b,)
    cell = size // 3
    for (c_row, c_col, n_row, n_col), label in zip(pairs.tolist(), labels.tolist()):
        assert (c_row // cell, c_col // cell) == (1, 1)  # the first patch of each pair is the centre
        offset = (int(n_row // cell) - 1, int(n_col // cell) - 1)
        assert offset in OFFSETS and label == OFFSETS.index(offset)


def test_patches_are_preprocessed_before_the_single_backbone_pass():
    """The backbone sees each patch per-channel centred and scaled to unit RMS (patch_norm), with all
    but one channel replaced by faint noise (color="drop")."""
    torch.manual_seed(0)
    inputs: list[torch.Tensor] = []
    backbone = ResNet("resnet18")
    backbone.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    algo = RelativeLoc(backbone, hidden_dim=16, downsample=0.0)
    b = 4
    algo(_batch(b, p=16))
    assert len(inputs) == 1 and inputs[0].shape == (9 * b, 3, 16, 16)
    x = inputs[0]
    torch.testing.assert_close(x.mean(dim=(2, 3)), torch.zeros(9 * b, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.square().mean(dim=(1, 2, 3)), torch.ones(9 * b), atol=1e-3, rtol=0)
    energy = x.square().mean(dim=(2, 3))  # [N, 3]
    assert (energy.max(dim=1).values > 0.99 * energy.sum(dim=1)).all()  # one channel carries the patch


def test_color_dropping_keeps_one_random_channel_per_patch_and_fills_the_others_with_faint_noise():
    torch.manual_seed(0)
    algo = RelativeLoc(ResNet("resnet18"), hidden_dim=16, color="drop", patch_norm=False, downsample=0.0, noise=0.01)
    x = torch.randn(300, 3, 16, 16) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5
    out = algo.prepare_patches(x)
    same = (out == x).all(dim=(2, 3))  # [N, 3]: which channels came through unchanged
    assert (same.sum(dim=1) == 1).all()  # exactly one per patch
    kept = same.float().argmax(dim=1)
    counts = torch.bincount(kept, minlength=3)
    assert (counts > 70).all(), counts  # drawn per patch, uniformly
    kept_std = x.gather(1, kept.view(-1, 1, 1, 1).expand(-1, 1, 16, 16)).std(dim=(2, 3), correction=0)
    noise = out[~same].view(300, 2, 16, 16)
    ratio = noise.std(dim=(2, 3)) / kept_std
    assert 0.007 < ratio.mean() < 0.013 and noise.mean().abs() < 1e-3


def test_patch_norm_is_per_patch_and_per_channel():
    algo = RelativeLoc(ResNet("resnet18"), hidden_dim=16, color="keep", patch_norm=True, downsample=0.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 8, 8, generator=g) * torch.arange(1.0, 6.0).view(5, 1, 1, 1) + torch.randn(5, 3, 1, 1)
    centred = x.double() - x.double().mean(dim=(2, 3), keepdim=True)
    expected = centred / centred.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(algo.prepare_patches(x).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(algo.prepare_patches(torch.full((1, 3, 8, 8), 7.0)), torch.zeros(1, 3, 8, 8))


def test_downsampling_pixelates_about_the_declared_share_of_patches():
    torch.manual_seed(0)
    algo = RelativeLoc(ResNet("resnet18"), hidden_dim=16, color="keep", patch_norm=False, downsample=0.33)
    p = 32
    checker = ((torch.arange(p).view(p, 1) + torch.arange(p).view(1, p)) % 2).float()  # finest detail
    x = checker.expand(600, 3, p, p).clone()
    out = algo.prepare_patches(x)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.27 < changed.float().mean() < 0.39
    # a changed patch lost its pixel-level detail (down-sampled to at most (P-1) px and back)
    detail = (out[changed] - out[changed].mean(dim=(2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
    assert (detail < 0.1).all() and torch.equal(out[~changed], x[~changed])
    assert torch.equal(RelativeLoc(ResNet("resnet18"), hidden_dim=16, downsample=0.0, color="keep",
                                   patch_norm=False).prepare_patches(x), x)  # fmt: skip


def test_neck_and_head_follow_mmselfsup():
    algo = RelativeLoc(ResNet("resnet18"))
    neck = algo.neck
    assert (neck.fc.in_features, neck.fc.out_features) == (2 * 512, 4096)
    assert neck.bn.momentum == 0.003 and neck.dropout.p == 0.5
    assert (algo.head.in_features, algo.head.out_features) == (4096, 8)
    assert algo.head.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert neck.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert algo.head.bias.abs().sum() == 0 and neck.fc.bias.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_dim": 0}, "hidden_dim must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"color": "project"}, "color='project' must be 'drop' or 'keep'"),
        ({"downsample": 1.5}, "downsample is a probability"),
        ({"noise": -0.1}, "noise must be >= 0"),
    ],
)
def test_bad_hyper_parameters_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RelativeLoc(ResNet("resnet18"), **kwargs)
