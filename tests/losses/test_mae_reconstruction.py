"""MAEReconstructionLoss against a numpy implementation of the MAE reconstruction target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from references import mae_reference
from selfsup.losses import MAEReconstructionLoss


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


def test_bool_mask():
    pred, target, mask = _data(8)
    loss = MAEReconstructionLoss()(_t(pred), _t(target), torch.tensor(mask.astype(bool)))
    assert loss.item() == pytest.approx(mae_reference(pred, target, mask, True), rel=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_under_bf16_autocast_is_computed_in_fp32(norm_pix):
    """The decoder's prediction comes out of a matmul under autocast (bf16); the loss upcasts it and
    equals the float64 reference on that prediction to ~1e-6, not to bf16's ~1e-2."""
    pred, target, mask = _data(9, b=4, n=16, p=48)
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred_bf16 = lin(_t(pred))
        assert pred_bf16.dtype == torch.bfloat16
        loss = MAEReconstructionLoss(norm_pix=norm_pix)(pred_bf16, _t(target), _t(mask))
    assert loss.dtype == torch.float32
    expected = mae_reference(pred_bf16.double().detach().numpy(), target, mask, norm_pix)
    assert loss.item() == pytest.approx(expected, rel=2e-6)
    t = _t(target).bfloat16()  # the same computation in bf16 throughout
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    unguarded = (((pred_bf16.detach() - t) ** 2).mean(-1) * _t(mask).bfloat16()).sum() / _t(mask).sum()
    assert abs(unguarded.item() - expected) > 50 * 2e-6 * expected


@pytest.mark.parametrize(
    ("ps", "ts", "ms", "match"),
    [
        ((2, 6, 12), (2, 6, 11), (2, 6), "pred and target must both be"),  # pred/target mismatch
        ((2, 6), (2, 6), (2,), "pred and target must both be"),  # not 3-D
        ((2, 6, 12), (2, 6, 12), (2, 5), r"mask must be \[B, L\] = \(2, 6\), got \(2, 5\)"),  # mask length
        ((2, 6, 12), (2, 6, 12), (2, 6, 1), r"mask must be \[B, L\]"),  # mask rank
    ],
)
def test_shape_errors(ps, ts, ms, match):
    with pytest.raises(ValueError, match=match):
        MAEReconstructionLoss()(torch.randn(ps), torch.randn(ts), torch.ones(ms))


def test_invalid_eps():
    with pytest.raises(ValueError, match="eps must be > 0, got 0.0"):
        MAEReconstructionLoss(eps=0.0)
