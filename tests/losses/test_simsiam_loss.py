"""SimSiamLoss against a loop implementation of SimSiam's D(p, z) = -cos(p, stopgrad(z)) (Chen & He 2021, Eq. 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses.simsiam import SimSiamLoss


def negative_cosine_reference(p: np.ndarray, z: np.ndarray) -> float:
    """Mean over rows of -<p_i, z_i> / (|p_i| |z_i|), with explicit loops (float64)."""
    total = 0.0
    for pi, zi in zip(p.astype(np.float64), z.astype(np.float64), strict=True):
        dot = sum(a * b for a, b in zip(pi, zi, strict=True))
        total += -dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
    return total / len(p)


def _data(seed: int, n: int = 6, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * rng.uniform(0.1, 5.0, size=(n, 1)), rng.normal(size=(n, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_loop_reference(seed):
    p, z = _data(seed)
    loss = SimSiamLoss()(torch.tensor(p, dtype=torch.float32), torch.tensor(z, dtype=torch.float32))
    assert loss.dim() == 0 and loss.item() == pytest.approx(negative_cosine_reference(p, z), abs=1e-6)
    loss64 = SimSiamLoss()(torch.tensor(p), torch.tensor(z))
    assert loss64.dtype == torch.float64 and loss64.item() == pytest.approx(negative_cosine_reference(p, z), abs=1e-12)


def test_range_and_scale_invariance():
    x = torch.randn(4, 5, dtype=torch.float64)
    assert SimSiamLoss()(x, 3 * x).item() == pytest.approx(-1.0, abs=1e-12)  # aligned: the minimum
    assert SimSiamLoss()(x, -x).item() == pytest.approx(1.0, abs=1e-12)  # opposite: the maximum


def test_gradient_flows_into_the_prediction_only():
    """The stop-gradient: z gets no gradient; p gets d(-cos)/dp = -(z/|z| - cos p/|p|) / |p| / n per row."""
    p = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    SimSiamLoss()(p, z).backward()
    assert z.grad is None
    pn, zn = p.detach().norm(dim=1, keepdim=True), z.detach().norm(dim=1, keepdim=True)
    cos = (p.detach() * z.detach()).sum(1, keepdim=True) / (pn * zn)
    want = -(z.detach() / zn - cos * p.detach() / pn) / pn / 4
    torch.testing.assert_close(p.grad, want, atol=1e-12, rtol=1e-10)


def test_loss_under_bf16_autocast_is_the_fp32_loss():
    """The same fp32 inputs give the same loss inside bf16 autocast as outside (the cosine in bf16, which a
    missing ``autocast(enabled=False)`` would allow for inputs coming out of autocast ops, is off by ~1e-3)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    errors = []
    for seed in range(4):
        p, z = (torch.tensor(a, dtype=torch.float32) for a in _data(seed, n=64, d=16))
        with torch.no_grad():
            p, z = lin(p), lin(z)
        want = SimSiamLoss()(p, z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = SimSiamLoss()(p, z)
            bf16 = SimSiamLoss()(p.bfloat16(), z.bfloat16())
        assert got.dtype == torch.float32 and bf16.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), abs=1e-7)
        assert bf16.item() == pytest.approx(
            negative_cosine_reference(p.bfloat16().double().numpy(), z.bfloat16().double().numpy()), abs=1e-6
        )
        pb, zb = torch.nn.functional.normalize(p.bfloat16(), dim=1), torch.nn.functional.normalize(z.bfloat16(), dim=1)
        errors.append(abs(-(pb * zb).sum(1).mean().item() - want.item()))
    assert max(errors) > 20 * 1e-6  # a bf16 computation would be caught


@pytest.mark.parametrize(("sp", "sz"), [((4, 8), (4, 7)), ((4, 8), (3, 8)), ((4,), (4,))])
def test_invalid_shapes(sp, sz):
    with pytest.raises(ValueError, match=r"expected prediction and target of the same \[n, d\] shape"):
        SimSiamLoss()(torch.randn(*sp), torch.randn(*sz))


def test_invalid_eps():
    with pytest.raises(ValueError, match="eps must be > 0, got 0.0"):
        SimSiamLoss(eps=0.0)
