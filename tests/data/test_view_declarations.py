"""View declarations for the zoo: multi-crop, the same crop at two resolutions plus a mask (BEiT/CAE),
per-view targets (Rotation-Pred), patch grids (Relative-Loc), run per sample and batched by the loader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from selfsup.data.datasets import InMemoryImages
from selfsup.data.loader import SeededViews
from selfsup.data.views import (
    MultiViewDataset,
    ViewConfig,
    ViewPipeline,
    count_views,
    expand_views,
    view_sizes,
)
from selfsup.errors import ConfigError

WHOLE = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip": 0.0}  # the view is the image itself


def _images(n: int = 6, size: int = 32) -> InMemoryImages:
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return InMemoryImages(imgs, torch.arange(n) % 2, 2, size, (0.5,) * 3, (0.25,) * 3)


def _item(specs: list[dict], image: torch.Tensor, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ds = MultiViewDataset([(image, 0, 0)], [ViewPipeline(s) for s in expand_views(specs)])  # type: ignore[list-item]
    return ds[0]


def test_multi_crop_two_global_and_six_local_views():
    """SwAV / DINO: 2 x large crops of (0.14, 1) + 6 x small crops of (0.05, 0.14)."""
    specs = [
        {"size": 32, "copies": 2, "crop_scale": [0.14, 1.0]},
        {"size": 16, "copies": 6, "crop_scale": [0.05, 0.14]},
    ]
    assert count_views(specs) == 8 and view_sizes(specs) == [32, 32] + [16] * 6
    loader = DataLoader(MultiViewDataset(_images(), [ViewPipeline(s) for s in expand_views(specs)]), batch_size=3)
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch["views"]] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 6
    assert torch.equal(batch["view_targets"], torch.full((3, 8), -1)) and batch["masks"] == {}
    assert not torch.equal(batch["views"][0], batch["views"][1])  # two independently drawn crops


def test_same_crop_at_two_resolutions_with_a_block_mask():
    """BEiT: the augmented view for the encoder, the same crop at half size for the tokenizer, and a
    block-wise mask on the encoder's patch grid."""
    spec = {"size": 32, "second_size": 16, "mask": {"kind": "block", "patch_size": 8, "num_patches": 6, "min_block": 2}}
    assert count_views([spec]) == 2 and view_sizes([spec]) == [32, 16]
    item = _item([spec], _images()[0][0])
    big, small = item["views"]
    assert big.shape == (3, 32, 32) and small.shape == (3, 16, 16)
    assert torch.equal(small, v2.Resize((16, 16), antialias=True)(big))  # the same augmented crop
    mask = item["masks"]["0"]
    assert mask.dtype == torch.bool and mask.shape == (4, 4) and 1 <= int(mask.sum()) <= 6
    assert set(item["masks"]) == {"0"}  # drawn with the first view of the pipeline


def test_simmim_mask_with_a_view():
    spec = {"size": 32, "mask": {"kind": "simmim", "patch_size": 4, "mask_patch_size": 16, "ratio": 0.5}}
    mask = _item([spec], _images()[0][0])["masks"]["0"]
    assert mask.shape == (8, 8) and int(mask.sum()) == 2 * 16  # 2 of the 4 16-px mask patches, at 4-px patches


def test_rotations_are_per_view_targets():
    """Rotation-Pred: every image at 0, 90, 180 and 270 degrees, target = the rotation's index."""
    spec = {"size": 32, "rotations": [0, 90, 180, 270], **WHOLE}
    image = _images()[1][0]
    item = _item([spec], image)
    assert item["view_targets"].tolist() == [0, 1, 2, 3]
    for k, view in enumerate(item["views"]):
        assert torch.equal(view, torch.rot90(image, k, dims=(1, 2)))


def test_patch_grid_centre_and_neighbours():
    """Relative-Loc: 3 x 3 cells of the view, a patch from inside each; the centre has no target and its 8
    neighbours are classes 0..7 in row-major order."""
    size, cell, patch = 30, 10, 6
    rows = torch.arange(size).view(1, size, 1).expand(1, size, size)
    cols = torch.arange(size).view(1, 1, size).expand(1, size, size)
    image = torch.cat([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)  # pixels hold their coordinates
    spec = {"size": size, "grid": {"cells": 3, "patch_size": patch}, **WHOLE}
    assert view_sizes([spec]) == [patch] * 9
    offsets = set()
    for seed in range(5):
        item = _item([spec], image, seed)
        assert item["view_targets"].tolist() == [0, 1, 2, 3, -1, 4, 5, 6, 7]
        for j, p in enumerate(item["views"]):
            row, col = divmod(j, 3)
            top, left = int(p[0, 0, 0]), int(p[1, 0, 0])
            assert row * cell <= top <= (row + 1) * cell - patch and col * cell <= left <= (col + 1) * cell - patch
            assert torch.equal(p[0, :, 0], torch.arange(top, top + patch, dtype=torch.uint8))  # contiguous patch
            offsets.add((top - row * cell, left - col * cell))
    assert len(offsets) > 5  # jittered, not always the same place in the cell


def test_views_are_reproducible_per_seed_through_the_loader_keys():
    spec = ViewConfig(size=32, rotations=[0, 180])
    seeded = SeededViews(_images(), [ViewPipeline(spec)])
    a, b = seeded[(2, 11)], seeded[(2, 11)]
    assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
    assert not torch.equal(seeded[(2, 12)]["views"][0], a["views"][0])


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"size": 32, "second_size": 16, "rotations": [0, 90]}, "combines second_size and rotations"),
        ({"size": 32, "rotations": [0, 45]}, r"rotations=\[0, 45\] must be multiples of 90 degrees"),
        ({"size": 30, "grid": {"cells": 3, "patch_size": 12}}, "10 px wide, too small for patch_size=12"),
        ({"size": 30, "mask": {"kind": "block", "patch_size": 8}}, "patch_size=8 does not divide the view size 30"),
        ({"size": 32, "mask": {"kind": "random"}}, "mask.kind='random' must be none, block or simmim"),
        ({"size": 32, "hflp": 0.5}, r"unknown key\(s\) \['hflp'\]"),
    ],
)
def test_bad_declarations_say_what_is_wrong(spec, match):
    with pytest.raises(ConfigError, match=match):
        ViewPipeline(spec)


def test_declared_in_the_typed_config():
    """The same declarations through Hydra: typed (a misspelt mask key fails while composing) and built."""
    from hydra.errors import ConfigCompositionException

    from conftest import compose_cfg
    from selfsup.config import typed
    from selfsup.engine.build import view_pipelines

    overrides = ["algo=simclr", "dataset=fake", "algo.views.0.mask.kind=block", "algo.views.0.mask.patch_size=8"]
    cfg = typed(compose_cfg([*overrides, "algo.views.0.mask.num_patches=4"]))
    (pipeline, *_) = view_pipelines(cfg)
    assert cfg.algo.views[0].mask.num_patches == 4 and pipeline.mask is not None
    with pytest.raises(ConfigCompositionException, match="num_patchs"):
        compose_cfg([*overrides, "algo.views.0.mask.num_patchs=4"])
