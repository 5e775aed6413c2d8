"""Independent numpy references of the papers' formulas, shared by several test modules.

Written from the formulas (loops, float64), never from selfsup's code, so that a test comparing
against them fails when the implementation drifts from the paper.
"""

from __future__ import annotations

import numpy as np


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
