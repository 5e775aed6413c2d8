"""selfsup.clustering: torch k-means against scikit-learn and against its own definition, in one CPU process.

The multi-process path (unequal shards on 2 gloo ranks = 1 process on all rows) is in test_distributed.py.
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from selfsup import clustering
from selfsup.clustering import kmeans, torch_kmeans
from selfsup.errors import ConfigError


def _randn(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    return float(((x.double() - centroids.double()[labels]) ** 2).sum())


def _blobs(per_blob: int = 50, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 blobs (sigma 0.3) around 10 * e_0 .. 10 * e_3: rows, true labels, blob centres."""
    centres = 10 * torch.eye(4, dim)
    truth = torch.arange(4).repeat_interleave(per_blob)
    x = centres[truth] + 0.3 * _randn(4 * per_blob, dim, seed)
    return x, truth, centres


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Independent argmin: exact pairwise differences in float64 (no ||x||^2 - 2 x.c + ||c||^2 expansion)."""
    d = torch.cdist(x.double(), centroids.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.argmin(dim=1)


# ---------------------------------------------------------------------------------------------- a real k-means
def test_blobs_recover_the_true_partition_and_sklearn_inertia():
    x, truth, centres = _blobs()
    best = KMeans(n_clusters=4, n_init=10, random_state=0).fit(x.numpy())  # k-means++ x 10: the global optimum
    assert adjusted_rand_score(truth, best.labels_) == 1.0
    covering = 0
    for seed in range(40):
        # Lloyd from a random init only finds the blobs when the k initial rows lie in k different blobs
        init = torch_kmeans(x, 4, iters=0, seed=seed)[1]
        if len(set(_nearest(init, centres).tolist())) < 4:
            continue
        covering += 1
        labels, centroids = torch_kmeans(x, 4, iters=20, seed=seed)
        assert adjusted_rand_score(truth, labels) == 1.0, seed
        assert _inertia(x, labels, centroids) <= 1.01 * best.inertia_, seed
        torch.testing.assert_close(centroids[labels], torch.as_tensor(best.cluster_centers_)[best.labels_])
    assert covering >= 2  # the loop checked something


def test_random_data_inertia_is_close_to_sklearn():
    x = _randn(2000, 8)
    for k, seed in ((10, 0), (25, 1)):
        labels, centroids = torch_kmeans(x, k, iters=20, seed=seed)
        ref = KMeans(n_clusters=k, n_init=1, max_iter=20, random_state=seed).fit(x.numpy())
        assert _inertia(x, labels, centroids) <= 1.05 * ref.inertia_, k


def test_same_init_gives_sklearn_lloyd_result():
    """From the same initial centroids, scikit-learn's Lloyd and torch_kmeans take the same steps."""
    x = _randn(1000, 6, seed=1)
    k = 12
    init = torch_kmeans(x, k, iters=0, seed=5)[1]
    for iters in (1, 3, 30):
        labels, centroids = torch_kmeans(x, k, iters=iters, seed=5)
        ref = KMeans(n_clusters=k, init=init.numpy(), n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(
            x.numpy()
        )
        assert torch.equal(labels, torch.as_tensor(ref.labels_, dtype=torch.long)), iters
        torch.testing.assert_close(centroids, torch.as_tensor(ref.cluster_centers_), atol=1e-5, rtol=0)


def test_init_is_k_distinct_rows():
    x = _randn(300, 4)
    labels, init = torch_kmeans(x, 17, iters=0, seed=3)
    rows = [int(torch.nonzero((x == c).all(dim=1)).flatten()[0]) for c in init]  # each centroid is a row of x
    assert len(set(rows)) == 17
    assert torch.equal(labels[rows], torch.arange(17))  # iters=0: labels from the initial centroids


def test_labels_are_the_argmin_of_the_returned_centroids():
    x = _randn(500, 16, seed=2)
    for iters in (0, 1, 3, 20):  # also before convergence: the final labels come from the final centroids
        labels, centroids = torch_kmeans(x, 12, iters=iters, seed=0)
        assert labels.dtype == torch.long and labels.shape == (500,)
        assert centroids.dtype == torch.float32 and centroids.shape == (12, 16)
        assert torch.equal(labels, _nearest(x, centroids)), iters


def test_centroids_are_the_means_of_their_members_after_convergence():
    x = _randn(400, 5, seed=3)
    labels, centroids = torch_kmeans(x, 9, iters=200, seed=0)
    counts = torch.bincount(labels, minlength=9)
    assert (counts > 0).all()
    means = torch.stack([x[labels == c].mean(dim=0) for c in range(9)])
    torch.testing.assert_close(centroids, means, atol=1e-5, rtol=0)
    # converged: one more Lloyd step from here changes nothing
    assert torch.equal(_nearest(x, means), labels)


def test_seed_determines_the_result():
    x = _randn(300, 4, seed=4)
    a, b = torch_kmeans(x, 7, seed=11), torch_kmeans(x, 7, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    init_11, init_12 = torch_kmeans(x, 7, iters=0, seed=11)[1], torch_kmeans(x, 7, iters=0, seed=12)[1]
    assert not torch.equal(init_11, init_12)
    assert not torch.equal(torch_kmeans(x, 7, seed=12)[1], a[1])


def test_chunk_size_does_not_change_the_result():
    x = _randn(300, 8, seed=5)
    labels, centroids = torch_kmeans(x, 9, iters=10, seed=0)
    for chunk in (1, 7, 64, 299, 300):
        got = torch_kmeans(x, 9, iters=10, seed=0, chunk=chunk)
        assert torch.equal(got[0], labels) and torch.equal(got[1], centroids), chunk


# ---------------------------------------------------------------------------------------------- empty clusters
def test_empty_clusters_are_reseeded_with_the_farthest_rows():
    """Rows 0 x 8, 50, 100 and k = 3: seed 0 draws three zero rows, so after the first assignment
    (everything in cluster 0, ties go to the lowest index) clusters 1 and 2 are empty: the farthest
    row (100) re-seeds cluster 1, the next (50) cluster 2; cluster 0 is the mean of all rows."""
    x = torch.tensor([0.0] * 8 + [50.0, 100.0]).unsqueeze(1)
    assert torch.equal(torch_kmeans(x, 3, iters=0, seed=0)[1], torch.zeros(3, 1))
    labels, centroids = torch_kmeans(x, 3, iters=1, seed=0)
    assert torch.equal(centroids.flatten(), torch.tensor([15.0, 100.0, 50.0]))
    assert labels.tolist() == [0] * 8 + [2, 1]
    labels, centroids = torch_kmeans(x, 3, iters=20, seed=0)
    assert torch.equal(centroids.flatten(), torch.tensor([0.0, 100.0, 50.0]))


def test_duplicated_points_give_k_non_empty_clusters():
    """8 distinct points (cube corners) repeated 4..12 times: random inits draw duplicates, whose
    clusters come out empty; re-seeding ends with one cluster per distinct point, never NaN."""
    corners = torch.tensor([[a, b, c] for a in (0, 10) for b in (0, 10) for c in (0, 10)], dtype=torch.float32)
    which = torch.arange(8).repeat_interleave(torch.tensor([12, 10, 9, 8, 8, 7, 6, 4]))
    which = which[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    x = corners[which]
    with_duplicates = 0
    for seed in range(6):
        init = torch_kmeans(x, 8, iters=0, seed=seed)[1]
        with_duplicates += len(torch.unique(init, dim=0)) < 8
        labels, centroids = torch_kmeans(x, 8, iters=20, seed=seed)
        assert torch.isfinite(centroids).all()
        assert (torch.bincount(labels, minlength=8) > 0).all(), seed
        assert adjusted_rand_score(which, labels) == 1.0
        assert torch.equal(centroids[labels], x)
    assert with_duplicates >= 4  # the empty-cluster path ran


def test_more_clusters_than_distinct_points_stays_finite():
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    which = torch.arange(3).repeat(5)
    x = points[which]
    for seed in range(4):
        labels, centroids = torch_kmeans(x, 5, iters=20, seed=seed)
        assert torch.isfinite(centroids).all()
        assert (torch.bincount(labels, minlength=5) > 0).sum() == 3  # as many as there are distinct points
        assert adjusted_rand_score(which, labels) == 1.0
        assert torch.equal(centroids[labels], x)
    labels, _ = torch_kmeans(_randn(10, 3), 10, seed=0)  # k = N: every row its own cluster
    assert sorted(labels.tolist()) == list(range(10))


# ---------------------------------------------------------------------------------------------- numerics
def test_autocast_and_low_precision_inputs_do_not_change_the_result():
    x = _randn(600, 32, seed=6)
    labels, centroids = torch_kmeans(x, 40, iters=5, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch_kmeans(x, 40, iters=5, seed=0)
    assert torch.equal(got[0], labels) and torch.equal(got[1], centroids)
    assert got[1].dtype == torch.float32
    xb = x.to(torch.bfloat16)  # bf16 features are upcast, not clustered in bf16
    got, want = torch_kmeans(xb, 40, iters=5, seed=0), torch_kmeans(xb.float(), 40, iters=5, seed=0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1].dtype == torch.float32


def test_distances_use_full_float32_matmuls_and_restore_the_setting(monkeypatch):
    seen = []
    assign = clustering._assign

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return assign(*args, **kwargs)

    monkeypatch.setattr(clustering, "_assign", spy)
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    try:
        torch.set_float32_matmul_precision("medium")  # a caller allowing TF32 / bf16 matmuls
        before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        assert before != ("ieee", "ieee")
        torch_kmeans(_randn(50, 4), 3, iters=2, seed=0)
        assert seen and all(s == ("ieee", "ieee") for s in seen)
        after = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        assert after == before
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved


# ---------------------------------------------------------------------------------------------- kmeans()
@pytest.fixture
def no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError


def test_kmeans_one_cpu_process_is_sklearn(no_faiss, caplog):
    x = _randn(500, 6, seed=7)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        labels = kmeans(x, 7, iters=15, seed=3)
    ref = KMeans(n_clusters=7, n_init=1, max_iter=15, random_state=3).fit_predict(x.numpy())
    assert labels.dtype == torch.long and labels.device == x.device
    np.testing.assert_array_equal(labels.numpy(), ref)
    assert any(
        "scikit-learn" in r.getMessage() and "500 rows x 6 features" in r.getMessage() and "K=7" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO
    ), caplog.text


def test_kmeans_one_cpu_process_uses_faiss_when_installed(monkeypatch, caplog):
    calls = {}

    class FakeKmeans:
        def __init__(self, d, k, **kwargs):
            calls.update(d=d, k=k, **kwargs)
            self.index = self

        def train(self, x):
            calls["train"] = x

        def search(self, x, n):
            return np.zeros((len(x), n), np.float32), (np.arange(len(x)) % calls["k"])[:, None]

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(Kmeans=FakeKmeans))
    x = _randn(20, 3).double()
    with caplog.at_level(logging.INFO, logger="selfsup"):
        labels = kmeans(x, 4, iters=9, seed=2)
    assert (calls["d"], calls["k"], calls["niter"], calls["seed"]) == (3, 4, 9, 2)
    assert calls["train"].dtype == np.float32 and calls["train"].flags["C_CONTIGUOUS"]
    assert torch.equal(labels, torch.arange(20) % 4)
    assert "faiss" in caplog.text


def test_kmeans_uses_torch_with_several_processes(monkeypatch, caplog):
    calls = []

    def fake(features, k, iters, seed):
        calls.append((features.shape, k, iters, seed))
        return torch.zeros(len(features), dtype=torch.long), torch.zeros(k, features.shape[1])

    monkeypatch.setattr(clustering.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(clustering, "torch_kmeans", fake)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        labels = kmeans(_randn(30, 4), 5, iters=7, seed=1)
    assert calls == [(torch.Size([30, 4]), 5, 7, 1)] and labels.shape == (30,)
    assert "torch on cpu, 2 process(es)" in caplog.text


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("features", "kwargs", "match"),
    [
        (torch.zeros(5), {"k": 2}, r"2-D features \[rows, dim\], got shape \(5,\)"),
        (torch.zeros(2, 3, 4), {"k": 2}, r"2-D features .* got shape \(2, 3, 4\)"),
        (torch.zeros(5, 2), {"k": 0}, r"k=0 clusters must be between 1 and the number of rows \(5\)"),
        (torch.zeros(5, 2), {"k": 6}, r"k=6 clusters must be between 1 and the number of rows \(5\)"),
        (torch.zeros(0, 2), {"k": 1}, r"k=1 clusters must be between 1 and the number of rows \(0\)"),
        (torch.zeros(5, 2), {"k": 2, "iters": -1}, r"iters=-1 must be >= 0"),
        (torch.zeros(5, 2), {"k": 2, "chunk": 0}, r"chunk=0 must be >= 1"),
    ],
)
def test_torch_kmeans_errors(features, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        torch_kmeans(features, **kwargs)


@pytest.mark.parametrize(
    ("features", "kwargs", "match"),
    [
        (torch.zeros(5), {"k": 2}, r"2-D features \[rows, dim\], got shape \(5,\)"),
        (torch.zeros(5, 2), {"k": 6}, r"k=6 clusters must be between 1 and the number of rows \(5\)"),
        (torch.zeros(5, 2), {"k": 0}, r"k=0 clusters must be between 1"),
        (torch.zeros(5, 2), {"k": 2, "iters": 0}, r"iters=0 must be >= 1"),
    ],
)
def test_kmeans_errors(no_faiss, features, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        kmeans(features, **kwargs)
