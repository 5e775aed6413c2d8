"""Relative-Loc (Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015), with MMSelfSup's network (``relative_loc.py``, ``RelativeLocNeck``, ``ClsHead``).

    view (algo.views: grid {cells: 3, patch_size: P}): a 3 x 3 grid over the image, one P x P patch at
    a random place in each cell (gap + jitter); the centre patch (target -1) and its 8 neighbours
    (targets 0..7, row-major: 0 1 2 / 3 . 4 / 5 6 7)
    for a batch of B images, 9 patches each:
        x = prep(cat(patches))                        # [9B, 3, P, P], each patch on its own:
            down-sample to s x s (10 <= s < P) and back, with probability `downsample`  (pixelation)
            color="drop": keep one random channel, Gaussian noise (std = 1/100 of it) in the others
            patch_norm: subtract each channel's mean, scale the patch to unit RMS
        h = backbone(x)                               # [9B, C]   one pass for all 9 patches
        pairs = cat(h[centre], h[neighbour k])        # [8B, 2C]  the first patch is the centre
        z = neck(pairs)                               # [8B, 4096] Linear -> BN -> ReLU -> Dropout(0.5)
        loss = CE(head(z), k's target)                # 8-way: where the neighbour lies
                                                      # relative to the centre

The patch preprocessing is the paper's defence against trivial low-level shortcuts (Sec. 3.1 and
its code, cdoersch/deepcontext ``prep_image``): chromatic aberration (colour dropping), boundary
and gradient cues (per-patch mean and variance normalisation), pixelation (down-sampling about a
third of the patches). It runs here, on the normalised batch on the device (like MMSelfSup's data
preprocessors), so the data pipeline stays the shared view declaration. MMSelfSup's recipe does none
of it (``color="keep"``, ``patch_norm=False``, ``downsample=0``) and converts whole images to grey
with p=0.66 in the view instead: ``experiment=relative-loc_resnet50_8xb64-steplr-70e_in1k``.

MMSelfSup runs the backbone on the 8 neighbours and on 8 copies of the centre (16 patch passes per
image) and concatenates [neighbour, centre]; here the 9 patches run once and the centre's feature
is repeated, in the paper's order [centre, neighbour] (the same function up to a permutation of the
first Linear's input columns).

Nothing is gathered, reduced or shuffled across ranks (each rank's loss is on its own images, DDP
averages the gradients); the preprocessing draws its random numbers per rank, like the data
augmentation. So there is no 2-process test. No discrete state either (nothing to check under bf16).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.algorithms.base import Algorithm, Batch, feature_dim
from selfsup.errors import ConfigError
from selfsup.losses import ClassWeightedCrossEntropy

CENTRE = 4  # the centre patch's place among the 9 views of a 3 x 3 grid (views.py: row-major)
NEIGHBOURS = [0, 1, 2, 3, 5, 6, 7, 8]


class RelativeLocNeck(nn.Module):
    """MMSelfSup's ``RelativeLocNeck`` (the paper's fc7 on the pair): Linear(2C -> hidden) ->
    BN(momentum 0.003) -> ReLU -> Dropout; Linear ~ N(0, 0.01), zero bias, BN weight 1."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim, momentum=0.003)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.relu(self.bn(self.fc(x))))


