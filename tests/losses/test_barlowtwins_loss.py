"""BarlowTwinsLoss against a loop implementation of the paper's cross-correlation loss (Zbontar et al. 2021,
Eq. 1-2), values and gradients (central differences of the reference, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from references import as_rank_1_of_2, numeric_grad
from selfsup.losses.barlowtwins import BarlowTwinsLoss


def barlow_reference(z1: np.ndarray, z2: np.ndarray, lambd: float = 0.0051, eps: float = 1e-5) -> float:
    """Standardise each column over the batch (mean 0, biased variance 1), C_ij = sum_b zA_bi zB_bj / N,
    sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2; loops, float64."""
    n, d = z1.shape

    def standardise(z):
        out = np.zeros((n, d))
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            for b in range(n):
                out[b, j] = (z[b, j] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = standardise(z1.astype(np.float64)), standardise(z2.astype(np.float64))
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b_[k, j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def _data(seed: int, n: int = 6, d: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=(1, d)) + rng.normal(size=(1, d))
    return z1, z1 + 0.7 * rng.normal(size=(n, d))  # correlated views, columns of different scales


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_loop_reference(seed):
    z1, z2 = _data(seed)
    loss = BarlowTwinsLoss()(torch.tensor(z1), torch.tensor(z2))
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(barlow_reference(z1, z2), rel=1e-12)
    loss32 = BarlowTwinsLoss(lambd=0.3)(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32))
    assert loss32.dtype == torch.float32 and loss32.item() == pytest.approx(barlow_reference(z1, z2, 0.3), rel=1e-5)


def test_lambda_weighs_only_the_off_diagonal_and_identity_views_have_no_on_diagonal_loss():
    z1, z2 = _data(3, n=8, d=5)
    on = barlow_reference(z1, z2, lambd=0.0)
    off = barlow_reference(z1, z2, lambd=1.0) - on
    assert on > 0 and off > 0
    assert BarlowTwinsLoss(lambd=0.2)(torch.tensor(z1), torch.tensor(z2)).item() == pytest.approx(on + 0.2 * off)
    # identical views: C_ii = var / (var + eps) ~ 1, so only the redundancy term remains
    same = BarlowTwinsLoss(lambd=0.0)(torch.tensor(z1), torch.tensor(z1)).item()
    assert same < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_central_differences_of_the_reference(seed):
    z1, z2 = _data(seed, n=5, d=3)
    t1, t2 = torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)
    BarlowTwinsLoss(lambd=0.5)(t1, t2).backward()
    g1 = numeric_grad(lambda x: barlow_reference(x, z2, 0.5), z1)
    g2 = numeric_grad(lambda x: barlow_reference(z1, x, 0.5), z2)
    np.testing.assert_allclose(t1.grad.numpy(), g1, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(t2.grad.numpy(), g2, rtol=1e-6, atol=1e-8)


def test_statistics_are_over_the_whole_batch_not_per_half():
    """The loss of a batch is not the mean of its halves' losses (what per-rank statistics would give)."""
    z1, z2 = _data(4, n=8, d=4)
    f = BarlowTwinsLoss()
    whole = f(torch.tensor(z1), torch.tensor(z2)).item()
    halves = (
        f(torch.tensor(z1[:4]), torch.tensor(z2[:4])).item() + f(torch.tensor(z1[4:]), torch.tensor(z2[4:])).item()
    ) / 2
    assert whole == pytest.approx(barlow_reference(z1, z2)) and abs(whole - halves) > 1e-2


def test_on_rank_1_of_2_statistics_and_c_are_over_the_gathered_batch(monkeypatch):
    """Rank 1 of 2 (all_gather_with_grad emulated: rank 0's rows, then its own): the loss is the reference on
    the whole batch of 8, and its own rows get that loss's gradient with respect to them."""
    z1, z2 = _data(5, n=8, d=4)
    as_rank_1_of_2(monkeypatch, z1[:4], z2[:4])  # gathers z1's rows, then z2's
    t1, t2 = torch.tensor(z1[4:], requires_grad=True), torch.tensor(z2[4:], requires_grad=True)
    loss = BarlowTwinsLoss(lambd=0.5)(t1, t2)
    loss.backward()
    assert loss.item() == pytest.approx(barlow_reference(z1, z2, 0.5), rel=1e-12)
    g1 = numeric_grad(lambda x: barlow_reference(np.concatenate([z1[:4], x]), z2, 0.5), z1[4:])
    np.testing.assert_allclose(t1.grad.numpy(), g1, rtol=1e-6, atol=1e-8)
    assert abs(barlow_reference(z1[4:], z2[4:], 0.5) - loss.item()) > 1e-2  # the local batch's loss differs


def test_loss_under_bf16_autocast_is_the_fp32_loss():
    """The same fp32 inputs give the fp32 loss inside bf16 autocast (the matmul that forms C would run in bf16
    without ``autocast(enabled=False)``, off by ~1e-2 of the loss)."""
    torch.manual_seed(0)
    z1 = torch.randn(64, 32)
    z2 = z1 + 0.5 * torch.randn(64, 32)
    want = BarlowTwinsLoss()(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = BarlowTwinsLoss()(z1, z2)
        f = BarlowTwinsLoss()
        a, b = f.standardize(z1), f.standardize(z2)
        c = (a.T @ b) / 64  # what autocast would do to C
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert c.dtype == torch.bfloat16
    off = c.float().pow(2).sum() - c.float().diagonal().pow(2).sum()
    bf16_loss = (1 - c.float().diagonal()).pow(2).sum() + 0.0051 * off
    assert abs(bf16_loss.item() - want.item()) > 100 * 1e-6 * want.item()


@pytest.mark.parametrize(("s1", "s2"), [((4, 8), (4, 7)), ((4, 8), (3, 8)), ((4,), (4,))])
def test_invalid_shapes(s1, s2):
    with pytest.raises(ValueError, match=r"expected two \[n, D\] tensors of the same shape"):
        BarlowTwinsLoss()(torch.randn(*s1), torch.randn(*s2))


def test_one_image_is_refused():
    with pytest.raises(ValueError, match="needs at least 2 images in the batch"):
        BarlowTwinsLoss()(torch.randn(1, 4), torch.randn(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"lambd": -0.1}, "lambd must be >= 0"), ({"eps": 0.0}, "eps must be > 0")]
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BarlowTwinsLoss(**kwargs)
