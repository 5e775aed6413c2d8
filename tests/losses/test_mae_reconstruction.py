"""MAEReconstructionLoss against a numpy implementation of the MAE reconstruction target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.losses import MAEReconstructionLoss


def mae_reference(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, norm_pix: bool, eps: float = 1e-6) -> float:
    """Per-patch loops: normalise the target (unbiased var), MSE over pixels, mask-weighted mean."""
    b, n, p = pred.shape
    num, den = 0.0, 0.0
    for i in range(b):
        for j in range(n):
            t = target[i, j].astype(np.float64)
            if norm_pix:
                mean = t.sum() / p
                var = ((t - mean) ** 2).sum() / (p - 1)
                t = (t - mean) / np.sqrt(var + eps)
            mse = sum((float(pred[i, j, k]) - float(t[k])) ** 2 for k in range(p)) / p
            num += mask[i, j] * mse
            den += mask[i, j]
    return num / den


def _data(seed, b=2, n=6, p=12):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(b, n, p))
    target = rng.normal(loc=3.0, scale=2.0, size=(b, n, p))
    mask = (rng.random((b, n)) < 0.5).astype(np.float64)
    mask[:, 0] = 1.0  # at least one removed patch per row
    mask[:, 1] = 0.0  # and one kept
    return pred, target, mask


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize(("seed", "shape"), [(0, (2, 6, 12)), (1, (3, 4, 48)), (2, (1, 9, 3))])
def test_matches_numpy_reference(norm_pix, seed, shape):
    pred, target, mask = _data(seed, *shape)
    loss = MAEReconstructionLoss(norm_pix=norm_pix)(_t(pred), _t(target), _t(mask))
    expected = mae_reference(pred, target, mask, norm_pix)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_unbiased_variance_is_used():
    # with few pixels per patch, biased and unbiased variance differ a lot: only ddof=1 matches
    pred, target, mask = _data(3, 2, 4, 3)
    loss = MAEReconstructionLoss(norm_pix=True)(_t(pred), _t(target), _t(mask)).item()
    assert loss == pytest.approx(mae_reference(pred, target, mask, True), rel=1e-5)
    biased_target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
    biased = mae_reference(pred, biased_target, mask, norm_pix=False)
    assert abs(loss - biased) > 1e-3


def test_eps_in_normalisation():
    # constant target patches: var = 0, so t_hat = 0 / sqrt(eps) = 0 and the loss is mean(pred^2)
    pred = np.full((1, 2, 4), 0.5)
    target = np.full((1, 2, 4), 7.0)
    mask = np.array([[1.0, 1.0]])
    loss = MAEReconstructionLoss(norm_pix=True, eps=1e-6)(_t(pred), _t(target), _t(mask))
    assert loss.item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_unmasked_patches_do_not_matter(norm_pix):
    pred, target, mask = _data(4)
    loss_fn = MAEReconstructionLoss(norm_pix=norm_pix)
    before = loss_fn(_t(pred), _t(target), _t(mask)).item()
    pred2 = pred.copy()
    pred2[mask == 0] += 100.0 * np.random.default_rng(5).normal(size=pred2[mask == 0].shape)
    target2 = target.copy()
    target2[mask == 0] = -target2[mask == 0] * 3.0
    after = loss_fn(_t(pred2), _t(target2), _t(mask)).item()
    assert after == pytest.approx(before, rel=1e-6)
    # ... while changing a masked patch does
    pred3 = pred.copy()
    pred3[mask == 1] += 1.0
    assert loss_fn(_t(pred3), _t(target), _t(mask)).item() != pytest.approx(before, rel=1e-3)


def test_gradient_only_on_masked_patches():
    pred, target, mask = _data(6)
    p = _t(pred).requires_grad_(True)
    MAEReconstructionLoss()(p, _t(target), _t(mask)).backward()
    g = p.grad.abs().sum(-1).numpy()
    assert (g[mask == 0] == 0).all()
    assert (g[mask == 1] > 0).all()


def test_bool_mask_and_bf16_autocast():
    pred, target, mask = _data(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MAEReconstructionLoss()(_t(pred), _t(target), torch.tensor(mask.astype(bool)))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mae_reference(pred, target, mask, True), rel=1e-5)


@pytest.mark.parametrize(
    ("ps", "ts", "ms"),
    [
        ((2, 6, 12), (2, 6, 11), (2, 6)),  # pred/target mismatch
        ((2, 6), (2, 6), (2,)),  # not 3-D
        ((2, 6, 12), (2, 6, 12), (2, 5)),  # mask length
        ((2, 6, 12), (2, 6, 12), (2, 6, 1)),  # mask rank
    ],
)
def test_shape_errors(ps, ts, ms):
    with pytest.raises(ValueError):
        MAEReconstructionLoss()(torch.randn(ps), torch.randn(ts), torch.ones(ms))


def test_invalid_eps():
    with pytest.raises(ValueError):
        MAEReconstructionLoss(eps=0.0)
