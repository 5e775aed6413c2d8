"""Weighted cosine kNN (InstDisc) against a numpy loop implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.eval.knn import knn_accuracy, knn_scores


def knn_scores_reference(q: np.ndarray, bank: np.ndarray, labels: np.ndarray, c: int, k: int, t: float):
    q = q.astype(np.float64)
    bank = bank.astype(np.float64)
    k = min(k, len(bank))
    out = np.zeros((len(q), c))
    for i in range(len(q)):
        qn = q[i] / np.linalg.norm(q[i])
        sims = [float(np.dot(qn, b / np.linalg.norm(b))) for b in bank]
        top = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        for j in top:
            out[i, labels[j]] += math.exp(sims[j] / t)
    return out


def knn_accuracy_reference(q, q_labels, bank, labels, c, k, t):
    scores = knn_scores_reference(q, bank, labels, c, k, t)
    top1 = np.mean([int(np.argmax(s) == y) for s, y in zip(scores, q_labels)])
    top5 = np.mean([int(y in np.argsort(-s)[:5]) for s, y in zip(scores, q_labels)])
    return top1, top5


def _data(seed, nq=20, nb=50, d=8, c=10):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(nq, d)) * rng.uniform(0.2, 3.0, size=(nq, 1)),
        rng.integers(0, c, size=nq),
        rng.normal(size=(nb, d)),
        rng.integers(0, c, size=nb),
    )


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


@pytest.mark.parametrize(("seed", "k", "t", "c"), [(0, 5, 0.07, 10), (1, 20, 0.1, 4), (2, 1, 0.5, 3), (3, 7, 1.0, 12)])
def test_scores_match_reference(seed, k, t, c):
    q, _, bank, labels = _data(seed, c=c)
    scores = knn_scores(_t(q), _t(bank), torch.tensor(labels), c, k=k, temperature=t)
    ref = knn_scores_reference(q, bank, labels, c, k, t)
    assert scores.shape == (len(q), c)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_scores_independent_of_chunk_size():
    q, _, bank, labels = _data(4, nq=23)
    full = knn_scores(_t(q), _t(bank), torch.tensor(labels), 10, k=5, chunk=1024)
    chunked = knn_scores(_t(q), _t(bank), torch.tensor(labels), 10, k=5, chunk=4)
    torch.testing.assert_close(full, chunked)


@pytest.mark.parametrize(("seed", "k", "t"), [(5, 40, 0.07), (6, 50, 0.2), (7, 40, 1.0)])
def test_accuracy_matches_reference(seed, k, t):
    # low-dimensional data with class structure so accuracies are neither 0 nor 1
    rng = np.random.default_rng(seed)
    c = 8
    centers = rng.normal(size=(c, 4))
    bank_labels = rng.integers(0, c, size=80)
    bank = centers[bank_labels] + rng.normal(scale=0.8, size=(80, 4))
    q_labels = rng.integers(0, c, size=40)
    q = centers[q_labels] + rng.normal(scale=0.8, size=(40, 4))
    acc = knn_accuracy(_t(q), torch.tensor(q_labels), _t(bank), torch.tensor(bank_labels), c, k=k, temperature=t)
    top1, top5 = knn_accuracy_reference(q, q_labels, bank, bank_labels, c, k, t)
    # top-5 is only well defined without ties at zero: every query must see at least 5 classes
    assert ((knn_scores_reference(q, bank, bank_labels, c, k, t) > 0).sum(1) >= 5).all()
    assert 0.0 < top1 < 1.0
    assert set(acc) == {"top1", "top5"}
    assert acc["top1"] == pytest.approx(top1, abs=1e-6)
    assert acc["top5"] == pytest.approx(top5, abs=1e-6)
    assert acc["top5"] >= acc["top1"]


def test_no_top5_with_few_classes():
    q, ql, bank, bl = _data(8, c=5)
    acc = knn_accuracy(_t(q), torch.tensor(ql), _t(bank), torch.tensor(bl), 5, k=5)
    assert set(acc) == {"top1"}
    top1, _ = knn_accuracy_reference(q, ql, bank, bl, 5, 5, 0.07)
    assert acc["top1"] == pytest.approx(top1, abs=1e-6)


def test_k_larger_than_bank_is_clamped():
    q, _, bank, labels = _data(9, nb=6, c=3)
    big = knn_scores(_t(q), _t(bank), torch.tensor(labels), 3, k=100, temperature=0.5)
    exact = knn_scores(_t(q), _t(bank), torch.tensor(labels), 3, k=6, temperature=0.5)
    torch.testing.assert_close(big, exact)
    np.testing.assert_allclose(big.numpy(), knn_scores_reference(q, bank, labels, 3, 6, 0.5), rtol=1e-4)


def test_invalid_k():
    q, _, bank, labels = _data(10)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        knn_scores(_t(q), _t(bank), torch.tensor(labels), 10, k=0)


def test_separable_toy_case_is_perfect():
    # class c lives around the c-th axis; queries are noisy copies
    rng = np.random.default_rng(11)
    c, d = 6, 6
    bank_labels = np.repeat(np.arange(c), 5)
    bank = np.eye(d)[bank_labels] * 2.0 + rng.normal(scale=0.05, size=(len(bank_labels), d))
    q_labels = np.tile(np.arange(c), 3)
    q = np.eye(d)[q_labels] + rng.normal(scale=0.05, size=(len(q_labels), d))
    acc = knn_accuracy(_t(q), torch.tensor(q_labels), _t(bank), torch.tensor(bank_labels), c, k=5)
    assert acc == {"top1": 1.0, "top5": 1.0}
    # and permuting the query labels breaks it
    acc_wrong = knn_accuracy(_t(q), torch.tensor((q_labels + 1) % c), _t(bank), torch.tensor(bank_labels), c, k=5)
    assert acc_wrong["top1"] == 0.0


def test_one_hot_features_of_the_labels_give_100_percent_and_random_labels_chance():
    """Known answers: features that are the one-hot label classify perfectly; labels that have nothing to do
    with the features score about 1 / classes."""
    gen = torch.Generator().manual_seed(0)
    c = 10
    bank_labels, query_labels = torch.randint(0, c, (2000,), generator=gen), torch.randint(0, c, (1000,), generator=gen)
    bank, queries = torch.eye(c)[bank_labels], torch.eye(c)[query_labels]
    assert knn_accuracy(queries, query_labels, bank, bank_labels, c, k=20)["top1"] == 1.0
    noise_bank, noise_queries = torch.randn(2000, 32, generator=gen), torch.randn(1000, 32, generator=gen)
    chance = knn_accuracy(noise_queries, query_labels, noise_bank, bank_labels, c, k=20)
    assert abs(chance["top1"] - 1 / c) < 0.04 and abs(chance["top5"] - 5 / c) < 0.06
