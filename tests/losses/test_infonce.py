"""InfoNCELoss against a float64 loop over MoCo's Eq. 1 (He et al. 2020; van den Oord et al. 2018, Eq. 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses.infonce import InfoNCELoss


def infonce_reference(q: np.ndarray, k: np.ndarray, negatives: np.ndarray, t: float) -> float:
    """mean_i -log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) ), explicit loops in float64;
    ``negatives`` [K, d] (shared) or [n, K, d] (per query)."""
    total = 0.0
    for i in range(len(q)):
        negs = negatives if negatives.ndim == 2 else negatives[i]
        pos = sum(float(a) * float(b) for a, b in zip(q[i], k[i])) / t
        logits = [pos] + [sum(float(a) * float(b) for a, b in zip(q[i], n)) / t for n in negs]
        top = max(logits)
        total += -(pos - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(q)


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_negatives_match_the_formula(seed, t):
    rng = np.random.default_rng(seed)
    q, k, neg = _unit(rng, 5, 8), _unit(rng, 5, 8), _unit(rng, 11, 8)
    loss = InfoNCELoss(t)(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, neg)))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(infonce_reference(q, k, neg, t), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_query_negatives_match_the_formula(seed):
    rng = np.random.default_rng(seed)
    q, k, neg = _unit(rng, 4, 6), _unit(rng, 4, 6), _unit(rng, 4, 7, 6)
    loss = InfoNCELoss(0.1)(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, neg)))
    assert loss.item() == pytest.approx(infonce_reference(q, k, neg, 0.1), rel=1e-5, abs=1e-6)
    shared_first = infonce_reference(q, k, neg[0], 0.1)  # every query against query 0's negatives would differ
    assert abs(loss.item() - shared_first) > 1e-3


def test_the_positive_is_the_row_paired_key_at_index_zero():
    """A perfect pairing (q_i = k_i, orthogonal negatives) gives a low loss; the same keys in another row order a
    high one; and the value depends on T as -log(e^{1/T} / (e^{1/T} + K)) exactly."""
    eye = torch.eye(8)
    q, k, neg = eye[:3], eye[:3], eye[3:]  # K = 5 orthogonal negatives
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 5))
    assert InfoNCELoss(t)(q, k, neg).item() == pytest.approx(expected, rel=1e-6)
    assert InfoNCELoss(t)(q, k.roll(1, 0), neg).item() > expected + 1.0


def test_gradients_match_the_float64_formula():
    rng = np.random.default_rng(3)
    q, k, neg = _unit(rng, 3, 5), _unit(rng, 3, 5), _unit(rng, 6, 5)
    t = 0.2
    tq, tk, tn = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, neg))
    InfoNCELoss(t)(tq, tk, tn).backward()
    # d/dq_i = (sum_c p_ic v_c - k_i) / (t n), v_0 = k_i, v_j = n_j, p = softmax of the logits (by hand)
    for i in range(3):
        cands = np.vstack([k[i], neg])
        logits = cands @ q[i] / t
        p = np.exp(logits - logits.max())
        p /= p.sum()
        grad_q = (p @ cands - k[i]) / (t * 3)
        np.testing.assert_allclose(tq.grad[i].numpy(), grad_q, atol=1e-6)  # computed in float32 inside
        np.testing.assert_allclose(tk.grad[i].numpy(), (p[0] - 1) * q[i] / (t * 3), atol=1e-6)
    assert tn.grad is not None and tn.grad.abs().sum() > 0  # the loss detaches nothing itself


def test_under_bf16_autocast_it_is_computed_in_float32():
    """bf16 embeddings out of an autocast matmul: the loss is the float64 formula on those values to ~1e-5 (logits
    computed in bf16 would be off by ~1e-2 at T = 0.07)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(3, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, neg = (torch.nn.functional.normalize(lin(a), dim=1) for a in x)
        assert q.dtype == torch.bfloat16
        loss = InfoNCELoss(0.07)(q, k, neg)
    assert loss.dtype == torch.float32
    expected = infonce_reference(*(a.detach().double().numpy() for a in (q, k, neg)), 0.07)
    assert loss.item() == pytest.approx(expected, abs=2e-5)
    with torch.no_grad():  # the same in bf16 (what the float32 cast avoids)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ neg.T], 1) / 0.07
        in_bf16 = torch.nn.functional.cross_entropy(logits, torch.zeros(64, dtype=torch.long)).item()
    assert abs(in_bf16 - expected) > 20 * 2e-5


@pytest.mark.parametrize("t", [0.0, -0.1, True])
def test_invalid_temperature(t):
    with pytest.raises(ValueError, match="InfoNCELoss temperature must be a number > 0"):
        InfoNCELoss(t)


@pytest.mark.parametrize(
    ("sq", "sk", "sn"),
    [
        ((4, 8), (4, 7), (5, 8)),
        ((4, 8), (3, 8), (5, 8)),
        ((4,), (4,), (5, 4)),
        ((4, 8), (4, 8), (5, 7)),
        ((4, 8), (4, 8), (3, 5, 8)),
    ],
)
def test_invalid_shapes(sq, sk, sn):
    with pytest.raises(ValueError, match="InfoNCELoss expects"):
        InfoNCELoss(0.2)(torch.randn(*sq), torch.randn(*sk), torch.randn(*sn))
