"""k-means time of ``selfsup.clustering`` on synthetic features, beside scikit-learn on the CPU.

ODC and DeepCluster cluster the features of the whole training set; at ImageNet scale that is
1.28M x 256 into K = 10,000. Prints one line per backend (same data, same iterations)::

    python -m selfsup.tools.benchmark_kmeans --n 1280000 --dim 256 --k 10000 --device cuda
    python -m selfsup.tools.benchmark_kmeans --n 20000 --dim 64 --k 100 --sklearn   # CPU: torch vs sklearn
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from selfsup.clustering import torch_kmeans


def inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    return float(((x - centroids[labels]) ** 2).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sklearn", action="store_true", help="also time scikit-learn's KMeans on the CPU")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(args.k, args.dim, generator=gen), dim=1)
    x = F.normalize(
        centers[torch.randint(0, args.k, (args.n,), generator=gen)]
        + 0.3 * torch.randn(args.n, args.dim, generator=gen),
        dim=1,
    )  # L2-normalised like ODC's memory
    xd = x.to(args.device)
    torch_kmeans(xd[: min(len(xd), 4096)], min(args.k, 64), iters=1)  # warm-up (CUDA context, kernels)
    if xd.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    labels, centroids = torch_kmeans(xd, args.k, iters=args.iters, seed=0)
    if xd.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = torch.cuda.get_device_name(xd.device) if xd.device.type == "cuda" else "cpu"
    value = inertia(x, labels.cpu(), centroids.cpu())
    print(
        f"torch_kmeans  {args.n} x {args.dim} -> K={args.k}, {args.iters} iters on {name}: "
        f"{seconds:.2f} s, inertia {value:.1f}",
        flush=True,
    )
    if args.sklearn:
        from sklearn.cluster import KMeans

        t0 = time.perf_counter()
        km = KMeans(n_clusters=args.k, n_init=1, max_iter=args.iters, random_state=0).fit(x.numpy())
        seconds = time.perf_counter() - t0
        print(
            f"scikit-learn  {args.n} x {args.dim} -> K={args.k}, {args.iters} iters on cpu: "
            f"{seconds:.2f} s, inertia {km.inertia_:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
