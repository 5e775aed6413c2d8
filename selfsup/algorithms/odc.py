"""ODC (Zhan et al., "Online Deep Clustering for Unsupervised Representation Learning", CVPR 2020),
as MMSelfSup implements it (``odc.py``, ``odc_memory.py``, ``odc_hook.py``).

    once, before training (skipped when resuming: the memory is in the checkpoint):
        F = L2norm(neck(backbone(all training images)))       # [N, 256], eval mode
        labels = k-means(F, K)       # selfsup.clustering: each rank its shard on its GPU, or scikit-learn/faiss
        memory: features = F, labels, centroids = cluster means; re-init the head
    each step, for a batch x with dataset indices idx:
        f = neck(backbone(x))                                  # [B, 256]
        loss = CE(head(f), memory.labels[idx], class weights)  # pseudo-labels from the memory
        memory.features[idx] = L2norm(0.5 * old + 0.5 * L2norm(f))      # gathered over ranks
        memory.labels[idx] = argmax_c <centroid_c, memory.features[idx]>
    after each optimizer step:
        every `centroid_interval` steps: centroids = means of the memory features per cluster
        clusters with < min_cluster members: move members to their nearest other centroid, then
            refill each emptied cluster by splitting the largest one with 2-means
        class weights w_c ~ count_c ** -0.5
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch, TrainContext, feature_dim
from selfsup.clustering import kmeans
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.losses import ClassWeightedCrossEntropy
from selfsup.models.necks import ODCNeck

log = logging.getLogger(__name__)


class ODCMemory(nn.Module):
    """Samples memory (features + pseudo-labels of every training image) and centroids memory.

    All state is registered buffers, so it is saved in checkpoints and restored on resume. Every
    rank holds the full memory; updates are computed from all-gathered batches on rank 0 and
    broadcast, so the copies never drift apart.
    """

    features: Tensor  # [N, D] L2-normalised memory features
    labels: Tensor  # [N] pseudo-labels
    centroids: Tensor  # [K, D]
    class_weight: Tensor  # [K]
    initialized: Tensor  # bool scalar

    def __init__(
        self, num_samples: int, feat_dim: int, num_clusters: int, momentum: float = 0.5, min_cluster: int = 20
    ) -> None:
        super().__init__()
        self.num_clusters, self.momentum, self.min_cluster = num_clusters, momentum, min_cluster
        self.register_buffer("features", torch.zeros(num_samples, feat_dim))
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_clusters, feat_dim))
        self.register_buffer("class_weight", torch.full((num_clusters,), 1.0 / num_clusters))
        self.register_buffer("initialized", torch.tensor(False))

    def counts(self) -> Tensor:
        return torch.bincount(self.labels, minlength=self.num_clusters)

    @torch.no_grad()
    def init_memory(self, features: Tensor, labels: Tensor) -> None:
        self.features.copy_(F.normalize(features, dim=1))
        self.labels.copy_(labels)
        self.update_centroids()
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_samples(self, index: Tensor, feature: Tensor) -> Tensor:
        """Momentum-update the memory features of a batch and relabel them; returns the fraction
        of the (global) batch whose label changed. Always float32, also when called under autocast:
        in bf16 near-equal centroid scores round together and the argmax picks the lowest cluster id
        (86% of labels changed on a random ResNet-50 at K=200), so low ids grow and high ids starve."""
        with torch.autocast(device_type=self.features.device.type, enabled=False):
            index = distributed.all_gather(index)
            feature = distributed.all_gather(F.normalize(feature.float(), dim=1))
            new = F.normalize((1 - self.momentum) * self.features[index] + self.momentum * feature, dim=1)
            new_labels = (new @ self.centroids.T).argmax(dim=1)
        distributed.broadcast_(new)
        distributed.broadcast_(new_labels)
        change_ratio = (new_labels != self.labels[index]).float().mean()
        self.features[index] = new
        self.labels[index] = new_labels
        return change_ratio

    @torch.no_grad()
    def update_centroids(self) -> None:
        """Centroid = mean memory feature of its members (clusters with members)."""
        self._compute_centroids()
        distributed.broadcast_(self.centroids)

    def _compute_centroids(self, clusters: Tensor | None = None) -> None:
        sums = torch.zeros_like(self.centroids).index_add_(0, self.labels, self.features)
        counts = self.counts()
        update = counts > 0
        if clusters is not None:
            only = torch.zeros_like(update)
            only[clusters] = True
            update &= only
        self.centroids[update] = sums[update] / counts[update, None].to(sums.dtype)

    @torch.no_grad()
    def deal_with_small_clusters(self, seed: int = 0) -> int:
        """Empty the clusters smaller than ``min_cluster`` and refill them by splitting the
        largest cluster; returns how many clusters were refilled."""
        small = (self.counts() < self.min_cluster).nonzero()[:, 0]
        if len(small) == 0:
            return 0
        if distributed.is_main_process():
            large = torch.ones(self.num_clusters, dtype=torch.bool, device=self.labels.device)
            large[small] = False
            large_ids = large.nonzero()[:, 0]
            members = torch.isin(self.labels, small)
            if members.any():  # move them to the nearest centroid that is not small (float32, see update_samples)
                with torch.autocast(device_type=self.features.device.type, enabled=False):
                    sims = self.features[members] @ self.centroids[large_ids].T
                self.labels[members] = large_ids[sims.argmax(dim=1)]
            for empty in small.tolist():
                biggest = int(self.counts().argmax())
                ids = (self.labels == biggest).nonzero()[:, 0]
                half = self._split(ids, seed)
                self.labels[half] = empty
                self._compute_centroids(torch.tensor([biggest, empty], device=self.labels.device))
        distributed.broadcast_(self.labels)
        distributed.broadcast_(self.centroids)
        return len(small)

    def _split(self, ids: Tensor, seed: int) -> Tensor:
        """Indices of one half of a cluster, split by 2-means (a random half if that degenerates)."""
        from sklearn.cluster import KMeans

        feats = self.features[ids].cpu().numpy()
        assign = KMeans(n_clusters=2, n_init=1, max_iter=20, random_state=seed).fit_predict(feats)
        second = torch.from_numpy(assign == 1).to(ids.device)
        if second.all() or not second.any():
            gen = torch.Generator().manual_seed(seed)
            second = torch.zeros(len(ids), dtype=torch.bool)
            second[torch.randperm(len(ids), generator=gen)[: len(ids) // 2]] = True
            second = second.to(ids.device)
        return ids[second]

    @torch.no_grad()
    def update_class_weight(self, power: float = 0.5) -> None:
        inv = (1.0 / (self.counts().double() + 1e-10)) ** power
        self.class_weight.copy_((inv / inv.sum()).to(self.class_weight.dtype))


class ODC(Algorithm):
    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        num_clusters: int = 10000,
        hidden_dim: int = 512,
        feat_dim: int = 256,
        memory_momentum: float = 0.5,
        min_cluster: int = 20,
        centroid_interval: int = 10,
        reweight_pow: float = 0.5,
        kmeans_iters: int = 20,
        kmeans_seed: int = 0,
    ) -> None:
        super().__init__(backbone)
        if num_clusters < 2 or min_cluster < 1 or centroid_interval < 1:
            raise ConfigError("ODC needs num_clusters >= 2, min_cluster >= 1 and centroid_interval >= 1")
        self.num_clusters, self.feat_dim = num_clusters, feat_dim
        self.memory_momentum, self.min_cluster = memory_momentum, min_cluster
        self.centroid_interval, self.reweight_pow = centroid_interval, reweight_pow
        self.kmeans_iters, self.kmeans_seed = kmeans_iters, kmeans_seed
        self.neck = ODCNeck(feature_dim(backbone), hidden_dim, feat_dim)
        self.head = nn.Linear(feat_dim, num_clusters)
        self._init_head()
        self.loss_fn = ClassWeightedCrossEntropy()
        self.memory: ODCMemory | None = None

    def _init_head(self) -> None:
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def setup(self, num_samples: int) -> None:
        k = self.num_clusters
        if k > num_samples:
            raise ConfigError(
                f"ODC has more clusters (algo.model.num_clusters={k}) than training images ({num_samples}); "
                f"set algo.model.num_clusters to at most {num_samples}"
            )
        if k * self.min_cluster > num_samples:
            raise ConfigError(
                f"ODC needs num_clusters x min_cluster = {k} x {self.min_cluster} <= {num_samples} training images; "
                "lower algo.model.num_clusters or algo.model.min_cluster"
            )
        self.memory = ODCMemory(num_samples, self.feat_dim, k, self.memory_momentum, self.min_cluster)

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        memory = self._memory()
        if bool(memory.initialized):
            return
        feats = F.normalize(ctx.extract_features(lambda x: self.neck(self.backbone(x))).float(), dim=1)
        # every rank clusters its shard of the rows (on its GPU; scikit-learn/faiss in one CPU process)
        rank, world = distributed.get_rank(), distributed.get_world_size()
        bounds = [len(feats) * r // world for r in range(world + 1)]
        local = kmeans(
            feats[bounds[rank] : bounds[rank + 1]], self.num_clusters, self.kmeans_iters, self.kmeans_seed + ctx.seed
        )
        padded = torch.full((bounds[1] + 1,), -1, dtype=torch.long, device=feats.device)  # shards differ by <= 1 row
        padded[: len(local)] = local
        gathered = distributed.all_gather(padded).view(world, -1)
        labels = torch.cat([gathered[r, : bounds[r + 1] - bounds[r]] for r in range(world)])
        memory.init_memory(feats, labels)
        memory.deal_with_small_clusters(self.kmeans_seed)
        memory.update_class_weight(self.reweight_pow)
        self._init_head()
        distributed.broadcast_(self.head.weight)
        distributed.broadcast_(self.head.bias)

    def _memory(self) -> ODCMemory:
        if self.memory is None:
            raise RuntimeError("ODC.setup(num_samples) must be called before training")
        return self.memory

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        memory = self._memory()
        x, index = batch["views"][0], batch["index"]
        feat = self.neck(self.backbone(x))  # [B, feat_dim]
        loss = self.loss_fn(self.head(feat), memory.labels[index], memory.class_weight)
        change_ratio = memory.update_samples(index, feat.detach())
        return {"loss": loss, "change_ratio": change_ratio}

    def after_step(self, state: TrainState) -> dict[str, float] | None:
        memory = self._memory()
        if state.step % self.centroid_interval == 0:
            memory.update_centroids()
        refilled = memory.deal_with_small_clusters(self.kmeans_seed)
        memory.update_class_weight(self.reweight_pow)
        return {"refilled_clusters": float(refilled)} if refilled else None
