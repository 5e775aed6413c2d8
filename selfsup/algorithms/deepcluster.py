"""DeepCluster (Caron, Bojanowski, Joulin, Douze, "Deep Clustering for Unsupervised Learning of Visual
Features", ECCV 2018), as MMSelfSup runs it (``deepcluster.py``, ``deepcluster_hook.py``,
``utils/clustering.py``, ``deepcluster_sampler.py``, ``ResNetSobel``).

    at the start of every epoch e (skipped when a run resumes in the middle of epoch e: the labels of e
    and the head are in the checkpoint):
        F = backbone(all N training images)        # [N, D] pooled, eval transform, eval mode
        F = PCA-whiten(F, 256)                     # [N, 256]: (F - mean) @ top principal axes / sqrt(eigenvalue)
        F = L2norm(F)
        labels = k-means(F, K)                     # [N] pseudo-labels, K = 10,000 for ImageNet, 20 iterations
        head = Linear(D, K) re-initialised         # N(0, 0.01), bias 0; seeded by (seed, e): equal on every rank
        the epoch's images: uniform over the non-empty clusters (N // clusters + 1 from each, with
                            replacement when a cluster is that small or smaller), shuffled, cut to N
    each step, for a batch x with dataset indices idx:
        loss = CE(head(backbone(x)), labels[idx])  # the head gets no SGD momentum (its targets change)

Sobel (``sobel=True``, the paper's and MMSelfSup's ImageNet recipe): the backbone sees edges, not colour:
grey = mean of the (normalised) RGB channels, then horizontal and vertical 3x3 Sobel filters, i.e. 2
input channels. The fixed filter is folded into the backbone's first convolution (:class:`SobelConv2d`,
2 input channels), so the backbone still takes RGB images everywhere: ``extract`` (kNN), stage features,
t-SNE and fine-tuning from a checkpoint all apply the Sobel; only an export to torchvision/timm key names
cannot hold it (their first conv has 3 input channels).

Numerics: the PCA (covariance, eigen-decomposition, projection) runs in float64 and the k-means
(``selfsup.clustering.torch_kmeans``) in float32, both outside autocast, so bf16 training gives the same
labels as fp32 for the same features. Every rank gets the features of all images; the whitening is
computed from all of them on every rank (rank 0's broadcast), each rank clusters its contiguous shard of
the rows (``torch_kmeans`` all-reduces the cluster sums) and the shards' labels are all-gathered: 2
processes give the labels of 1.

Differences from MMSelfSup: seeds are derived from (seed, epoch) instead of ``np.random``; the uniform
sampler divides by the non-empty clusters (the official DeepCluster ``UnifLabelSampler``; MMSelfSup divides
by K); faiss' k-means is replaced by selfsup's (empty clusters re-seeded with the farthest points, not split).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch, TrainContext, feature_dim
from selfsup.clustering import torch_kmeans
from selfsup.errors import ConfigError

log = logging.getLogger(__name__)

HEAD_STD = 0.01  # the classifier's re-initialisation: N(0, 0.01), bias 0 (official code, MMSelfSup ClsHead)


def _mix(seed: int, epoch: int, salt: int) -> int:
    """One generator seed per (run seed, epoch, purpose): k-means init, head init, epoch order."""
    return ((seed * 1_000_003 + epoch) * 8 + salt) % 2**63


# ---------------------------------------------------------------------------------------------- Sobel input
class SobelConv2d(nn.Conv2d):
    """A backbone's first convolution applied to the Sobel edges of its RGB input (MMSelfSup ``Sobel`` +
    ``ResNetSobel``): grey = (R + G + B) / 3, then the horizontal and vertical 3x3 Sobel filters (zero
    padding 1, same size), then this convolution with 2 input channels.

    Built from the 3-channel conv it replaces (same output channels, kernel, stride, padding, bias); its
    weight is that conv's first two input channels, which for a ResNet (Kaiming init on fan-out) is exactly
    a fresh 2-channel initialisation. The fixed filter is a non-persistent buffer: the state dict has the
    same keys as the plain backbone (``conv1.weight`` is [out, 2, k, k])."""

    sobel: Tensor

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.in_channels != 3 or conv.groups != 1:
            raise ConfigError(f"Sobel input needs a first convolution over 3 RGB channels, got {conv}")
        super().__init__(
            2,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight[:, :2])
            if conv.bias is not None and self.bias is not None:
                self.bias.copy_(conv.bias)
        dx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        dy = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
        grey_then_sobel = torch.stack([dx, dy])[:, None].expand(2, 3, 3, 3) / 3.0  # [2 out, 3 RGB, 3, 3]
        self.register_buffer("sobel", grey_then_sobel.contiguous().to(conv.weight.device), persistent=False)

    def edges(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] RGB -> [B, 2, H, W] Sobel x / y of the grey image."""
        return F.conv2d(x, self.sobel.to(x.dtype), padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.edges(x))


