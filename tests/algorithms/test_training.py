"""Each algorithm learns: its loss goes down on fake data and on the real digits, both when it
fits a fixed batch step by step and in short end-to-end trainer runs; ODC's memory stays sound."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_cfg, run_training, tiny
from selfsup.data.views import Normalize, build_view_transform, expand_views
from selfsup.engine.optim import build_optimizer
from selfsup.engine.trainer import build, build_dataset
from selfsup.errors import ConfigError

ALGOS = ["simclr", "odc", "mae"]


class _Ctx:
    """TrainContext over a fixed tensor of images."""

    seed = 0

    def __init__(self, algo, images, normalize):
        self.algo, self.images, self.normalize = algo, images, normalize

    def extract_features(self, fn):
        self.algo.eval()
        with torch.no_grad():
            out = fn(self.normalize(self.images))
        self.algo.train()
        return out


def _build(algo_name: str, dataset: str, n: int):
    cfg = compose_cfg(tiny(algo_name, dataset))
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    ds = build_dataset(c["dataset"], "train")
    algo = build(c["algo"]["model"], backbone=build(c["backbone"]))
    algo.setup(n)
    normalize = Normalize(ds.mean, ds.std, torch.device("cpu"))
    images = torch.stack([ds[i][0] for i in range(n)])
    transforms = [build_view_transform(v) for v in expand_views(c["algo"]["views"])]
    return c, algo, images, normalize, transforms


@pytest.mark.parametrize("dataset", ["fake", "digits"])
@pytest.mark.parametrize("algo_name", ALGOS)
def test_loss_goes_down_on_a_fixed_batch(algo_name, dataset):
    torch.manual_seed(0)
    n, steps = 32, 30
    c, algo, images, normalize, transforms = _build(algo_name, dataset, n)
    algo.on_train_start(_Ctx(algo, images, normalize))
    opt = build_optimizer(algo, c["algo"]["optimizer"], c["algo"]["optimizer"]["lr"])
    views = [normalize(torch.stack([t(img) for img in images])) for t in transforms]
    batch = {"views": views, "index": torch.arange(n), "label": torch.zeros(n, dtype=torch.long)}
    losses = []
    for step in range(1, steps + 1):
        out = algo(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        algo.after_step(step)
        losses.append(out["loss"].item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert last < 0.92 * first, f"{algo_name} on {dataset}: {first:.4f} -> {last:.4f}"


def _epoch_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo_name, dataset, extra",
    [
        ("simclr", "fake", ["dataset.num_samples=128", "algo.optimizer.lr=1.0"]),
        ("mae", "fake", ["dataset.num_samples=128", "algo.optimizer.lr=2e-3"]),
        ("simclr", "digits", ["algo.optimizer.lr=0.3"]),
        ("mae", "digits", ["backbone.patch_size=4"]),
    ],
)
def test_trainer_loss_goes_down(algo_name, dataset, extra, tmp_path):
    """A few epochs through the real trainer (data pipeline, schedule, logging): the mean loss of
    the last epoch is below that of the first."""
    overrides = tiny(algo_name, dataset) + extra + ["schedule.epochs=3", "knn.enabled=false", "log.interval=1"]
    if dataset == "digits":
        overrides.append("schedule.batch_size=64")
    result = run_training(overrides, tmp_path)
    rows = _epoch_losses(tmp_path)
    per_epoch = {}
    for r in rows:
        per_epoch.setdefault(min(int(r["epoch"] - 1e-6), 2), []).append(r["loss"])
    first, last = (sum(per_epoch[e]) / len(per_epoch[e]) for e in (0, 2))
    assert result.epochs == 3 and last < first, (first, last)


@pytest.mark.slow
def test_odc_trainer_run_keeps_a_sound_memory(tmp_path):
    overrides = tiny("odc") + [
        "dataset.num_samples=96",
        "schedule.epochs=3",
        "algo.model.num_clusters=6",
        "algo.model.min_cluster=4",
        "algo.model.centroid_interval=2",
        "log.interval=1",
    ]
    from selfsup.engine.trainer import Trainer

    trainer = Trainer(compose_cfg(overrides), tmp_path)
    result = trainer.fit()
    memory = trainer.algo.memory
    counts = torch.bincount(memory.labels, minlength=6)
    assert bool(memory.initialized) and result.knn_final is not None
    assert (counts >= 4).all(), counts  # small clusters were refilled
    assert torch.allclose(memory.features.norm(dim=1), torch.ones(96), atol=1e-5)
    weights = (counts.double() + 1e-10) ** -0.5
    assert torch.allclose(memory.class_weight.double(), weights / weights.sum(), atol=1e-6)
    rows = _epoch_losses(tmp_path)
    assert all(0.0 <= r["change_ratio"] <= 1.0 for r in rows)


def test_odc_initial_kmeans_and_centroids():
    torch.manual_seed(0)
    n = 48
    c, algo, images, normalize, _ = _build("odc", "fake", n)
    algo.on_train_start(_Ctx(algo, images, normalize))
    memory = algo.memory
    assert bool(memory.initialized)
    assert (torch.bincount(memory.labels, minlength=algo.num_clusters) >= algo.min_cluster).all()
    memory.update_centroids()
    for k in range(algo.num_clusters):
        assert torch.allclose(memory.centroids[k], memory.features[memory.labels == k].mean(0), atol=1e-5)
    # a second call (resume) keeps the memory as it is
    before = memory.labels.clone()
    algo.on_train_start(_Ctx(algo, images, normalize))
    assert torch.equal(before, memory.labels)


def test_odc_memory_update_follows_the_formula():
    torch.manual_seed(0)
    n = 40
    c, algo, images, normalize, _ = _build("odc", "fake", n)
    algo.on_train_start(_Ctx(algo, images, normalize))
    memory = algo.memory
    idx = torch.tensor([3, 7, 11])
    feat = torch.rand(3, memory.features.shape[1])
    old = memory.features[idx].clone()
    old_labels = memory.labels[idx].clone()
    ratio = memory.update_samples(idx, feat)
    expected = F.normalize(0.5 * old + 0.5 * F.normalize(feat, dim=1), dim=1)
    assert torch.allclose(memory.features[idx], expected, atol=1e-6)
    expected_labels = (expected @ memory.centroids.T).argmax(1)
    assert torch.equal(memory.labels[idx], expected_labels)
    assert ratio.item() == pytest.approx((expected_labels != old_labels).float().mean().item())


def test_odc_rejects_more_clusters_than_images():
    cfg = compose_cfg(tiny("odc") + ["algo.model.num_clusters=500"])
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    algo = build(c["algo"]["model"], backbone=build(c["backbone"]))
    with pytest.raises(ConfigError, match="more clusters"):
        algo.setup(64)
    algo2 = build({**c["algo"]["model"], "num_clusters": 40, "min_cluster": 5}, backbone=build(c["backbone"]))
    with pytest.raises(ConfigError, match="min_cluster"):
        algo2.setup(64)


def test_views_must_match_the_algorithm(tmp_path):
    with pytest.raises(ConfigError, match="takes 2 view"):
        run_training(tiny("simclr") + ["algo.views.0.copies=1"], tmp_path)
