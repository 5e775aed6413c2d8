"""k-means for the clustering algorithms (ODC, DeepCluster) at ImageNet scale: on the accelerator, across ranks.

ODC and DeepCluster cluster the features of every training image: for ImageNet N = 1.28M rows of
D = 256 features into K = 10,000 clusters. Lloyd's algorithm alternates

    assignment:  label_i = argmin_c ||x_i - m_c||^2 = argmin_c (||m_c||^2 - 2 <x_i, m_c>)
    update:      m_c = (sum_{i: label_i = c} x_i) / |{i: label_i = c}|

The assignment is one matmul per chunk of rows (``chunk`` rows x K, never the full N x K matrix);
``||x_i||^2`` does not change the argmin and is only added for the distances the empty-cluster rule
needs. The update is a per-cluster sum (``index_add_``) and count (``bincount``) over this rank's
rows, all-reduced over ranks, so each rank keeps only its own shard of the rows and the k-means is
exactly the one over the union of the shards (up to float summation order).

Why not scikit-learn or faiss at this size: both run on the CPU of one process (the previous ODC
code clustered on rank 0 while the other ranks waited): one iteration is N x K x D = 3.3e12
multiply-adds, hours on CPU for 20 iterations, and the features of every rank must first be
gathered on one. ``torch_kmeans`` runs where the features already are (the GPU of each rank) on
1/world of the rows each. In one CPU process ``kmeans`` still uses faiss (if installed) or
scikit-learn, which are faster than torch there. The time at ImageNet scale (1.28M x 256,
K = 10,000, 20 iterations) is to be measured on a GPU; it has not been measured here.

Numerics: everything runs in float32 outside autocast and with TF32 / reduced-precision float32
matmuls off (restored afterwards): bf16 or TF32 rounding of ``<x, m>`` flips argmins between
nearby centroids, and then labels depend on the precision settings of the caller.

Initialisation: ``k`` distinct rows drawn uniformly from the GLOBAL row set (rows numbered rank by
rank: rank r's row j is global row offset_r + j) by ``torch.randperm`` with a CPU
``torch.Generator`` seeded with ``seed``: identical on every rank and for any split of the rows
into shards, so 2 ranks and 1 process start from the same centroids.

Empty clusters (the rule): after an update, the clusters that received no row are re-seeded with
the rows farthest from their current centroid (squared distance to the centroid they were assigned
to), taken over all ranks: the farthest row goes to the lowest-numbered empty cluster, the next
farthest to the next, ties broken by the lower global row index. This is scikit-learn's rule
(without moving that row's contribution out of its old cluster: the next assignment does). It is
deterministic and the same on every rank. When the data has fewer distinct points than ``k``, some
clusters cannot be filled: they keep a centroid equal to an existing point (never NaN) and stay
empty.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from selfsup import distributed
from selfsup.errors import ConfigError

log = logging.getLogger("selfsup")


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Full-precision float32 matmuls (no TF32 on CUDA, no bf16/TF32 in oneDNN on CPU), restored on exit.

    Uses the per-backend ``fp32_precision`` API where it exists: reading the legacy
    ``torch.get_float32_matmul_precision()`` raises once a caller has used the new API.
    """
    backends = [
        b
        for b in (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.mkldnn, "matmul", None))
        if b is not None and hasattr(b, "fp32_precision")
    ]
    if backends:
        saved = [(b, b.fp32_precision) for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, value in saved:
                b.fp32_precision = value
    else:  # torch < 2.9
        precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
        try:
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_tf32 = False
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
            torch.backends.cuda.matmul.allow_tf32 = tf32


def _check_2d(features: Tensor) -> None:
    if features.dim() != 2:
        raise ConfigError(f"k-means needs 2-D features [rows, dim], got shape {tuple(features.shape)}")


def _check_k(k: int, total: int) -> None:
    if not 1 <= k <= total:
        raise ConfigError(f"k-means: k={k} clusters must be between 1 and the number of rows ({total})")


def _assign(x: Tensor, x_sq: Tensor, centroids: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row and its squared distance, ``chunk`` rows at a time."""
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    sq_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    c_sq = (centroids * centroids).sum(dim=1)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        scores = torch.addmm(c_sq, x[start:end], centroids.T, alpha=-2.0)  # ||m||^2 - 2 <x, m>: [chunk, K]
        best, nearest = scores.min(dim=1)  # ties: the lowest cluster index
        labels[start:end] = nearest
        sq_dist[start:end] = best + x_sq[start:end]
    return labels, sq_dist.clamp_(min=0.0)


def _rows(x: Tensor, global_index: Tensor, offset: int) -> Tensor:
    """Rows ``global_index`` of the global row set on every rank: each rank fills the ones it owns, then a sum."""
    out = torch.zeros(len(global_index), x.shape[1], dtype=x.dtype, device=x.device)
    local = global_index.to(x.device) - offset
    own = (local >= 0) & (local < x.shape[0])
    out[own] = x[local[own]]
    return distributed.all_reduce_(out)


def _farthest_rows(sq_dist: Tensor, m: int, offset: int) -> Tensor:
    """Global indices of the ``m`` rows farthest from their centroid over all ranks (ties: lower index first)."""
    order = torch.sort(sq_dist, descending=True, stable=True).indices[:m]  # stable: ties keep the lower index
    cand_dist = torch.full((m,), -1.0, device=sq_dist.device)  # padding sorts after every real distance (>= 0)
    cand_index = torch.full((m,), -1, dtype=torch.long, device=sq_dist.device)
    cand_dist[: len(order)] = sq_dist[order]
    cand_index[: len(order)] = order + offset
    all_dist, all_index = distributed.all_gather(cand_dist), distributed.all_gather(cand_index)
    by_index = torch.argsort(all_index)  # then a stable sort by distance: distance desc, global index asc
    all_dist, all_index = all_dist[by_index], all_index[by_index]
    return all_index[torch.sort(all_dist, descending=True, stable=True).indices[:m]]


@torch.no_grad()
def torch_kmeans(features: Tensor, k: int, iters: int = 20, seed: int = 0, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means (Euclidean) of the rows of every rank, on the device of ``features``.

    ``features`` [n_r, D] is THIS rank's shard of the rows (shards may differ in size, even be
    empty); every rank must call this with the same ``k``, ``iters``, ``seed``. Returns the labels
    [n_r] (int64) of this rank's rows and the centroids [k, D] (float32, bitwise identical on every
    rank). ``iters`` Lloyd iterations (update then assignment), stopping early once no label
    changes on any rank; ``iters=0`` returns the initial centroids. See the module docstring for the
    initialisation and the empty-cluster rule.
    """
    _check_2d(features)
    if iters < 0:
        raise ConfigError(f"k-means: iters={iters} must be >= 0")
    if chunk < 1:
        raise ConfigError(f"k-means: chunk={chunk} must be >= 1")
    device = features.device
    n, dim = features.shape
    sizes = distributed.all_gather(torch.tensor([n], dtype=torch.long, device=device)).tolist()
    total, offset = sum(sizes), sum(sizes[: distributed.get_rank()])
    _check_k(k, total)

    with torch.autocast(device_type=device.type, enabled=False), _ieee_float32_matmul():
        x = features.detach().to(torch.float32).contiguous()
        x_sq = (x * x).sum(dim=1)
        gen = torch.Generator().manual_seed(seed)
        centroids = _rows(x, torch.randperm(total, generator=gen)[:k], offset)
        labels, sq_dist = _assign(x, x_sq, centroids, chunk)
        done = 0
        for done in range(1, iters + 1):
            sums = torch.zeros(k, dim, dtype=torch.float32, device=device).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            distributed.all_reduce_(sums)
            distributed.all_reduce_(counts)
            empty = counts == 0
            new = sums / counts.clamp(min=1).unsqueeze(1).to(torch.float32)
            new[empty] = centroids[empty]
            empty_ids = empty.nonzero().flatten()
            if len(empty_ids):
                new[empty_ids] = _rows(x, _farthest_rows(sq_dist, len(empty_ids), offset), offset)
                log.debug("k-means iteration %d: re-seeded %d empty cluster(s)", done, len(empty_ids))
            # all-reduce gives the same sums on every rank with gloo and nccl; the broadcast makes
            # "bitwise identical centroids" hold for any backend, for k x D floats per iteration
            centroids = distributed.broadcast_(new, src=0)
            new_labels, sq_dist = _assign(x, x_sq, centroids, chunk)
            changed = distributed.all_reduce_((new_labels != labels).sum())
            labels = new_labels
            if changed.item() == 0:
                break
        log.debug("k-means: %d iteration(s) of at most %d", done, iters)
    return labels, centroids


def kmeans(features: Tensor, k: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Cluster labels [n_r] (int64, on the device of ``features``) of THIS rank's rows ``features`` [n_r, D].

    Several processes or features on an accelerator: ``torch_kmeans`` over the rows of every rank.
    One CPU process: faiss if it is importable, else scikit-learn ``KMeans(n_init=1)``. Logs the
    backend, the sizes and the time at INFO level.
    """
    _check_2d(features)
    if iters < 1:
        raise ConfigError(f"k-means: iters={iters} must be >= 1")
    world = distributed.get_world_size()
    n, dim = features.shape
    start = time.perf_counter()
    if features.device.type != "cpu" or world > 1:
        backend = f"torch on {features.device}, {world} process(es)"
        labels, _ = torch_kmeans(features, k, iters=iters, seed=seed)
        if features.device.type == "cuda":
            torch.cuda.synchronize(features.device)
    else:
        _check_k(k, n)
        x = features.detach().to(torch.float32).contiguous().numpy()
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            backend = "faiss on cpu"
            km = faiss.Kmeans(dim, k, niter=iters, seed=seed, gpu=False)
            km.train(x)
            out = km.index.search(x, 1)[1][:, 0]
        else:
            from sklearn.cluster import KMeans

            backend = "scikit-learn on cpu"
            out = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit_predict(x)
        labels = torch.as_tensor(out, dtype=torch.long)
    log.info(
        "k-means (%s): %d rows x %d features on this process, K=%d, %d iterations at most: %.2f s",
        backend,
        n,
        dim,
        k,
        iters,
        time.perf_counter() - start,
    )
    return labels
