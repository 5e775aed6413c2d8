"""NPID's NCE loss against float64 loops written from the paper (Wu et al. 2018, Eq. 4-6): uniform noise,
the constant Z estimated from the first batch; values and gradients. (NPID's softmax variant is
InfoNCELoss, tested in test_infonce.py and through the algorithm in tests/algorithms/test_npid.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses.npid import NPIDNCELoss


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(seed: int, b: int = 5, m: int = 7, d: int = 6, shared: bool = False):
    rng = np.random.default_rng(seed)
    q, k = _unit(rng, b, d), _unit(rng, b, d)
    neg = _unit(rng, m, d) if shared else _unit(rng, b, m, d)
    return q, k, neg


def _neg_row(neg: np.ndarray, i: int) -> np.ndarray:
    return neg if neg.ndim == 2 else neg[i]


def nce_reference(q, k, neg, t, n, log_z=None):
    """J = mean_i [ -log h(pos) - sum_j log(1 - h(neg_j)) ], h = P / (P + m / n), P = exp(s) / Z, and Z from
    this batch (Eq. 6: n times the mean of exp(s) over its rows and negatives) unless given; also d J / d q."""
    b, d = q.shape
    m = _neg_row(neg, 0).shape[0]
    if log_z is None:
        total = sum(math.exp(float(np.dot(q[i], c)) / t) for i in range(b) for c in _neg_row(neg, i))
        log_z = math.log(n * total / (b * m))
    z = math.exp(log_z)
    loss, grad = 0.0, np.zeros((b, d))
    for i in range(b):
        p_pos = math.exp(float(np.dot(q[i], k[i])) / t) / z
        h_pos = p_pos / (p_pos + m / n)
        loss -= math.log(h_pos)
        grad[i] -= (1 - h_pos) * k[i] / t  # d(-log h)/ds = -(1 - h)
        for c in _neg_row(neg, i):
            p = math.exp(float(np.dot(q[i], c)) / t) / z
            h = p / (p + m / n)
            loss -= math.log(1 - h)
            grad[i] += h * c / t  # d(-log(1 - h))/ds = h
    return loss / b, grad / b, log_z


def _t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


@pytest.mark.parametrize("shared", [False, True], ids=["per-row-negatives", "shared-negatives"])
@pytest.mark.parametrize("seed", [0, 1])
def test_nce_matches_the_float64_reference(seed, shared):
    q, k, neg = _data(seed, shared=shared)
    fn = NPIDNCELoss(temperature=0.3, num_samples=50)
    qt = _t(q, grad=True)
    loss = fn(qt, _t(k), _t(neg))
    loss.backward()
    want, want_grad, log_z = nce_reference(q, k, neg, 0.3, 50)
    assert fn.log_z.item() == pytest.approx(log_z, abs=1e-5)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(qt.grad.numpy(), want_grad, atol=1e-5)


def test_nce_keeps_the_z_of_its_first_batch():
    """Z is estimated once (the paper: "from initial batches"), then constant: a second batch uses the first Z."""
    fn = NPIDNCELoss(temperature=0.1, num_samples=1000)
    assert math.isnan(fn.log_z.item()) and "log_z" in fn.state_dict()
    first, second = _data(0, m=9), _data(1, m=9)
    fn(*map(_t, first))
    _, _, log_z = nce_reference(*first, 0.1, 1000)
    loss = fn(*map(_t, second)).item()
    assert fn.log_z.item() == pytest.approx(log_z, abs=1e-5)
    with_old_z, _, _ = nce_reference(*second, 0.1, 1000, log_z=log_z)
    with_own_z, _, _ = nce_reference(*second, 0.1, 1000)
    assert loss == pytest.approx(with_old_z, rel=1e-5)
    assert abs(with_old_z - with_own_z) > 1e-3  # re-estimating would differ


def test_nce_is_stable_where_exp_overflows_float32():
    """Aligned features at a small temperature: exp(s) = exp(1 / 0.005) overflows float32; log space does not."""
    q, k, neg = _data(2)
    fn = NPIDNCELoss(temperature=0.005, num_samples=10)
    fn.log_z.fill_(0.0)
    loss = fn(_t(q), _t(q), _t(neg))
    assert torch.isfinite(loss)


def test_computed_in_float32_under_bf16_autocast():
    """bf16 features (a matmul under autocast) give the float64 reference on those bf16 values to ~1e-5."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    q, k, neg = _data(3, b=16, m=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb = lin(_t(q))
        assert qb.dtype == torch.bfloat16
        loss = NPIDNCELoss(temperature=0.1, num_samples=100)(qb, _t(k).bfloat16(), _t(neg).bfloat16())
    assert loss.dtype == torch.float32
    args = (qb.detach().double().numpy(), _t(k).bfloat16().double().numpy(), _t(neg).bfloat16().double().numpy())
    want = nce_reference(*args, 0.1, 100)[0]
    assert loss.item() == pytest.approx(want, rel=2e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        NPIDNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        NPIDNCELoss(num_samples=0)
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"expected q and k of the same \[B, d\] shape"):
        NPIDNCELoss(num_samples=10)(q, torch.randn(3, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"expected negatives of shape \[m, 8\] or \[4, m, 8\]"):
        NPIDNCELoss(num_samples=10)(q, q, torch.randn(3, 5, 8))