class RelativeLoc(Algorithm):
    num_views = 9

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 4096,
        dropout: float = 0.5,
        color: Literal["drop", "keep"] = "drop",
        patch_norm: bool = True,
        downsample: float = 0.33,
        noise: float = 0.01,
    ) -> None:
        """
        Args:
            hidden_dim: width of the pair layer (the paper's fc7, MMSelfSup's neck: 4096).
            dropout: dropout after the pair layer (MMSelfSup: 0.5).
            color: "drop" keeps one random channel per patch and fills the other two with Gaussian
                noise (the paper's colour dropping); "keep" leaves the colours.
            patch_norm: subtract each patch's per-channel mean and scale it to unit RMS (the paper).
            downsample: probability that a patch is down-sampled to s x s pixels, s uniform in area
                between 10 x 10 and (P-1) x (P-1), and up-sampled back (the paper: 1/3 of the patches).
            noise: std of the noise in the dropped channels, as a fraction of the kept channel's std
                (the paper: about 1/100).
        """
        super().__init__(backbone)
        if hidden_dim < 1:
            raise ConfigError(f"RelativeLoc: algo.model.hidden_dim must be >= 1, got {hidden_dim}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"RelativeLoc: algo.model.dropout must be in [0, 1), got {dropout}")
        if color not in ("drop", "keep"):
            raise ConfigError(f"RelativeLoc: algo.model.color={color!r} must be 'drop' or 'keep'")
        if not 0 <= downsample <= 1:
            raise ConfigError(f"RelativeLoc: algo.model.downsample is a probability in [0, 1], got {downsample}")
        if not noise >= 0:
            raise ConfigError(f"RelativeLoc: algo.model.noise must be >= 0, got {noise}")
        self.color, self.patch_norm, self.downsample, self.noise = color, patch_norm, downsample, noise
        self.neck = RelativeLocNeck(feature_dim(backbone), hidden_dim, dropout)
        self.head = nn.Linear(hidden_dim, 8)  # MMSelfSup ClsHead(num_classes=8), Linear ~ N(0, 0.005)
        nn.init.normal_(self.head.weight, std=0.005)
        nn.init.zeros_(self.head.bias)
        self.loss_fn = ClassWeightedCrossEntropy()  # without class weights: the mean cross entropy

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.neck]

    @torch.no_grad()
    def prepare_patches(self, x: Tensor) -> Tensor:
        """The paper's per-patch preprocessing of normalised patches [N, 3, P, P] (float32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.downsample > 0:
                x = self._pixelate(x)
            if self.color == "drop":
                n, c, p, _ = x.shape
                keep = torch.randint(0, c, (n,), device=x.device)
                kept = x.gather(1, keep.view(n, 1, 1, 1).expand(n, 1, p, p))  # [N, 1, P, P]
                std = kept.std(dim=(2, 3), keepdim=True, correction=0)
                is_kept = F.one_hot(keep, c).bool().view(n, c, 1, 1)
                x = torch.where(is_kept, x, torch.randn_like(x) * (self.noise * std))
            if self.patch_norm:
                x = x - x.mean(dim=(2, 3), keepdim=True)
                x = x * torch.rsqrt(x.square().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
        return x

    def _pixelate(self, x: Tensor) -> Tensor:
        """Down-sample each chosen patch to s x s and back to P x P (bilinear); s is drawn on the host
        (so patches of one size are resized together, without a device sync)."""
        n, p = x.shape[0], x.shape[-1]
        low = min(10, p - 1)
        if low < 1:
            return x
        chosen = torch.rand(n) < self.downsample
        sides = (torch.rand(n) * ((p - 1) ** 2 - low**2) + low**2).sqrt().floor().long().clamp(low, p - 1)
        out = x.clone()
        for s in sides[chosen].unique().tolist():
            idx = torch.nonzero(chosen & (sides == s))[:, 0].to(x.device)
            small = F.interpolate(x[idx], size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out[idx] = F.interpolate(small, size=(p, p), mode="bilinear", align_corners=False)
        return out

    def pair_logits(self, feats: Tensor) -> Tensor:
        """Logits [8B, 8] from the patch features [9, B, C] (view-major): rows k*B..(k+1)*B-1 are the
        pairs (centre, neighbour k) of the B images."""
        centre, neighbours = feats[CENTRE], feats[NEIGHBOURS]  # [B, C], [8, B, C]
        pairs = torch.cat([centre.expand_as(neighbours), neighbours], dim=2)  # [8, B, 2C]
        return self.head(self.neck(pairs.flatten(0, 1)))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        views, targets = batch["views"], batch["view_targets"]  # 9 x [B, 3, P, P], [B, 9]
        if len(views) != 9 or targets.shape[1] != 9:
            raise ValueError(f"RelativeLoc expects the 9 patches of a 3 x 3 grid, got {len(views)} views")
        b = views[0].shape[0]
        x = self.prepare_patches(torch.cat(views))  # [9B, 3, P, P]
        feats = self.backbone(x).view(9, b, -1)  # one pass for all patches
        logits = self.pair_logits(feats)  # [8B, 8]
        labels = targets[:, NEIGHBOURS].T.reshape(-1)  # [8B], same order as the pairs
        loss = self.loss_fn(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}
