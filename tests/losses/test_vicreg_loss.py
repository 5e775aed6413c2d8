"""VICRegLoss against a loop implementation of the paper's loss with the official code's weighting (Bardes et
al. 2022, Eq. 1-6; main_vicreg.py), values and gradients (central differences of the reference, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from references import as_rank_1_of_2, numeric_grad
from selfsup.losses.vicreg import VICRegLoss


def vicreg_terms_reference(z1: np.ndarray, z2: np.ndarray, eps: float = 1e-4) -> tuple[float, float, float]:
    """(invariance, variance, covariance): mean squared difference; per view the mean over dimensions of
    max(0, 1 - sqrt(unbiased var + eps)), halved and summed; per view the sum of squared off-diagonal
    entries of the unbiased covariance matrix divided by d, summed. Loops, float64."""
    n, d = z1.shape
    z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
    inv = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)
    var_term, cov_term = 0.0, 0.0
    for z in (z1, z2):
        means = [sum(z[b, j] for b in range(n)) / n for j in range(d)]
        hinge = 0.0
        for j in range(d):
            var = sum((z[b, j] - means[j]) ** 2 for b in range(n)) / (n - 1)
            hinge += max(0.0, 1.0 - math.sqrt(var + eps))
        var_term += hinge / d / 2
        off = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    cov = sum((z[b, j] - means[j]) * (z[b, k] - means[k]) for b in range(n)) / (n - 1)
                    off += cov**2
        cov_term += off / d
    return inv, var_term, cov_term


def vicreg_reference(z1, z2, sim=25.0, std=25.0, cov=1.0) -> float:
    s, v, c = vicreg_terms_reference(z1, z2)
    return sim * s + std * v + cov * c


def _data(seed: int, n: int = 6, d: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Columns with standard deviations on both sides of 1, so the hinge is active for some only."""
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)[None] + rng.normal(size=(1, d))
    z1[:, 1] += 0.8 * z1[:, 0]  # some covariance
    return z1, z1 + 0.5 * rng.normal(size=(n, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_loop_reference(seed):
    z1, z2 = _data(seed)
    f = VICRegLoss()
    loss = f(torch.tensor(z1), torch.tensor(z2))
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(vicreg_reference(z1, z2), rel=1e-12)
    terms = f.terms(torch.tensor(z1), torch.tensor(z2))
    want = vicreg_terms_reference(z1, z2)
    assert [terms[k].item() for k in ("invariance", "variance", "covariance")] == pytest.approx(want, rel=1e-12)
    assert all(w > 0 for w in want)  # every term is exercised
    loss32 = VICRegLoss(1.0, 2.0, 3.0)(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32))
    assert loss32.dtype == torch.float32 and loss32.item() == pytest.approx(vicreg_reference(z1, z2, 1, 2, 3), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_central_differences_of_the_reference(seed):
    z1, z2 = _data(seed, n=5, d=3)
    t1, t2 = torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)
    VICRegLoss()(t1, t2).backward()
    g1 = numeric_grad(lambda x: vicreg_reference(x, z2), z1)
    g2 = numeric_grad(lambda x: vicreg_reference(z1, x), z2)
    np.testing.assert_allclose(t1.grad.numpy(), g1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t2.grad.numpy(), g2, rtol=1e-6, atol=1e-7)


def test_variance_and_covariance_are_over_the_whole_batch():
    """The loss of a batch is not the mean of its halves' losses (what per-rank statistics would give)."""
    z1, z2 = _data(4, n=8, d=4)
    f = VICRegLoss()
    whole = f(torch.tensor(z1), torch.tensor(z2)).item()
    halves = (
        f(torch.tensor(z1[:4]), torch.tensor(z2[:4])).item() + f(torch.tensor(z1[4:]), torch.tensor(z2[4:])).item()
    ) / 2
    assert abs(whole - halves) > 1e-2


def test_on_rank_1_of_2_variance_and_covariance_are_over_the_gathered_batch(monkeypatch):
    """Rank 1 of 2 (all_gather_with_grad emulated: rank 0's rows, then its own): the variance and covariance
    terms are the reference's on the whole batch of 8, the invariance that of the rank's own 4 images, and its
    own rows get the gradient of that loss with respect to them."""
    z1, z2 = _data(5, n=8, d=4)
    as_rank_1_of_2(monkeypatch, z1[:4], z2[:4])  # gathers z1's rows, then z2's
    t1, t2 = torch.tensor(z1[4:], requires_grad=True), torch.tensor(z2[4:], requires_grad=True)
    terms = VICRegLoss().terms(t1, t2)
    VICRegLoss().weigh(terms).backward()

    def rank_loss(own1: np.ndarray) -> float:
        _, v, c = vicreg_terms_reference(np.concatenate([z1[:4], own1]), z2)
        return 25 * vicreg_terms_reference(own1, z2[4:])[0] + 25 * v + c

    s_local = vicreg_terms_reference(z1[4:], z2[4:])[0]
    _, v, c = vicreg_terms_reference(z1, z2)
    got = [terms[k].item() for k in ("invariance", "variance", "covariance")]
    assert got == pytest.approx([s_local, v, c], rel=1e-12)
    np.testing.assert_allclose(t1.grad.numpy(), numeric_grad(rank_loss, z1[4:]), rtol=1e-6, atol=1e-7)
    _, v_local, c_local = vicreg_terms_reference(z1[4:], z2[4:])
    assert abs(v_local - v) > 1e-3 and abs(c_local - c) > 1e-2  # the local batch's statistics differ


def test_loss_under_bf16_autocast_is_the_fp32_loss():
    """The same fp32 inputs give the fp32 loss inside bf16 autocast (without ``autocast(enabled=False)`` the
    covariance matmuls would run in bf16)."""
    torch.manual_seed(0)
    z1 = torch.randn(64, 32) * 0.8
    z2 = z1 + 0.3 * torch.randn(64, 32)
    want = VICRegLoss()(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = VICRegLoss()(z1, z2)
        zc = z1 - z1.mean(0)
        cov = zc.T @ zc / 63
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert cov.dtype == torch.bfloat16
    exact = VICRegLoss.covariance(z1)
    cov2 = cov.float().pow(2)
    assert abs((cov2.sum() - cov2.diagonal().sum()).item() / 32 - exact.item()) > 1e-4 * exact.item()


@pytest.mark.parametrize(("s1", "s2"), [((4, 8), (4, 7)), ((4, 8), (3, 8)), ((4,), (4,))])
def test_invalid_shapes(s1, s2):
    with pytest.raises(ValueError, match=r"expected two \[n, D\] tensors of the same shape"):
        VICRegLoss()(torch.randn(*s1), torch.randn(*s2))


def test_one_image_is_refused():
    with pytest.raises(ValueError, match="needs at least 2 images in the batch"):
        VICRegLoss()(torch.randn(1, 4), torch.randn(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim_coeff": -1.0}, "sim_coeff must be >= 0"),
        ({"cov_coeff": -1.0}, "cov_coeff"),
        ({"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VICRegLoss(**kwargs)
