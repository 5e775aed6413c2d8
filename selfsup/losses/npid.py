"""NPID's NCE loss (Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018, Sec. 3.2, Eq. 4-6; official lemniscate.pytorch ``NCEAverage`` + ``NCECriterion``):
a feature v = f(x_i) of image i against its memory-bank entry v_i (the positive) and m entries v_j drawn
uniformly from the bank (the negatives), s_j = v_j^T v / tau, noise-contrastive estimation with the
uniform noise distribution P_n = 1/n (n = images in the bank)::

    P(i|v)  = exp(s_i) / Z                                  Eq. 2 with a constant normaliser Z
    h(i, v) = P(i|v) / (P(i|v) + m P_n(i))                  Eq. 4: probability that i is data, not noise
    J       = -log h(i, v) - sum_{k=1..m} log(1 - h(j_k, v))  Eq. 5, averaged over the batch
    Z       = n / m sum_k exp(s_{j_k})                      Eq. 6: Monte-Carlo estimate from the first batch
                                                            (mean over its rows and negatives), then fixed

Z is estimated once, at the first call (from the global batch: every rank gets the same value), and
kept in the buffer ``log_z`` (NaN until then), so it is in every checkpoint and a resumed run uses the
same one. Computed in log space (``logaddexp``), in float32 with autocast off. Inputs are expected
L2-normalised (the algorithm normalises its features; the bank stores unit vectors).

NPID's other loss, MMSelfSup's softmax cross-entropy over [s_pos, s_neg_1..m] (Eq. 2 with the sampled
negatives in its denominator), is :class:`selfsup.losses.infonce.InfoNCELoss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from selfsup import distributed


def _similarities(q: Tensor, k: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(s_pos [B], s_neg [B, m]) in float32: dot products / temperature; negatives [m, d] are shared by all rows."""
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"expected q and k of the same [B, d] shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    b, d = q.shape
    if not (negatives.dim() == 2 and negatives.shape[1] == d) and not (
        negatives.dim() == 3 and negatives.shape[0] == b and negatives.shape[2] == d
    ):
        raise ValueError(f"expected negatives of shape [m, {d}] or [{b}, m, {d}], got {tuple(negatives.shape)}")
    q, k, negatives = q.float(), k.float(), negatives.float()
    pos = (q * k).sum(dim=1) / temperature
    if negatives.dim() == 2:
        neg = q @ negatives.T / temperature
    else:
        neg = torch.bmm(negatives, q.unsqueeze(2)).squeeze(2) / temperature
    return pos, neg


class NPIDNCELoss(nn.Module):
    """NCE with uniform noise and a constant normaliser Z (see the module docstring).

    Args:
        temperature: tau.
        num_samples: n, the images in the memory bank (the noise distribution is P_n = 1/n).
    """

    log_z: Tensor  # float32 scalar: log Z, NaN until the first call estimates it

    def __init__(self, temperature: float = 0.07, num_samples: int = 1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1 (the images in the memory bank), got {num_samples}")
        self.temperature, self.num_samples = temperature, num_samples
        self.register_buffer("log_z", torch.tensor(float("nan")))

    @torch.no_grad()
    def estimate_z(self, neg: Tensor) -> None:
        """log Z = log n + log mean exp(s_neg) over the rows and negatives of the global batch (Eq. 6)."""
        local = torch.logsumexp(neg.detach().flatten(), dim=0).reshape(1)
        gathered = distributed.all_gather(local)
        count = neg.numel() * distributed.get_world_size()
        self.log_z.copy_(math.log(self.num_samples) + torch.logsumexp(gathered, dim=0) - math.log(count))

    def forward(self, q: Tensor, k: Tensor, negatives: Tensor) -> Tensor:
        """``q`` [B, d] features, ``k`` [B, d] their positives, ``negatives`` [B, m, d] or [m, d]; a scalar."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            pos, neg = _similarities(q, k, negatives, self.temperature)
            if bool(torch.isnan(self.log_z)):
                self.estimate_z(neg)
            log_noise = pos.new_tensor(math.log(neg.shape[1] / self.num_samples))  # log(m P_n)
            log_p_pos, log_p_neg = pos - self.log_z, neg - self.log_z  # log P(i|v)
            log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, log_noise)  # log h(i, v)
            log_not_h_neg = log_noise - torch.logaddexp(log_p_neg, log_noise)  # log(1 - h(j, v))
            return -(log_h_pos + log_not_h_neg.sum(dim=1)).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, num_samples={self.num_samples}"
