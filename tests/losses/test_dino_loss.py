"""DINOLoss against a float64 loop implementation of DINO's loss (Caron et al. 2021, Eq. 3 and Algorithm 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.losses.dino import DINOLoss


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    z = sum(e)
    return [x / z for x in e]


def dino_reference(student: list, teacher: list, center, t_s: float, t_t: float, same_crop: bool = False) -> float:
    """Mean over pairs (a, b), b != a, of mean_i sum_k -softmax((t_a - c)/t_t)_ik log softmax(s_b/t_s)_ik;
    loops, float64. ``same_crop=True`` also includes the pairs a == b (what the paper excludes)."""
    c = [float(v) for v in np.asarray(center, dtype=np.float64).reshape(-1)]
    terms = []
    for a, ta in enumerate(teacher):
        for b, sb in enumerate(student):
            if a == b and not same_crop:
                continue
            total = 0.0
            for ti, si in zip(np.asarray(ta, np.float64), np.asarray(sb, np.float64)):
                p = _softmax([(float(x) - ck) / t_t for x, ck in zip(ti, c)])
                q = _softmax([float(x) / t_s for x in si])
                total += -sum(pk * math.log(qk) for pk, qk in zip(p, q))
            terms.append(total / len(ta))
    return sum(terms) / len(terms)


def _crops(seed: int, v: int = 4, g: int = 2, n: int = 3, k: int = 7):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, k)) for _ in range(v)], [rng.normal(size=(n, k)) for _ in range(g)], rng.normal(size=k)


@pytest.mark.parametrize(("v", "t_t"), [(4, 0.04), (2, 0.07), (5, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_formula_over_pairs_of_different_crops(seed, v, t_t):
    student, teacher, center = _crops(seed, v=v)
    loss = DINOLoss(0.1)(
        [torch.tensor(s, dtype=torch.float32) for s in student],
        [torch.tensor(t, dtype=torch.float32) for t in teacher],
        torch.tensor(center, dtype=torch.float32),
        t_t,
    )
    expected = dino_reference(student, teacher, center, 0.1, t_t)
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(dino_reference(student, teacher, center, 0.1, t_t, same_crop=True) - expected) > 1e-3


def test_center_and_temperatures_matter_and_a_tensor_temperature_works():
    student, teacher, center = _crops(2)
    s = [torch.tensor(x) for x in student]
    t = [torch.tensor(x) for x in teacher]
    c = torch.tensor(center).reshape(1, -1)
    loss = DINOLoss(0.2)(s, t, c, torch.tensor(0.07, dtype=torch.float64))
    assert loss.item() == pytest.approx(dino_reference(student, teacher, center, 0.2, 0.07), rel=1e-6)
    assert abs(dino_reference(student, teacher, 0 * center, 0.2, 0.07) - loss.item()) > 1e-3  # center used


def test_gradient_reaches_the_student_only():
    student, teacher, center = _crops(3, v=3)
    s = [torch.tensor(x, requires_grad=True) for x in student]
    t = [torch.tensor(x, requires_grad=True) for x in teacher]
    DINOLoss()(s, t, torch.tensor(center), 0.04).backward()
    assert all(x.grad is None for x in t)
    # d/ds_b of the reference by central differences, for one student crop (a global one: it also pairs with
    # the other global crop only)
    eps, num = 1e-6, np.zeros_like(student[0])
    for i in range(num.shape[0]):
        for j in range(num.shape[1]):
            up = [x.copy() for x in student]
            down = [x.copy() for x in student]
            up[0][i, j] += eps
            down[0][i, j] -= eps
            num[i, j] = (
                dino_reference(up, teacher, center, 0.1, 0.04) - dino_reference(down, teacher, center, 0.1, 0.04)
            ) / (2 * eps)
    np.testing.assert_allclose(s[0].grad.numpy(), num, atol=1e-6, rtol=1e-4)


def test_loss_under_bf16_autocast_is_computed_in_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 64)
    student, teacher, center = _crops(4, n=16, k=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = [lin(torch.tensor(x, dtype=torch.float32)) for x in student]
        t = [lin(torch.tensor(x, dtype=torch.float32)) for x in teacher]
        assert s[0].dtype == torch.bfloat16
        loss = DINOLoss()(s, t, torch.zeros(64), 0.04)
    assert loss.dtype == torch.float32
    expected = dino_reference(
        [x.detach().double().numpy() for x in s], [x.detach().double().numpy() for x in t], np.zeros(64), 0.1, 0.04
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_invalid_arguments():
    s = [torch.randn(3, 5) for _ in range(3)]
    t = s[:2]
    with pytest.raises(ValueError, match="student_temp must be > 0"):
        DINOLoss(0.0)
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        DINOLoss()(s, t, torch.zeros(5), 0.0)
    with pytest.raises(ValueError, match=r"expected 1 <= G <= V"):
        DINOLoss()(s[:1], t[:1], torch.zeros(5), 0.04)
    with pytest.raises(ValueError, match=r"expected 1 <= G <= V"):
        DINOLoss()(s[:2], s, torch.zeros(5), 0.04)
    with pytest.raises(ValueError, match=r"of one shape"):
        DINOLoss()([*s[:2], torch.randn(3, 4)], t, torch.zeros(5), 0.04)
    with pytest.raises(ValueError, match="expected a center of 5 values"):
        DINOLoss()(s, t, torch.zeros(4), 0.04)
