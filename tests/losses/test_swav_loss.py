"""SwAVLoss against a float64 loop implementation of SwAV's swapped prediction (Caron et al. 2020, Eq. 1-2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses.swav import SwAVLoss


def swav_reference(
    scores: np.ndarray, codes: np.ndarray, crops: list[int], temperature: float, include_self: bool = False
) -> float:
    """1/|A| sum_i 1/(V-1) sum_{v != i} -(1/B) sum_b sum_k q_i[b, k] log softmax(p_v[b] / T)_k, with loops
    (``include_self``: the wrong loss that also lets crop i predict its own code)."""
    num_crops, batch, k = scores.shape
    total = 0.0
    for a, i in enumerate(crops):
        sub = 0.0
        for v in range(num_crops):
            if v == i and not include_self:
                continue
            ce = 0.0
            for b in range(batch):
                logits = [float(scores[v, b, j]) / temperature for j in range(k)]
                top = max(logits)
                log_z = top + math.log(sum(math.exp(x - top) for x in logits))
                ce -= sum(float(codes[a, b, j]) * (logits[j] - log_z) for j in range(k))
            sub += ce / batch
        total += sub / (num_crops - 1)
    return total / len(crops)


def reference_grad(scores: np.ndarray, codes: np.ndarray, crops: list[int], temperature: float) -> np.ndarray:
    """dL/dp_v = sum_{i != v} (sum_k q_i softmax(p_v / T) - q_i) / (T B (V-1) |A|), with loops."""
    num_crops, batch, k = scores.shape
    grad = np.zeros_like(scores, dtype=np.float64)
    for a, i in enumerate(crops):
        for v in range(num_crops):
            if v == i:
                continue
            for b in range(batch):
                logits = scores[v, b].astype(np.float64) / temperature
                soft = np.exp(logits - logits.max())
                soft /= soft.sum()
                q = codes[a, b].astype(np.float64)
                grad[v, b] += (q.sum() * soft - q) / (temperature * batch * (num_crops - 1) * len(crops))
    return grad


def _data(seed: int, num_crops: int = 4, batch: int = 3, k: int = 5, num_assign: int = 2):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-1, 1, size=(num_crops, batch, k))  # cosine scores
    codes = rng.uniform(0.01, 1, size=(num_assign, batch, k))
    return scores, codes / codes.sum(-1, keepdims=True)  # each code sums to 1


@pytest.mark.parametrize(("seed", "crops", "temperature"), [(0, [0, 1], 0.1), (1, [0, 1], 0.5), (2, [2], 0.1)])
def test_matches_float64_reference_value_and_gradient(seed, crops, temperature):
    scores, codes = _data(seed, num_assign=len(crops))
    s = torch.tensor(scores, dtype=torch.float32, requires_grad=True)
    loss = SwAVLoss(temperature, crops)(s, torch.tensor(codes, dtype=torch.float32))
    loss.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(swav_reference(scores, codes, crops, temperature), rel=1e-6)
    np.testing.assert_allclose(s.grad.double().numpy(), reference_grad(scores, codes, crops, temperature), atol=1e-6)


def test_a_crop_never_predicts_its_own_code():
    scores, codes = _data(3)
    loss = SwAVLoss(0.1, [0, 1])(torch.tensor(scores), torch.tensor(codes)).item()
    assert loss == pytest.approx(swav_reference(scores, codes, [0, 1], 0.1), rel=1e-6)
    assert abs(loss - swav_reference(scores, codes, [0, 1], 0.1, include_self=True)) > 0.1


def test_no_gradient_into_the_codes():
    scores, codes = _data(4)
    s = torch.tensor(scores, requires_grad=True)
    q = torch.tensor(codes, requires_grad=True)
    SwAVLoss()(s, q).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and q.grad is None


def test_loss_under_bf16_autocast_is_computed_in_fp32():
    """Scores out of a matmul under autocast are bf16; the loss equals the float64 reference on them to
    ~1e-6 (log-softmax in bf16 would be off by ~1e-2)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, bias=False)
    scores_in = torch.randn(4, 16, 8)
    _, codes = _data(5, batch=16, k=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = lin(scores_in)
        assert scores.dtype == torch.bfloat16
        loss = SwAVLoss(0.1, [0, 1])(scores, torch.tensor(codes, dtype=torch.float32))
    assert loss.dtype == torch.float32
    expected = swav_reference(scores.detach().double().numpy(), codes, [0, 1], 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the same formula in bf16 is off by far more than the tolerance above
    log_p = torch.log_softmax(scores.detach() / 0.1, dim=-1)  # bf16
    q = torch.tensor(codes, dtype=torch.bfloat16)
    ce = torch.stack([-(q[a] * log_p[v]).sum(-1).mean() for a in range(2) for v in range(4) if v != a])
    assert abs(ce.float().mean().item() - expected) > 100 * 1e-6 * expected


@pytest.mark.parametrize(
    ("scores", "codes", "match"),
    [
        ((4, 3, 5), (2, 3, 6), r"expected scores \[V, B, K\] and codes \[2, B, K\]"),
        ((4, 3, 5), (1, 3, 5), r"expected scores \[V, B, K\] and codes \[2, B, K\]"),
        ((3, 5), (2, 3, 5), r"expected scores \[V, B, K\]"),
        ((1, 3, 5), (2, 3, 5), r"needs >= 2 crops including crops_for_assign=\[0, 1\], got 1 crops"),
    ],
)
def test_invalid_shapes(scores, codes, match):
    with pytest.raises(ValueError, match=match):
        SwAVLoss()(torch.randn(*scores), torch.rand(*codes))


def test_too_few_crops_for_the_assignment_crops():
    with pytest.raises(ValueError, match=r"needs >= 2 crops including crops_for_assign=\[0, 2\], got 2 crops"):
        SwAVLoss(0.1, [0, 2])(torch.randn(2, 3, 5), torch.rand(2, 3, 5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"crops_for_assign": []}, r"crops_for_assign must be distinct crop indices >= 0, got \[\]"),
        ({"crops_for_assign": [0, 0]}, r"distinct crop indices >= 0, got \[0, 0\]"),
        ({"crops_for_assign": [-1]}, r"distinct crop indices >= 0, got \[-1\]"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwAVLoss(**kwargs)
