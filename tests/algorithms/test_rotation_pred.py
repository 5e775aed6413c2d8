"""Rotation-Pred: the loss against a float64 cross entropy of the paper's 4-way rotation classifier, the
targets aligned with the rotated images, one backbone pass for the four rotations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.algorithms.rotation_pred import RotationPred
from selfsup.data.views import MultiViewDataset, ViewPipeline
from selfsup.errors import ConfigError
from selfsup.models.resnet import ResNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _algo() -> RotationPred:
    torch.manual_seed(0)
    return RotationPred(ResNet("resnet18"))


def _views(b: int = 3, size: int = 32, seed: int = 1) -> dict:
    """A batch from the view declaration: each image at 0, 90, 180, 270 degrees, targets 0..3."""
    g = torch.Generator().manual_seed(seed)
    images = [(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g), 0, i) for i in range(b)]
    spec = {"size": size, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip": 0.0}
    ds = MultiViewDataset(images, [ViewPipeline({**spec, "rotations": [0, 90, 180, 270]})])
    items = [ds[i] for i in range(b)]
    return {
        "views": [torch.stack([it["views"][k] for it in items]).float() / 255 for k in range(4)],
        "view_targets": torch.stack([it["view_targets"] for it in items]),
        "images": torch.stack([img for img, _, _ in images]).float() / 255,
    }


def _reference_loss(algo: RotationPred, batch: dict) -> float:
    """Mean over images i and rotations r of -log softmax(W f(rot_r(x_i)) + b)[target], float64
    (eval mode: BN with running statistics, one image at a time)."""
    w, bias = algo.head.weight.detach().double(), algo.head.bias.detach().double()
    total, count = 0.0, 0
    for i in range(batch["view_targets"].shape[0]):
        for k, view in enumerate(batch["views"]):
            with torch.no_grad():
                f = algo.backbone(view[i : i + 1])[0].double()
            logits = (w @ f + bias).tolist()
            m = max(logits)
            log_z = m + math.log(sum(math.exp(v - m) for v in logits))
            total += log_z - logits[int(batch["view_targets"][i, k])]
            count += 1
    return total / count


def test_loss_is_the_cross_entropy_of_the_rotation_classifier():
    algo = _algo().eval()
    with torch.no_grad():
        algo.head.weight.mul_(100)  # logits of order 1, so a wrong target changes the loss visibly
    batch = _views()
    expected = _reference_loss(algo, batch)
    assert algo(batch)["loss"].item() == pytest.approx(expected, rel=1e-5)
    # the targets come from the batch: other targets, another loss, still the reference's
    wrong = {**batch, "view_targets": (batch["view_targets"] + 1) % 4}
    assert abs(_reference_loss(algo, wrong) - expected) > 1e-3 * expected
    assert algo(wrong)["loss"].item() == pytest.approx(_reference_loss(algo, wrong), rel=1e-5)


class _RotationOf(nn.Module):
    """A 'backbone' that knows the answer: for each input, a one-hot of the k with input ==
    rot90(original image, k) (counter-clockwise, as the views rotate). Counts its calls."""

    num_features = 4

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        out = torch.zeros(x.shape[0], 4)
        for j, view in enumerate(x):
            matches = [
                (i, k)
                for i, img in enumerate(self.images)
                for k in range(4)
                if torch.equal(view, torch.rot90(img, k, (1, 2)))
            ]
            assert len(matches) == 1
            out[j, matches[0][1]] = 1.0
        return out


def test_targets_align_with_the_rotated_images_in_one_backbone_pass():
    """With a classifier that reads the true rotation off each view, every prediction is right only
    when each view's target is paired with that view."""
    batch = _views(b=4)
    backbone = _RotationOf(batch["images"])
    algo = RotationPred(backbone)
    with torch.no_grad():
        algo.head.weight.copy_(20 * torch.eye(4))
        algo.head.bias.zero_()
    out = algo(batch)
    assert backbone.calls == [16]  # the 4 rotations of the 4 images in one pass
    assert out["accuracy"].item() == 1.0 and out["loss"].item() < 1e-6


def test_gradients_reach_backbone_and_head():
    algo = _algo()
    algo(_views())["loss"].backward()
    for name, module in (("backbone", algo.backbone), ("head", algo.head)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_head_follows_mmselfsup_clshead():
    algo = _algo()
    assert (algo.head.in_features, algo.head.out_features) == (512, 4) and algo.num_views == 4
    assert algo.head.weight.std().item() == pytest.approx(0.01, rel=0.1) and algo.head.bias.abs().sum() == 0


def test_two_rotations():
    """num_rotations=2 (the paper's Table 2 variant 0/180): a 2-way head on 2 views."""
    algo = RotationPred(ResNet("resnet18"), num_rotations=2)
    assert algo.num_views == 2 and algo.head.out_features == 2
    batch = _views()
    two = {"views": [batch["views"][0], batch["views"][2]], "view_targets": torch.tensor([[0, 1]] * 3)}
    assert torch.isfinite(algo(two)["loss"])
    with pytest.raises(ValueError, match="expects 2 rotated views"):
        algo(batch)
    with pytest.raises(ConfigError, match="num_rotations must be >= 2"):
        RotationPred(ResNet("resnet18"), num_rotations=1)
