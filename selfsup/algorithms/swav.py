"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020), as the official code (``main_swav.py``) and MMSelfSup
(``swav.py``, ``SwAVNeck``, ``SwAVLoss``, ``swav_hook.py``, ``distributed_sinkhorn``) run it.

    C = prototypes [K, D] (a bias-free Linear, K = 3000), L2-normalised at the start of every step
    for a batch of B images, V crops (multi-crop: 2 x 224 px + 6 x 96 px):
        h = cat(backbone(cat(crops of one resolution)) for each resolution)   # one pass per size
        z = L2norm(neck(h))                       # [V*B, 128], neck: Linear-BN-ReLU-Linear (one pass)
        p = z C^T                                 # [V*B, K] prototype scores (trainable)
        for each assignment crop i in (0, 1):     # no gradient, float32, outside autocast
            s = z_i C^T                            # [B, K]
            if the queue is full: s = cat(queue_i C^T, s)    # the recent embeddings of crop i
            q_i = SinkhornKnopp(exp(s / epsilon), 3 iterations)[-B:]   # sums over ranks
            queue_i <- cat(z_i, queue_i)[:length]  # shift in the newest (when the queue is on)
        loss = 1/2 sum_i 1/(V-1) sum_{v != i} CE(q_i, softmax(p_v / T))      # SwAVLoss
    before the optimizer step: the prototypes' gradient is dropped during the first
        ``freeze_prototypes_iters`` steps (official: ``p.grad = None``)
    at the start of epoch ``queue_start_epoch`` (if ``queue_length > 0``): the queue is switched on

Sinkhorn-Knopp (paper Eq. 3, Algorithm 1 / official ``distributed_sinkhorn``): Q = exp(S^T / epsilon)
[K, B], then ``iterations`` times: rows (prototypes) scaled to sum 1/K, columns (samples) to 1/B;
the sums over samples are all-reduced, so B is the global number of columns and the codes equal
those of one process holding the global batch. Codes = B * Q^T: each sample's code sums to 1.

The queue (MMSelfSup: 3840 rows from epoch 15, for batches of 256) is a registered buffer, so it is
in every checkpoint and survives a resume. Official SwAV and MMSelfSup keep ``length / world`` rows
per rank, each rank its own embeddings, in side files; here every rank keeps the same ``length``
rows of the *global* stream (all-gathered embeddings) and contributes its ``1 / world`` slice to
the distributed Sinkhorn: the same set of rows, but identical on every rank, so the checkpoint that
rank 0 writes restores every rank (also under another world size), and N processes == 1 process.
As officially, the used length is rounded down to a multiple of the global batch, the queue starts
empty (zeros) and enters the assignment once it is full.

Defaults are the paper's / official ``main_swav.py``'s (batch 4096: no queue, prototypes frozen for
313 steps = 1 epoch); MMSelfSup's batch-256 recipe (queue 3840 from epoch 15, 5005 frozen steps,
LARS 0.6): ``experiment=swav_resnet50_8xb32-mcrop-2-6-coslr-200e_in1k-224-96``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed
from selfsup.algorithms.base import Algorithm, Batch, TrainContext, feature_dim
from selfsup.engine.state import TrainState
from selfsup.errors import ConfigError
from selfsup.losses.swav import SwAVLoss
from selfsup.models.necks import MLPNeck


