"""BYOLLoss against a numpy implementation of BYOL's normalised MSE (Grill et al. 2020, Eq. 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses import BYOLLoss


def byol_reference(q: np.ndarray, z: np.ndarray) -> float:
    """Mean over rows of || q / |q| - z / |z| ||^2, with explicit loops (float64)."""
    total = 0.0
    for qi, zi in zip(q.astype(np.float64), z.astype(np.float64)):
        qn = qi / math.sqrt(sum(v * v for v in qi))
        zn = zi / math.sqrt(sum(v * v for v in zi))
        total += sum((a - b) ** 2 for a, b in zip(qn, zn))
    return total / len(q)


def _data(seed: int, n: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * rng.uniform(0.1, 5.0, size=(n, 1)), rng.normal(size=(n, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference(seed):
    q, z = _data(seed)
    loss = BYOLLoss()(torch.tensor(q, dtype=torch.float32), torch.tensor(z, dtype=torch.float32))
    assert loss.dim() == 0 and loss.item() == pytest.approx(byol_reference(q, z), abs=1e-6)


def test_is_two_minus_two_cosine_and_its_range():
    q, z = _data(3)
    cos = (q * z).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(z, axis=1)
    loss = BYOLLoss()(torch.tensor(q), torch.tensor(z)).item()
    assert loss == pytest.approx(float(np.mean(2 - 2 * cos)), abs=1e-6)
    same = torch.randn(4, 5)
    assert BYOLLoss()(same, 3 * same).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert BYOLLoss()(same, -same).item() == pytest.approx(4.0, abs=1e-6)  # opposite: the maximum


def test_no_gradient_into_the_target():
    q = torch.randn(4, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    BYOLLoss()(q, z).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert z.grad is None


def test_loss_under_bf16_autocast_is_computed_in_fp32():
    """Predictions out of a matmul under autocast are bf16; the loss equals the float64 reference on them to
    ~1e-6 (computing the cosine in bf16 would be off by ~1e-3)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    errors = []
    for seed in range(4):
        q, z = _data(seed, n=64, d=16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pq, pz = lin(torch.tensor(q, dtype=torch.float32)), lin(torch.tensor(z, dtype=torch.float32))
            assert pq.dtype == torch.bfloat16
            loss = BYOLLoss()(pq, pz)
        assert loss.dtype == torch.float32
        expected = byol_reference(pq.detach().double().numpy(), pz.detach().double().numpy())
        assert loss.item() == pytest.approx(expected, abs=2e-6)
        qn = torch.nn.functional.normalize(pq.detach(), dim=1)  # the same in bf16
        zn = torch.nn.functional.normalize(pz.detach(), dim=1)
        errors.append(abs((2 - 2 * (qn * zn).sum(1)).mean().item() - expected))
    assert max(errors) > 20 * 2e-6


@pytest.mark.parametrize(("sq", "sz"), [((4, 8), (4, 7)), ((4, 8), (3, 8)), ((4,), (4,))])
def test_invalid_shapes(sq, sz):
    with pytest.raises(ValueError, match=r"expected prediction and target of the same \[n, d\] shape"):
        BYOLLoss()(torch.randn(*sq), torch.randn(*sz))


def test_invalid_eps():
    with pytest.raises(ValueError, match="eps must be > 0, got 0.0"):
        BYOLLoss(eps=0.0)
