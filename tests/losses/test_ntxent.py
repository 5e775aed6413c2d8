"""NTXentLoss against an independent numpy implementation of SimCLR Eq. 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from references import numeric_grad
from selfsup.losses import NTXentLoss


def ntxent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """Loop over the 2N anchors: l(i, j) = -log(exp(s_ij/t) / sum_{k != i} exp(s_ik/t)), cosine s."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    two_n = z.shape[0]
    n = two_n // 2
    total = 0.0
    for i in range(two_n):
        j = i + n if i < n else i - n  # the other view of the same image
        sims = []
        for k in range(two_n):
            cos = float(np.dot(z[i], z[k]) / (np.linalg.norm(z[i]) * np.linalg.norm(z[k])))
            sims.append(cos)
        denom = sum(math.exp(sims[k] / t) for k in range(two_n) if k != i)
        total += -math.log(math.exp(sims[j] / t) / denom)
    return total / two_n


@pytest.mark.parametrize(
    ("n", "d", "t", "seed"), [(1, 3, 0.5, 0), (2, 4, 0.1, 1), (5, 8, 0.5, 2), (8, 16, 1.0, 3), (7, 5, 0.2, 4)]
)
def test_matches_numpy_reference(n, d, t, seed):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d)) * rng.uniform(0.1, 5.0, size=(n, 1))  # unnormalised rows
    z2 = rng.normal(size=(n, d))
    loss = NTXentLoss(temperature=t, gather_distributed=False)(
        torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32)
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ntxent_reference(z1, z2, t), abs=1e-5, rel=1e-5)


def test_single_pair_is_zero_only_denominator():
    # n = 1: the only candidate besides the anchor is its positive, so each l = -log(1) = 0
    z1, z2 = torch.randn(1, 6), torch.randn(1, 6)
    assert NTXentLoss(0.3, gather_distributed=False)(z1, z2).item() == pytest.approx(0.0, abs=1e-6)


def test_invariant_to_row_scaling():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    loss = NTXentLoss(0.2, gather_distributed=False)
    scale = torch.rand(4, 1) * 10 + 0.1
    assert loss(z1 * scale, z2).item() == pytest.approx(loss(z1, z2).item(), abs=1e-5)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    n, d, t = 3, 4, 0.5
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a = torch.tensor(z1, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(z2, dtype=torch.float64, requires_grad=True)
    NTXentLoss(t, gather_distributed=False)(a, b).backward()
    g1 = numeric_grad(lambda x: ntxent_reference(x, z2, t), z1)
    g2 = numeric_grad(lambda x: ntxent_reference(z1, x, t), z2)
    for grad, num in ((a.grad.numpy(), g1), (b.grad.numpy(), g2)):
        # the loss upcasts to float32 internally, hence the loose-ish tolerance
        np.testing.assert_allclose(grad, num, atol=1e-4, rtol=1e-3)
    assert np.abs(a.grad.numpy()).max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_invalid_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=t)


@pytest.mark.parametrize(("s1", "s2"), [((4, 8), (4, 7)), ((4, 8), (3, 8)), ((4,), (4,)), ((2, 4, 8), (2, 4, 8))])
def test_invalid_shapes(s1, s2):
    with pytest.raises(ValueError, match=r"expected two \[n, d\] tensors of the same shape"):
        NTXentLoss(0.1)(torch.randn(*s1), torch.randn(*s2))


def test_gather_distributed_single_process_equals_local():
    torch.manual_seed(1)
    z1 = torch.randn(6, 10, requires_grad=True)
    z2 = torch.randn(6, 10, requires_grad=True)
    l_gather = NTXentLoss(0.1, gather_distributed=True)(z1, z2)
    g_gather = torch.autograd.grad(l_gather, (z1, z2))
    l_local = NTXentLoss(0.1, gather_distributed=False)(z1, z2)
    g_local = torch.autograd.grad(l_local, (z1, z2))
    assert l_gather.item() == pytest.approx(l_local.item(), abs=1e-7)
    for ga, gb in zip(g_gather, g_local):
        torch.testing.assert_close(ga, gb)


def test_identical_views_give_lower_loss_than_random_views():
    torch.manual_seed(2)
    z = torch.randn(16, 32)
    loss = NTXentLoss(0.05, gather_distributed=False)
    same = loss(z, z.clone()).item()
    rand = loss(z, torch.randn(16, 32)).item()
    assert same < rand
    assert same < 0.5 * math.log(2 * 16 - 1)  # well below the uniform-logits value log(2N - 1)


def _linear_outputs_under_bf16_autocast(seed: int, n: int = 16, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings as a model gives them under autocast: a matmul before the loss makes them bf16."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(24, d)
    x1, x2 = torch.randn(n, 24), torch.randn(n, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = lin(x1).detach(), lin(x2).detach()
    assert z1.dtype == z2.dtype == torch.bfloat16
    return z1, z2


def _unguarded_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The same formula with the similarity matmul left to autocast (what a loss without its fp32 guard does)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        sim = (z @ z.T / t).float()
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)])).item()


def test_loss_under_bf16_autocast_is_computed_in_fp32():
    """Under autocast the loss must upcast and keep its matmul in fp32: it then equals the float64
    reference on the (bf16-rounded) embeddings to ~1e-6 on every batch, while the same formula with the
    similarity matmul in bf16 is off by up to ~1e-3 (rounding errors partly cancel in the mean, so
    several batches are checked)."""
    t, tol = 0.1, 1e-5
    unguarded_errors = []
    for seed in range(8):
        z1, z2 = _linear_outputs_under_bf16_autocast(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = NTXentLoss(t, gather_distributed=False)(z1, z2)
        assert loss.dtype == torch.float32
        expected = ntxent_reference(z1.double().numpy(), z2.double().numpy(), t)
        assert loss.item() == pytest.approx(expected, abs=tol, rel=0), seed
        unguarded_errors.append(abs(_unguarded_ntxent(z1, z2, t) - expected))
    assert max(unguarded_errors) > 20 * tol  # the tolerance is far tighter than the autocast error
