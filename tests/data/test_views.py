"""Augmentation views: the algorithms' declared pipelines, seeded views per (epoch, item), Normalize."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from conftest import ALGOS, compose_cfg
from selfsup.data.datasets import FakeImages
from selfsup.data.loader import SeededSampler, SeededViews
from selfsup.data.views import (
    MultiViewDataset,
    Normalize,
    ViewPipeline,
    as_view_config,
    build_view_transform,
    count_views,
    expand_views,
    view_sizes,
)
from selfsup.errors import ConfigError

# every algorithm (discovered from conf/algo/) and the number of views its class takes
EXPECTED_VIEWS = {algo: get_class(compose_cfg([f"algo={algo}"]).algo.model._target_).num_views for algo in ALGOS}


def _view_specs(algo: str, image_size: int = 32) -> list[dict]:
    # dataset=fake: no conf/algo_dataset/<algo>_fake.yaml, so these are conf/algo/<algo>.yaml's views
    cfg = compose_cfg([f"algo={algo}", "dataset=fake", f"dataset.image_size={image_size}"])
    specs = OmegaConf.to_container(cfg.algo.views, resolve=True)
    assert isinstance(specs, list)
    return specs


@pytest.fixture(scope="module")
def specs() -> dict[str, list[dict]]:
    return {algo: _view_specs(algo) for algo in EXPECTED_VIEWS}


def _image(h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ build / expand


@pytest.mark.parametrize("algo", list(EXPECTED_VIEWS))
def test_algo_views_produce_uint8_views(specs, algo):
    """Every algorithm's pipelines give the number of uint8 views its class takes, each of its declared side:
    copies x rotations x grid patches (Rotation-Pred, Relative-Loc); multi-crop's local crops keep their
    own size (SwAV, DINO: 96 px), the others follow ``${dataset.image_size}``."""
    sizes = view_sizes(specs[algo])
    assert len(sizes) == EXPECTED_VIEWS[algo] == count_views(specs[algo])
    assert sizes[0] == 32 or algo == "relative-loc"  # ${dataset.image_size} resolved (Relative-Loc: 255 px)
    for img in (_image(), _image(32, 32, seed=1), _image(64, 20, seed=2)):
        for seed in range(3):
            torch.manual_seed(seed)
            out = [v for spec in expand_views(specs[algo]) for v in ViewPipeline(spec)(img).images]
            assert [(v.dtype, tuple(v.shape)) for v in out] == [(torch.uint8, (3, s, s)) for s in sizes]


def test_view_size_follows_dataset_image_size():
    spec = _view_specs("simclr", image_size=24)[0]
    out = build_view_transform(spec)(_image())
    assert tuple(out.shape) == (3, 24, 24)


def test_algo_pipelines_contain_declared_ops(specs):
    def ops(spec):
        names = []
        for t in build_view_transform(spec).transforms:
            inner = t.transforms if isinstance(t, v2.RandomApply) else [t]
            names += [type(x).__name__ for x in inner]
        return names

    simclr = ops(specs["simclr"][0])
    assert simclr == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale", "GaussianBlur"]
    assert "RandomAffine" in ops(specs["odc"][0])
    assert ops(specs["mae"][0]) == ["RandomResizedCrop", "RandomHorizontalFlip"]
    mae_crop = build_view_transform(specs["mae"][0]).transforms[0]
    assert mae_crop.interpolation == v2.InterpolationMode.BICUBIC and mae_crop.scale == (0.2, 1.0)


def test_views_are_random_but_seeded(specs):
    t, img = build_view_transform(specs["simclr"][0]), _image()
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    assert torch.equal(a, t(img))
    assert not torch.equal(a, t(img))


@pytest.mark.parametrize("key", ["hflip", "color_jitter", "grayscale", "blur", "solarize"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probability_outside_unit_interval_raises(specs, key, value):
    spec = {**specs["simclr"][0], key: value}
    with pytest.raises(ConfigError, match=key):
        build_view_transform(spec)


def test_probability_bounds_are_allowed(specs):
    spec = {**specs["simclr"][0], "hflip": 1.0, "solarize": 1.0, "grayscale": 0.0}
    out = build_view_transform(spec)(_image())
    assert tuple(out.shape) == (3, 32, 32)


def test_bad_interpolation_raises(specs):
    spec = {**specs["mae"][0], "interpolation": "nearest"}
    with pytest.raises(ConfigError, match="interpolation"):
        build_view_transform(spec)


def test_expand_views_honours_copies(specs):
    a, b = {**specs["mae"][0], "copies": 3}, {**specs["odc"][0], "copies": 1}
    out = expand_views([a, b])
    assert len(out) == 4 and out[:3] == [as_view_config(a)] * 3 and out[3] == as_view_config(b)
    assert expand_views([]) == []
    with pytest.raises(ConfigError, match="algo.views\\[\\].copies must be >= 1, got 0"):
        expand_views([{**a, "copies": 0}])
    with pytest.raises(ConfigError, match="algo.views\\[\\] has unknown key\\(s\\) \\['hflp'\\]"):
        expand_views([{**a, "hflp": 0.5}])


def test_multiview_dataset_item():
    base = FakeImages(num_samples=8, image_size=16)
    spec = {**_view_specs("simclr", image_size=16)[0]}
    ds = MultiViewDataset(base, [build_view_transform(s) for s in expand_views([spec])])
    item = ds[5]
    assert len(ds) == 8 and item["label"] == int(base.labels[5]) and item["index"] == 5
    assert len(item["views"]) == 2 and all(tuple(v.shape) == (3, 16, 16) for v in item["views"])


# ------------------------------------------------------------------------------------ seeded views


@pytest.fixture(scope="module")
def seeded_views() -> SeededViews:
    base = FakeImages(num_samples=24, num_classes=3, image_size=16)
    specs = expand_views(_view_specs("simclr", image_size=16))
    return SeededViews(base, [build_view_transform(s) for s in specs])


def _epoch(dataset, epoch: int, num_workers: int = 0, seed: int = 0, replicas: int = 1, rank: int = 0):
    sampler = SeededSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers, drop_last=True)
    indices, views = [], []
    for batch in loader:
        indices.append(batch["index"])
        views.append(torch.stack(batch["views"], dim=1))  # [B, V, 3, H, W]
    return torch.cat(indices), torch.cat(views)


def _by_index(indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    return views[indices.argsort()]


def test_seeded_views_independent_of_workers_and_repeatable(seeded_views):
    idx0, views0 = _epoch(seeded_views, epoch=3, num_workers=0)
    idx2, views2 = _epoch(seeded_views, epoch=3, num_workers=2)
    again_idx, again_views = _epoch(seeded_views, epoch=3, num_workers=0)
    assert sorted(idx0.tolist()) == list(range(24))
    assert torch.equal(idx0, idx2) and torch.equal(views0, views2)
    assert torch.equal(idx0, again_idx) and torch.equal(views0, again_views)
    assert not torch.equal(views0[:, 0], views0[:, 1])  # the two copies are sampled independently


def test_seeded_views_change_with_epoch_and_seed(seeded_views):
    idx0, views0 = _epoch(seeded_views, epoch=0)
    idx1, views1 = _epoch(seeded_views, epoch=1)
    assert not torch.equal(idx0, idx1)  # reshuffled
    a, b = _by_index(idx0, views0), _by_index(idx1, views1)
    different = [not torch.equal(a[i], b[i]) for i in range(24)]
    assert sum(different) >= 20  # same image, new augmentation
    idx_s, views_s = _epoch(seeded_views, epoch=0, seed=1)
    assert not torch.equal(a, _by_index(idx_s, views_s))


def test_seeded_views_do_not_touch_global_rng(seeded_views):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seeded_views[(0, 42)]
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(seeded_views[(5, 7)]["views"], seeded_views[(5, 7)]["views"]))


def test_seeded_sampler_keys():
    sampler = SeededSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert sorted(i for i, _ in keys) == list(range(10))
    seeds = [s for _, s in keys]
    assert len(set(seeds)) == 10 and all(0 <= s < 2**63 for s in seeds)
    assert keys == list(sampler)
    sampler.set_epoch(3)
    assert {i: s for i, s in keys}.items().isdisjoint({i: s for i, s in sampler}.items())


def test_seeded_sampler_ranks_are_disjoint(seeded_views):
    n = 23  # odd: drop_last drops the tail so both ranks get the same number of items
    data = list(range(n))
    per_rank = []
    for rank in (0, 1):
        sampler = SeededSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(4)
        assert len(sampler) == n // 2
        per_rank.append(dict(sampler))
    a, b = per_rank
    assert len(a) == len(b) == n // 2
    assert set(a).isdisjoint(b) and set(a) | set(b) <= set(data)
    single_sampler = SeededSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    single_sampler.set_epoch(4)
    single = dict(single_sampler)
    assert all(single[i] == s for i, s in {**a, **b}.items())  # an item's seed does not depend on the rank

    idx_a, _ = _epoch(seeded_views, epoch=1, replicas=2, rank=0)
    idx_b, _ = _epoch(seeded_views, epoch=1, replicas=2, rank=1)
    assert len(idx_a) == len(idx_b) == 12 and set(idx_a.tolist()).isdisjoint(idx_b.tolist())


# ------------------------------------------------------------------------------------ Normalize


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize(channels_last):
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = Normalize(mean, std, torch.device("cpu"), channels_last=channels_last)(x)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (x.float() / 255 - m) / s
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    if channels_last:
        assert not out.is_contiguous()
