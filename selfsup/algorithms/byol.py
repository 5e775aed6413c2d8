"""BYOL (Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020), as MMSelfSup runs it (``byol.py``, ``CosineEMA``).

    online = predictor q o projector g o backbone f      (trained)
    target = g' o f'  = momentum copy of g o f           (never trained: EMA of the online weights)
    for a batch of images, two views x1, x2 (asymmetric pipelines: blur 1.0 / 0.1, solarize 0 / 0.2):
        p1, p2 = q(g(f(x1))), q(g(f(x2)))                  # [N, 256] each; one pass per view (BN per view)
        z1, z2 = g'(f'(x1)), g'(f'(x2))                   # no gradient
        loss = L(p1, z2) + L(p2, z1)                      # L = 2 - 2 cos (normalised MSE, Eq. 2-3)
    after each optimizer step:
        m = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2          # cosine from m_0 to 1 over the K steps
        target <- m * target + (1 - m) * online           # (BN statistics copied)

The skeleton is :class:`~selfsup.algorithms.base.MomentumTwin`, shared with MoCo v3.
The paper starts at m_0 = 0.996 (the default here); MMSelfSup's recipe at 0.99
(``experiment=byol_resnet50_16xb256-coslr-200e_in1k``). The momentum encoder is a sub-module, so
its weights are in every checkpoint and resume continues the EMA bit for bit.
"""

from __future__ import annotations

from torch import nn

from selfsup.algorithms.base import MomentumTwin, feature_dim
from selfsup.engine.schedules import Policy, ScalarSchedule
from selfsup.losses import BYOLLoss
from selfsup.models.necks import BYOLPredictionHead, BYOLProjectionHead


class BYOL(MomentumTwin):
    """Online projector/predictor MLPs (4096 hidden, 256 out) and the normalised MSE, on :class:`MomentumTwin`."""

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        momentum: ScalarSchedule = ScalarSchedule(start=0.996, end=1.0, policy=Policy.cosine),  # noqa: B008
    ) -> None:
        super().__init__(
            backbone,
            projector=BYOLProjectionHead(feature_dim(backbone), hidden_dim, out_dim),
            predictor=BYOLPredictionHead(out_dim, hidden_dim, out_dim),
            momentum=momentum,
            loss_fn=BYOLLoss(),
        )
