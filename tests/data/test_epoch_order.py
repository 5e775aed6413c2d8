"""An algorithm's own epoch order (``Algorithm.epoch_indices``, DeepCluster's uniform sampling over
clusters): sharded like DistributedSampler, seeded per stream position, followed by the trainer."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg, tiny
from selfsup.data.loader import SeededSampler


def _sampled(order: torch.Tensor, world: int, start: int = 0) -> list[list[tuple[int, int]]]:
    data = list(range(len(order)))
    return [
        list(SeededSampler(data, num_replicas=world, rank=r, seed=3, drop_last=True, start=start, order=order))
        for r in range(world)
    ]


def test_order_is_sharded_like_distributed_sampler_and_seeded_per_position():
    order = torch.tensor([4, 4, 0, 9, 4, 2, 7, 7, 1, 3, 5])  # 11 items, repeats
    one = _sampled(order, 1)[0]
    assert [i for i, _ in one] == order.tolist()
    seeds = [s for _, s in one]
    assert len(set(seeds)) == len(seeds)  # image 4 drawn three times: three different views
    two = _sampled(order, 2)
    assert [i for i, _ in two[0]] == order[0:10:2].tolist() and [i for i, _ in two[1]] == order[1:10:2].tolist()
    assert [s for _, s in two[0]] == seeds[0:10:2] and [s for _, s in two[1]] == seeds[1:10:2]
    assert _sampled(order, 2, start=2)[1] == two[1][2:]  # resumed mid-epoch: the same rest


@pytest.mark.parametrize(
    "order, match",
    [(torch.arange(5), "11 dataset indices"), (torch.arange(11.0), "int64"), (torch.arange(11) + 1, "outside")],
)
def test_bad_order_is_refused(order, match):
    with pytest.raises(ValueError, match=match):
        SeededSampler(list(range(11)), num_replicas=1, rank=0, order=order)


def test_trainer_follows_the_algorithms_order(tmp_path, monkeypatch):
    """Epoch e visits the images the algorithm's ``epoch_indices(e, seed)`` lists, in that order."""
    from selfsup.algorithms.simclr import SimCLR
    from selfsup.engine.trainer import Trainer

    n, seen, calls = 32, [], []

    def epoch_indices(self, epoch, seed):
        calls.append((epoch, seed))
        return torch.tensor([(5 * j + epoch) % 7 for j in range(n)])  # only images 0..6

    forward = SimCLR.forward

    def recording(self, batch):
        seen.append(batch["index"].tolist())
        return forward(self, batch)

    monkeypatch.setattr(SimCLR, "epoch_indices", epoch_indices)
    monkeypatch.setattr(SimCLR, "forward", recording)
    overrides = tiny("simclr") + [f"dataset.num_samples={n}", "schedule.epochs=2", "knn.enabled=false", "seed=4"]
    Trainer(compose_cfg(overrides), tmp_path).fit()
    assert calls == [(0, 4), (1, 4)]
    assert seen == [[(5 * j + e) % 7 for j in range(b * 16, (b + 1) * 16)] for e in range(2) for b in range(2)]
