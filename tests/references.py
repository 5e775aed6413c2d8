"""Independent numpy references of the papers' formulas, shared by several test modules.

Written from the formulas (loops, float64), never from selfsup's code, so that a test comparing
against them fails when the implementation drifts from the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from selfsup import distributed


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


def numeric_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + h e_i) - f(x - h e_i)) / 2h of a float64 reference, element by element."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        g[idx] = (f(plus) - f(minus)) / (2 * h)
    return g


def as_rank_1_of_2(monkeypatch: pytest.MonkeyPatch, *rank0_rows: np.ndarray) -> None:
    """Emulate rank 1 of 2 for ``distributed.all_gather_with_grad``: its k-th call returns rank 0's rows
    ``rank0_rows[k]`` followed by the caller's own (the gathered batch, rank 0 first)."""
    other = iter([torch.tensor(r) for r in rank0_rows])
    monkeypatch.setattr(distributed, "all_gather_with_grad", lambda z: torch.cat([next(other).to(z.dtype), z]))