def use_sobel_input(backbone: nn.Module) -> None:
    """Replace the backbone's first convolution (ResNet ``conv1``, ViT ``patch_embed``) by a :class:`SobelConv2d`."""
    for name in ("conv1", "patch_embed"):
        conv = getattr(backbone, name, None)
        if isinstance(conv, nn.Conv2d):
            setattr(backbone, name, SobelConv2d(conv))
            return
    raise ConfigError(
        f"algo.model.sobel=true needs a backbone whose first layer is a conv named conv1 (ResNet) or patch_embed "
        f"(ViT); {type(backbone).__name__} has neither: set algo.model.sobel=false"
    )


# ---------------------------------------------------------------------------------------------- clustering
@torch.no_grad()
def pca_whitening(x: Tensor, dim: int, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """PCA with whitening (faiss ``PCAMatrix(D, dim, eigen_power=-0.5)``) fitted on the rows of ``x`` [N, D]:
    returns ``mean`` [D] and ``proj`` [D, dim] (float64) such that ``(x - mean) @ proj`` has the identity
    covariance (divided by N): the ``dim`` leading eigenvectors of the covariance, each scaled by its
    eigenvalue ** -0.5. Directions of (numerically) zero variance, when N <= dim, get scale 0 instead of
    infinity. Float64 throughout (accumulated ``chunk`` rows at a time), whatever the autocast state."""
    n, d = x.shape
    if not 1 <= dim <= d:
        raise ConfigError(f"DeepCluster: pca_dim={dim} must be between 1 and the feature size {d}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        mean = torch.zeros(d, dtype=torch.float64, device=x.device)
        for rows in x.split(chunk):
            mean += rows.double().sum(dim=0)
        mean /= n
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for rows in x.split(chunk):
            centred = rows.double() - mean
            cov += centred.T @ centred
        cov /= n
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0)[:dim], eigenvectors.flip(1)[:, :dim]
        real = eigenvalues > eigenvalues[0].clamp(min=0) * 1e-10
        scale = torch.where(real, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    return mean, eigenvectors * scale


@torch.no_grad()
def whiten_and_normalise(x: Tensor, mean: Tensor, proj: Tensor, chunk: int = 65536) -> Tensor:
    """L2norm((x - mean) @ proj) row by row, computed in float64, returned as float32 [N, dim]."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = [F.normalize((rows.double() - mean) @ proj, dim=1).float() for rows in x.split(chunk)]
    return torch.cat(out) if out else x.new_zeros(0, proj.shape[1])


def uniform_over_clusters(labels: Tensor, generator: torch.Generator) -> Tensor:
    """DeepCluster's sampler (official ``UnifLabelSampler``, MMSelfSup ``DeepClusterSampler.set_uniform_indices``):
    N dataset indices drawn uniformly over the non-empty clusters of ``labels`` [N] (CPU): ``N // clusters + 1``
    from each cluster (with replacement when the cluster has at most that many images), shuffled, cut to N."""
    n = len(labels)
    members = torch.split(torch.argsort(labels, stable=True), torch.bincount(labels).tolist())
    clusters = [m for m in members if len(m) > 0]
    size = n // len(clusters) + 1
    picks = []
    for m in clusters:
        if len(m) > size:
            picks.append(m[torch.randperm(len(m), generator=generator)[:size]])
        else:
            picks.append(m[torch.randint(len(m), (size,), generator=generator)])
    drawn = torch.cat(picks)
    return drawn[torch.randperm(len(drawn), generator=generator)[:n]]


def _gather_shards(local: Tensor, bounds: list[int]) -> Tensor:
    """The labels of every rank's contiguous shard (sizes ``bounds[r+1] - bounds[r]``, differing by <= 1), in order."""
    world = len(bounds) - 1
    longest = max(bounds[r + 1] - bounds[r] for r in range(world))
    padded = torch.full((longest,), -1, dtype=torch.long, device=local.device)
    padded[: len(local)] = local
    gathered = distributed.all_gather(padded).view(world, longest)
    return torch.cat([gathered[r, : bounds[r + 1] - bounds[r]] for r in range(world)])


# ---------------------------------------------------------------------------------------------- the algorithm
class DeepCluster(Algorithm):
    num_views = 1

    labels: Tensor  # [N] int64 pseudo-labels of the training images (-1 before the first clustering)
    labels_epoch: Tensor  # int64 scalar: the epoch the labels and the head belong to (-1: none yet)

    def __init__(
        self,
        backbone: nn.Module,
        num_clusters: int = 10000,
        pca_dim: int = 256,
        kmeans_iters: int = 20,
        sobel: bool = True,
        uniform_sampling: bool = True,
    ) -> None:
        super().__init__(backbone)
        if num_clusters < 2:
            raise ConfigError(f"DeepCluster needs num_clusters >= 2, got {num_clusters}")
        if kmeans_iters < 1:
            raise ConfigError(f"DeepCluster needs kmeans_iters >= 1 (Lloyd iterations), got {kmeans_iters}")
        dim = feature_dim(backbone)
        if not 1 <= pca_dim <= dim:
            raise ConfigError(f"DeepCluster: pca_dim={pca_dim} must be between 1 and the backbone's feature size {dim}")
        self.num_clusters, self.pca_dim, self.kmeans_iters = num_clusters, pca_dim, kmeans_iters
        self.sobel, self.uniform_sampling = sobel, uniform_sampling
        if sobel:
            use_sobel_input(self.backbone)
        self.head = nn.Linear(dim, num_clusters)
        nn.init.normal_(self.head.weight, std=HEAD_STD)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("labels", torch.full((0,), -1, dtype=torch.long))
        self.register_buffer("labels_epoch", torch.tensor(-1, dtype=torch.long))

    def setup(self, num_samples: int) -> None:
        if self.num_clusters > num_samples:
            raise ConfigError(
                f"DeepCluster has more clusters (algo.model.num_clusters={self.num_clusters}) than training images "
                f"({num_samples}); set algo.model.num_clusters to at most {num_samples}"
            )
        self.labels = torch.full((num_samples,), -1, dtype=torch.long, device=self.labels.device)

    # ------------------------------------------------------------------ each epoch: cluster, re-init the head
    @torch.no_grad()
    def on_epoch_start(self, ctx: TrainContext) -> None:
        epoch = ctx.state.epoch
        if int(self.labels_epoch) == epoch:  # resumed in the middle of this epoch: labels and head are restored
            return
        self._check_setup()
        features = ctx.extract_features(self.backbone)  # [N, D], every rank
        self.labels.copy_(self.cluster(features, _mix(ctx.seed, epoch, 0)))
        self.labels_epoch.fill_(epoch)
        self.reset_head(_mix(ctx.seed, epoch, 1))
        sizes = torch.bincount(self.labels, minlength=self.num_clusters)
        log.info(
            "DeepCluster epoch %d: %d images in %d clusters (%d empty), sizes %d..%d",
            epoch,
            len(self.labels),
            self.num_clusters,
            int((sizes == 0).sum()),
            int(sizes[sizes > 0].min()),
            int(sizes.max()),
        )

    @torch.no_grad()
    def cluster(self, features: Tensor, seed: int) -> Tensor:
        """Pseudo-labels [N] of the rows of ``features`` [N, D] (the same on every rank): PCA-whitening to
        ``pca_dim``, L2 normalisation, k-means with ``num_clusters`` (each rank clusters its shard)."""
        mean, proj = pca_whitening(features, self.pca_dim)
        distributed.broadcast_(mean)
        distributed.broadcast_(proj)
        rank, world = distributed.get_rank(), distributed.get_world_size()
        bounds = [len(features) * r // world for r in range(world + 1)]
        shard = whiten_and_normalise(features[bounds[rank] : bounds[rank + 1]], mean, proj)
        local, _ = torch_kmeans(shard, self.num_clusters, iters=self.kmeans_iters, seed=seed)
        return _gather_shards(local, bounds)

    @torch.no_grad()
    def reset_head(self, seed: int) -> None:
        """Re-initialise the classifier: N(0, HEAD_STD) weights from a CPU generator seeded with ``seed``, zero bias."""
        gen = torch.Generator().manual_seed(seed)
        weight = torch.empty(self.head.weight.shape, dtype=self.head.weight.dtype).normal_(0.0, HEAD_STD, generator=gen)
        self.head.weight.copy_(weight)
        self.head.bias.zero_()

    def epoch_indices(self, epoch: int, seed: int) -> Tensor | None:
        if not self.uniform_sampling:
            return None
        if int(self.labels_epoch) != epoch:
            raise RuntimeError(f"DeepCluster.epoch_indices({epoch}) before on_epoch_start clustered epoch {epoch}")
        gen = torch.Generator().manual_seed(_mix(seed, epoch, 2))
        return uniform_over_clusters(self.labels.cpu(), gen)

    def _check_setup(self) -> None:
        if self.labels.numel() == 0:
            raise RuntimeError("DeepCluster.setup(num_samples) must be called before training")

    # ------------------------------------------------------------------ each step
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x, index = batch["views"][0], batch["index"]
        logits = self.head(self.backbone(x))  # [B, K]
        return {"loss": F.cross_entropy(logits.float(), self.labels[index])}