@torch.no_grad()
def distributed_sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes [n, K] of the scores [n, K] of this rank's n samples (the same n on every rank): the
    Sinkhorn-Knopp iterations of SwAV (paper Eq. 3; official ``distributed_sinkhorn``) over the global
    batch of B = n x world samples, in float32 with autocast off. Every code row sums to 1; the
    prototype marginals approach B / K (equipartition) as the iterations grow."""
    with torch.autocast(device_type=scores.device.type, enabled=False):
        q = torch.exp(scores.float() / epsilon).t()  # [K, n]: Q, K-by-B as in the paper
        num_prototypes, total = q.shape[0], q.shape[1] * distributed.get_world_size()
        q /= distributed.all_reduce_(q.sum())
        for _ in range(iterations):
            q /= distributed.all_reduce_(q.sum(dim=1, keepdim=True))  # each prototype: total weight 1/K
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True)  # each sample: total weight 1/B
            q /= total
        return (q * total).t()


class SwAVQueue(nn.Module):
    """The embeddings z of the assignment crops of recent batches (official ``queue``, MMSelfSup
    ``SwAVHook``), newest first, the same on every rank (see the module docstring).

    Buffers (in ``state_dict``): ``features`` [A, length, D] float32 (zeros until filled), ``rows``
    (long: rows filled so far), ``active`` (bool: switched on at ``queue_start_epoch``)."""

    features: Tensor
    rows: Tensor
    active: Tensor

    def __init__(self, num_assign: int, length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.zeros(num_assign, length, dim))
        self.register_buffer("rows", torch.zeros((), dtype=torch.long))
        self.register_buffer("active", torch.tensor(False))

    @property
    def length(self) -> int:
        return self.features.shape[1]

    def used_length(self, global_batch: int) -> int:
        """The length rounded down to a multiple of the global batch (official; 0 = no queue)."""
        return self.length // global_batch * global_batch

    def is_full(self, global_batch: int) -> bool:
        used = self.used_length(global_batch)
        return bool(self.active) and used > 0 and int(self.rows) >= used

    def local_rows(self, a: int, global_batch: int) -> Tensor:
        """This rank's share of the queue of assignment crop ``a`` (rows of rank r: the r-th 1/world)."""
        share = self.used_length(global_batch) // distributed.get_world_size()
        rank = distributed.get_rank()
        return self.features[a, rank * share : (rank + 1) * share]

    @torch.no_grad()
    def push(self, z: Tensor) -> None:
        """Shift in this step's embeddings z [A, n, D] of every rank (rank order), newest first."""
        if not bool(self.active):
            return
        z = distributed.all_gather(z.detach().float().transpose(0, 1).contiguous()).transpose(0, 1)  # [A, W*n, D]
        batch = z.shape[1]
        used = self.used_length(batch)
        if used == 0:
            return
        queue = self.features[:, :used]
        queue[:, batch:] = queue[:, : used - batch].clone()
        queue[:, :batch] = z
        self.rows.copy_(torch.clamp(self.rows + batch, max=used))

    def extra_repr(self) -> str:
        return f"num_assign={self.features.shape[0]}, length={self.length}, dim={self.features.shape[2]}"


