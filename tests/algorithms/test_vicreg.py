"""VICReg: the official expander, the weighted loss and its logged terms on the two views' embeddings, the
LARS recipe's parameter groups, and 2 processes == 1 with the global batch's variance and covariance."""

from __future__ import annotations

import pytest
import torch
from ranks import check_algorithm_ranks
from torch import nn

from conftest import compose_cfg
from selfsup.algorithms.vicreg import VICReg
from selfsup.config import typed
from selfsup.engine.build import build_algorithm
from selfsup.engine.optim import param_groups
from selfsup.models.resnet import ResNet


def _vicreg() -> VICReg:
    torch.manual_seed(0)
    return VICReg(ResNet("resnet18"), hidden_dim=32, out_dim=16, sim_coeff=2.0, std_coeff=3.0, cov_coeff=5.0)


def _batch(n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], "index": torch.arange(n)}


def test_expander_is_the_official_one():
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, 8192 wide; biases on the hidden Linear layers,
    none on the last (official Projector); paper coefficients 25 / 25 / 1."""
    vicreg = VICReg(ResNet("resnet18"))
    layers = [type(m).__name__ for m in vicreg.projector.mlp]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    linears = [m for m in vicreg.projector.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == [
        (512, 8192, True),
        (8192, 8192, True),
        (8192, 8192, False),
    ]
    f = vicreg.loss_fn
    assert (f.sim_coeff, f.std_coeff, f.cov_coeff, f.eps) == (25.0, 25.0, 1.0, 1e-4)


def test_loss_and_logged_terms_on_the_two_views_embeddings():
    vicreg = _vicreg()
    batch = _batch()
    out = vicreg(batch)
    x1, x2 = batch["views"]
    with torch.no_grad():
        z1, z2 = vicreg.projector(vicreg.backbone(x1)).double(), vicreg.projector(vicreg.backbone(x2)).double()
    s = ((z1 - z2) ** 2).mean()
    v = sum(torch.relu(1 - (z.var(0) + 1e-4).sqrt()).mean() / 2 for z in (z1, z2))
    c = 0.0
    for z in (z1, z2):
        cov = (z - z.mean(0)).T @ (z - z.mean(0)) / 5
        c = c + (cov**2).sum().sub((cov.diagonal() ** 2).sum()) / 16
    assert [out[k].item() for k in ("invariance", "variance", "covariance")] == pytest.approx(
        [s.item(), v.item(), c.item()], rel=1e-4
    )
    assert out["loss"].item() == pytest.approx((2 * s + 3 * v + 5 * c).item(), rel=1e-4)
    assert out["loss"].requires_grad and not out["variance"].requires_grad  # logged terms are detached


def test_lars_recipe_excludes_biases_and_batch_norm_from_decay_and_adaptation():
    """Official exclude_bias_and_norm: every 1-D parameter without weight decay and LARS adaptation, at the
    same lr as the weights (unlike Barlow Twins)."""
    c = typed(compose_cfg(["algo=vicreg", "dataset=fake"]))
    algo = build_algorithm(c, 8)
    assert c.algo.optimizer.name == "lars" and c.algo.optimizer.lr == 0.2
    names = {id(p): n for n, p in algo.named_parameters()}
    seen = 0
    for g in param_groups(algo, c.algo.optimizer, 1.0):
        for p in g["params"]:
            seen += 1
            assert g["lr"] == 1.0, names[id(p)]
            assert (g["weight_decay"], g["lars_exclude"]) == ((0.0, True) if p.ndim == 1 else (1e-6, False))
    assert seen == len(list(algo.parameters()))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one(tmp_path):
    """Variance and covariance over the global batch, the invariance averaged over ranks: 2 ranks x 4 images
    train exactly like 1 x 8.

    Two steps: with the harness's plain SGD at lr 0.05, float32 rounding grows to ~1.4% of the third step's
    gradients; in float64 the 3 steps agree to 1e-15 (losses), so the difference is rounding, not VICReg."""
    check_algorithm_ranks("vicreg", global_batch=8, steps=2, sync_bn=True, tmp_dir=tmp_path)
