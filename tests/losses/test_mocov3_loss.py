"""MoCoV3ContrastiveLoss against a float64 loop implementation of MoCo v3's ctr(q, k) (Chen et al. 2021, Alg. 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses.mocov3_contrastive import MoCoV3ContrastiveLoss


def ctr_reference(q: np.ndarray, k: np.ndarray, t: float, offset: int = 0) -> float:
    """2t * mean_i -log(exp(<q_i, k_{offset+i}>/t) / sum_j exp(<q_i, k_j>/t)) with unit vectors, loops, float64;
    q [n, d] are this rank's queries, k [N, d] the keys of the whole batch."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    qn = [row / math.sqrt(sum(v * v for v in row)) for row in q]
    kn = [row / math.sqrt(sum(v * v for v in row)) for row in k]
    total = 0.0
    for i, qi in enumerate(qn):
        logits = [sum(a * b for a, b in zip(qi, kj)) / t for kj in kn]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(x - top) for x in logits))
        total += log_z - logits[offset + i]
    return 2 * t * total / len(qn)


def _data(seed: int, n: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * rng.uniform(0.1, 5.0, size=(n, 1)), rng.normal(size=(n, d))


@pytest.mark.parametrize("t", [1.0, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_formula_with_the_2t_factor(seed, t):
    q, k = _data(seed)
    loss = MoCoV3ContrastiveLoss(t)(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32))
    expected = ctr_reference(q, k, t)
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected / (2 * t) - expected) > 1e-3  # without the 2T factor it would differ


def test_positive_is_the_key_of_the_same_image():
    """labels = arange(n): a key batch whose rows are rolled gives another (higher) loss for aligned pairs."""
    q = torch.randn(5, 8)
    loss_fn = MoCoV3ContrastiveLoss(0.2)
    aligned = loss_fn(q, q.clone()).item()
    assert aligned == pytest.approx(ctr_reference(q.numpy(), q.numpy(), 0.2), rel=1e-5)
    assert loss_fn(q, q.roll(1, 0)).item() > aligned + 1.0


def test_gradient_matches_float64_and_keys_get_none():
    q64, k64 = _data(3)
    q = torch.tensor(q64, requires_grad=True)
    k = torch.tensor(k64, requires_grad=True)
    MoCoV3ContrastiveLoss(0.5)(q, k).backward()
    assert k.grad is None  # keys come from the momentum encoder
    # central differences of the float64 reference
    eps, num = 1e-6, np.zeros_like(q64)
    for i in range(q64.shape[0]):
        for j in range(q64.shape[1]):
            up, down = q64.copy(), q64.copy()
            up[i, j] += eps
            down[i, j] -= eps
            num[i, j] = (ctr_reference(up, k64, 0.5) - ctr_reference(down, k64, 0.5)) / (2 * eps)
    np.testing.assert_allclose(q.grad.numpy(), num, atol=2e-5, rtol=1e-4)


def test_keys_of_other_ranks_are_negatives_and_labels_are_offset_by_rank(monkeypatch):
    """On rank 1 of 2 the logits are [n, 2n] against the gathered keys and the positive of q_i is key n + i."""
    from selfsup import distributed

    q64, k_local = _data(4, n=4)
    k_other = np.random.default_rng(9).normal(size=(4, 8))
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    other = torch.nn.functional.normalize(torch.tensor(k_other), dim=1)  # rank 0's keys, normalised there
    monkeypatch.setattr(distributed, "all_gather", lambda k: torch.cat([other.to(k.dtype), k]))
    loss = MoCoV3ContrastiveLoss(0.2)(torch.tensor(q64), torch.tensor(k_local)).item()
    expected = ctr_reference(q64, np.concatenate([k_other, k_local]), 0.2, offset=4)
    assert loss == pytest.approx(expected, rel=1e-6)
    wrong_labels = ctr_reference(q64, np.concatenate([k_other, k_local]), 0.2, offset=0)
    assert abs(wrong_labels - expected) > 1e-2
    local_only = MoCoV3ContrastiveLoss(0.2, gather_distributed=False)(torch.tensor(q64), torch.tensor(k_local))
    assert local_only.item() == pytest.approx(ctr_reference(q64, k_local, 0.2), rel=1e-6)


def test_loss_under_bf16_autocast_is_computed_in_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    q, k = _data(5, n=64, d=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pq, pk = lin(torch.tensor(q, dtype=torch.float32)), lin(torch.tensor(k, dtype=torch.float32))
        assert pq.dtype == torch.bfloat16
        loss = MoCoV3ContrastiveLoss(0.2)(pq, pk)
    assert loss.dtype == torch.float32
    expected = ctr_reference(pq.detach().double().numpy(), pk.detach().double().numpy(), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("sq", "sk"), [((4, 8), (4, 7)), ((4, 8), (3, 8)), ((4,), (4,))])
def test_invalid_shapes(sq, sk):
    with pytest.raises(ValueError, match=r"expected query and key of the same \[n, d\] shape"):
        MoCoV3ContrastiveLoss()(torch.randn(*sq), torch.randn(*sk))


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_invalid_temperature(t):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        MoCoV3ContrastiveLoss(t)