def resolution_groups(views: Sequence[Tensor]) -> list[list[Tensor]]:
    """Consecutive views of equal size, each group one backbone pass (official ``unique_consecutive``)."""
    groups: list[list[Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape[-2:] == view.shape[-2:]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return groups


class SwAV(Algorithm):
    num_views = 8  # the default multi-crop: 2 + 6 (instances: sum(num_crops))

    def __init__(
        self,
        backbone: nn.Module,
        num_crops: Sequence[int] = (2, 6),
        crops_for_assign: Sequence[int] = (0, 1),
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
        freeze_prototypes_iters: int = 313,
    ) -> None:
        super().__init__(backbone)
        crops = [int(c) for c in num_crops]
        if not crops or min(crops) < 1 or sum(crops) < 2:
            raise ConfigError(
                f"SwAV num_crops={list(num_crops)} must count >= 1 crop per resolution and >= 2 in all "
                "(one entry per algo.views entry: its copies)"
            )
        assign = [int(c) for c in crops_for_assign]
        if not assign or len(set(assign)) != len(assign) or not all(0 <= c < sum(crops) for c in assign):
            raise ConfigError(
                f"SwAV crops_for_assign={list(crops_for_assign)} must be distinct crop indices in [0, {sum(crops)})"
            )
        if min(out_dim, num_prototypes, sinkhorn_iterations) < 1 or hidden_dim < 0:
            raise ConfigError(
                f"SwAV needs out_dim, num_prototypes, sinkhorn_iterations >= 1 and hidden_dim >= 0 (0: a linear "
                f"neck), got {out_dim}, {num_prototypes}, {sinkhorn_iterations} and {hidden_dim}"
            )
        if not (temperature > 0 and epsilon > 0):
            raise ConfigError(f"SwAV temperature ({temperature}) and epsilon ({epsilon}) must be > 0")
        if min(queue_length, queue_start_epoch, freeze_prototypes_iters) < 0:
            raise ConfigError(
                f"SwAV queue_length ({queue_length}), queue_start_epoch ({queue_start_epoch}) and "
                f"freeze_prototypes_iters ({freeze_prototypes_iters}) must be >= 0 (queue_length 0: no queue)"
            )
        self.num_views = sum(crops)
        self.crops_for_assign = assign
        self.epsilon, self.sinkhorn_iterations = float(epsilon), int(sinkhorn_iterations)
        self.queue_length, self.queue_start_epoch = int(queue_length), int(queue_start_epoch)
        self.freeze_prototypes_iters = int(freeze_prototypes_iters)
        # Linear(2048)-BN-ReLU-Linear(128), biases as officially (nn.Linear); hidden_dim=0: one Linear
        layers = 2 if hidden_dim > 0 else 1
        self.neck = MLPNeck(feature_dim(backbone), hidden_dim, out_dim, layers, last_bn=False, bias=True)
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        self.queue = SwAVQueue(len(assign), self.queue_length, out_dim)
        self.loss_fn = SwAVLoss(temperature, assign)

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.neck]

    def embed(self, views: Sequence[Tensor]) -> Tensor:
        """z [V*B, D]: L2-normalised neck outputs of all crops, crop-major (crop v = rows v*B..(v+1)*B-1)."""
        feats = [self.backbone(torch.cat(group)) for group in resolution_groups(views)]
        return F.normalize(self.neck(torch.cat(feats)), dim=1)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.detach().float(), dim=1).to(w.dtype))

    @torch.no_grad()
    def assign(self, z: Tensor) -> Tensor:
        """Codes [A, n, K] of the embeddings z [A, n, D] of the assignment crops (this rank's n samples):
        Sinkhorn over the global batch, preceded by the queue once it is full; then the queue takes z.
        Float32 with autocast off (the codes decide the targets: bf16 scores would change them)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.detach().float()
            w = self.prototypes.weight.detach().float()
            batch = z.shape[1] * distributed.get_world_size()
            full = self.queue.is_full(batch)
            codes = []
            for a in range(z.shape[0]):
                scores = z[a] @ w.t()  # [n, K]
                if full:
                    scores = torch.cat([self.queue.local_rows(a, batch) @ w.t(), scores])
                codes.append(distributed_sinkhorn(scores, self.epsilon, self.sinkhorn_iterations)[-z.shape[1] :])
            self.queue.push(z)
            return torch.stack(codes)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        views = batch["views"]
        if len(views) != self.num_views:
            raise ValueError(f"SwAV expects {self.num_views} crops per image (sum of num_crops), got {len(views)}")
        n = views[0].shape[0]
        self.normalize_prototypes()  # official: at the start of every iteration
        z = self.embed(views)  # [V*n, D]
        scores = self.prototypes(z)  # [V*n, K]
        codes = self.assign(z.view(len(views), n, -1)[self.crops_for_assign])  # [A, n, K], no gradient
        loss = self.loss_fn(scores.view(len(views), n, -1), codes)
        return {"loss": loss}

    def on_epoch_start(self, ctx: TrainContext) -> None:
        if self.queue_length > 0 and ctx.state.epoch >= self.queue_start_epoch:
            self.queue.active.fill_(True)

    def before_optimizer_step(self, state: TrainState) -> None:
        if state.step < self.freeze_prototypes_iters:  # official: p.grad = None (no update at all)
            self.prototypes.weight.grad = None
