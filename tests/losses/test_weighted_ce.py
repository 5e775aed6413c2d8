"""ClassWeightedCrossEntropy against a numpy implementation of ODC's re-weighted loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses import ClassWeightedCrossEntropy


def weighted_ce_reference(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> float:
    """sum_i w_{y_i} * (-log softmax(x_i)_{y_i}) / sum_i w_{y_i}, with explicit loops."""
    num, den = 0.0, 0.0
    for i in range(x.shape[0]):
        row = [float(v) for v in x[i]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        nll = log_z - row[int(y[i])]
        wi = 1.0 if w is None else float(w[int(y[i])])
        num += wi * nll
        den += wi
    return num / den


def _data(seed, b=12, k=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=3.0, size=(b, k))
    y = rng.integers(0, k, size=b)
    y[:k] = np.arange(k)  # every class present
    w = rng.uniform(0.1, 4.0, size=k)
    return x, y, w


@pytest.mark.parametrize(("seed", "b", "k"), [(0, 12, 5), (1, 7, 3), (2, 32, 10)])
def test_matches_numpy_reference(seed, b, k):
    x, y, w = _data(seed, b, k)
    loss = ClassWeightedCrossEntropy()(torch.tensor(x, dtype=torch.float32), torch.tensor(y), torch.tensor(w))
    assert loss.item() == pytest.approx(weighted_ce_reference(x, y, w), rel=1e-5, abs=1e-5)


def test_weights_change_the_loss():
    x, y, w = _data(3)
    weighted = weighted_ce_reference(x, y, w)
    assert abs(weighted - weighted_ce_reference(x, y, None)) > 1e-3  # the check below is not vacuous
    loss = ClassWeightedCrossEntropy()(torch.tensor(x), torch.tensor(y), torch.tensor(w))
    assert loss.item() == pytest.approx(weighted, rel=1e-5)


def test_odc_inverse_sqrt_count_weights():
    x, y, _ = _data(4, 20, 4)
    counts = np.bincount(y, minlength=4).astype(np.float64)
    w = counts**-0.5
    loss = ClassWeightedCrossEntropy()(torch.tensor(x), torch.tensor(y), torch.tensor(w, dtype=torch.float32))
    assert loss.item() == pytest.approx(weighted_ce_reference(x, y, w), rel=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_weight_scale_invariance(scale):
    x, y, w = _data(5)
    fn = ClassWeightedCrossEntropy()
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    base = fn(xt, yt, torch.tensor(w, dtype=torch.float32)).item()
    scaled = fn(xt, yt, torch.tensor(w * scale, dtype=torch.float32)).item()
    assert scaled == pytest.approx(base, rel=1e-5)


def test_no_weights_is_plain_mean_ce():
    x, y, _ = _data(6)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    fn = ClassWeightedCrossEntropy()
    assert fn(xt, yt).item() == pytest.approx(weighted_ce_reference(x, y, None), rel=1e-5)
    assert fn(xt, yt, torch.ones(x.shape[1])).item() == pytest.approx(fn(xt, yt).item(), rel=1e-6)


def test_loss_under_bf16_autocast_is_computed_in_fp32():
    """Logits that come out of a matmul under autocast are bf16; the loss upcasts them and equals the
    float64 reference on those logits to ~1e-6 (a bf16 computation is off by ~1e-2)."""
    x, y, w = _data(7, b=64, k=10)
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(torch.tensor(x, dtype=torch.float32))
        assert logits.dtype == torch.bfloat16
        loss = ClassWeightedCrossEntropy()(logits, torch.tensor(y), torch.tensor(w, dtype=torch.float32))
    assert loss.dtype == torch.float32
    expected = weighted_ce_reference(logits.double().detach().numpy(), y, w)
    assert loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-6)
    bf16 = torch.nn.functional.cross_entropy(
        logits.detach(), torch.tensor(y), weight=torch.tensor(w, dtype=torch.bfloat16)
    )  # the same loss left in bf16
    assert abs(bf16.item() - expected) > 50 * 1e-5


@pytest.mark.parametrize(
    ("xs", "ys", "ws"),
    [
        ((4, 3), (5,), None),  # batch mismatch
        ((4,), (4,), None),  # logits not 2-D
        ((4, 3), (4, 1), None),  # labels not 1-D
        ((4, 3), (4,), (4,)),  # weight length
        ((4, 3), (4,), (1, 3)),  # weight rank
    ],
)
def test_shape_errors(xs, ys, ws):
    w = None if ws is None else torch.ones(ws)
    match = r"class_weight must be \[K=3\]" if ws else r"expected logits \[B, K\] and labels \[B\]"
    with pytest.raises(ValueError, match=match):
        ClassWeightedCrossEntropy()(torch.randn(xs), torch.zeros(ys, dtype=torch.long), w)
