"""NPID (Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018), as the paper (Sec. 3, lemniscate.pytorch) and MMSelfSup (``npid.py``, ``simple_memory.py``) run it.

    bank: one L2-normalised 128-d feature per training image, random unit vectors at the start
    for a batch x with dataset indices idx (B images):
        v = L2norm(fc(backbone(x)))                     # [B, 128]
        j = m indices per image, uniform over the bank  # [B, m]: drawn for the GLOBAL batch on every rank
        pos, neg = bank[idx], bank[j]                   # [B, 128], [B, m, 128]
        loss = NCE(v, pos, neg; tau, n)                 # paper, Eq. 4-6 (Z estimated once, then fixed)
             | softmax CE over [pos, neg] / tau         # MMSelfSup: loss="softmax", m = 65,536
        bank[idx] <- L2norm(0.5 * bank[idx] + 0.5 * v) # gathered from every rank, after the loss

The bank is updated inside ``forward``, right after the loss is computed from copies of its rows (as
MMSelfSup, and as ODC here): the update uses the features of exactly the images the loss saw, with the
weights that produced them (the official code updates in the backward pass of the same step, from the
same features: the same result), it needs nothing kept between hooks, and it works unchanged with
gradient accumulation (each micro-batch updates its own rows).

Negatives for 2 processes == 1: every rank draws the indices of the whole global batch (B x world rows)
from the same RNG stream and takes its own rows, so a run on k ranks uses the negatives of one process on
the global batch. ``ensure_neg`` (MMSelfSup's ``npid-ensure-neg``) redraws every negative that hit the
image itself, also on the global batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch, feature_dim
from selfsup.errors import ConfigError
from selfsup.losses.infonce import InfoNCELoss
from selfsup.losses.npid import NPIDNCELoss
from selfsup.models.memory import MemoryBank


class NPID(Algorithm):
    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        memory_momentum: float = 0.5,
        loss: Literal["nce", "softmax"] = "nce",
        ensure_neg: bool = False,
    ) -> None:
        super().__init__(backbone)
        loss = getattr(loss, "value", loss)  # a Literal arrives from the config as a str enum
        if loss not in ("nce", "softmax"):
            raise ConfigError(f"NPID loss={loss!r} must be 'nce' (the paper) or 'softmax' (MMSelfSup)")
        if feat_dim < 1 or num_negatives < 1:
            raise ConfigError(f"NPID needs feat_dim >= 1 and num_negatives >= 1, got {feat_dim} and {num_negatives}")
        if not temperature > 0:
            raise ConfigError(f"NPID temperature must be > 0, got {temperature}")
        if not 0.0 <= memory_momentum <= 1.0:
            raise ConfigError(
                f"NPID memory_momentum must be in [0, 1] (the weight of the new feature), got {memory_momentum}"
            )
        self.feat_dim, self.num_negatives, self.temperature = feat_dim, num_negatives, temperature
        self.memory_momentum, self.loss, self.ensure_neg = memory_momentum, loss, ensure_neg
        self.neck = nn.Linear(feature_dim(backbone), feat_dim)  # MMSelfSup LinearNeck (after the pooling)
        self.memory: MemoryBank | None = None
        self.loss_fn: nn.Module | None = InfoNCELoss(temperature) if loss == "softmax" else None

    def setup(self, num_samples: int) -> None:
        if self.ensure_neg and num_samples < 2:
            raise ConfigError("NPID ensure_neg=true needs at least 2 training images (negatives other than the image)")
        self.memory = MemoryBank(num_samples, self.feat_dim, self.memory_momentum)
        if self.loss == "nce":  # NCE's noise distribution P_n = 1/n needs n
            self.loss_fn = NPIDNCELoss(self.temperature, num_samples)

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.neck]

    def _memory(self) -> MemoryBank:
        if self.memory is None:
            raise RuntimeError("NPID.setup(num_samples) must be called before training")
        return self.memory

    def negatives(self, index: Tensor) -> Tensor:
        """Indices [B, m] of this rank's negatives: drawn for the global batch on every rank, this rank's rows."""
        memory = self._memory()
        b, rank, world = len(index), distributed.get_rank(), distributed.get_world_size()
        neg = memory.sample_negatives(self.num_negatives, b * world)  # [world * B, m], the same on every rank
        if self.ensure_neg:
            everyone = distributed.all_gather(index.to(neg.device))[:, None]
            wrong = neg == everyone
            while bool(wrong.any()):
                neg[wrong] = torch.randint(memory.num_samples, (int(wrong.sum()),), device=neg.device)
                wrong = neg == everyone
        return neg[rank * b : (rank + 1) * b]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        memory = self._memory()
        assert self.loss_fn is not None  # set by __init__ (softmax) or setup (nce)
        x, index = batch["views"][0], batch["index"].to(memory.features.device)
        v = F.normalize(self.neck(self.backbone(x)).float(), dim=1)  # [B, feat_dim]
        neg_index = self.negatives(index)  # [B, m]
        pos, neg = memory.features[index], memory.features[neg_index]  # copies: [B, d], [B, m, d]
        loss = self.loss_fn(v, pos, neg)
        memory.update(index, v.detach())
        return {"loss": loss}
