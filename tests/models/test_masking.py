"""Masking building blocks: MAE's random_masking, BEiT's block-wise and SimMIM's mask generators."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.models.masking import BlockwiseMaskGenerator, SimMIMMaskGenerator, random_masking

# ---------------------------------------------------------------------------------------------- random_masking


def mae_random_masking(x: torch.Tensor, mask_ratio: float):
    """The official MAE ``random_masking`` (facebookresearch/mae models_mae.py), written out here as the reference."""
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def _indexed_tokens(b: int, n: int, d: int) -> torch.Tensor:
    """[B, L, D] tokens whose channel 0 is the token's position and the rest are random."""
    t = torch.randn(b, n, d)
    t[:, :, 0] = torch.arange(n, dtype=t.dtype)
    return t


@pytest.mark.parametrize(
    ("b", "n", "d", "ratio"), [(4, 196, 8, 0.75), (3, 10, 5, 0.75), (2, 49, 4, 0.5), (2, 7, 3, 0.0)]
)
def test_random_masking_is_bit_identical_to_mae(b, n, d, ratio):
    tokens = torch.randn(b, n, d)
    for seed in range(3):
        torch.manual_seed(seed)
        ref = mae_random_masking(tokens, ratio)
        ref_next = torch.rand(8)
        torch.manual_seed(seed)
        out = random_masking(tokens, ratio)
        out_next = torch.rand(8)
        for r, o in zip(ref, out):
            assert r.dtype == o.dtype and r.shape == o.shape
            assert torch.equal(r, o)
        assert torch.equal(ref_next, out_next), "both must use the same amount of the RNG stream"


def test_random_masking_given_noise_hand_example():
    tokens = torch.arange(4.0).reshape(1, 4, 1)
    noise = torch.tensor([[0.3, 0.1, 0.4, 0.2]])
    kept, mask, restore = random_masking(tokens, 0.5, noise=noise)
    # the 2 smallest noises are at positions 1 (0.1) and 3 (0.2), kept in ascending-noise order
    assert kept.flatten().tolist() == [1.0, 3.0]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # shuffle = [1, 3, 0, 2]: position 0 went to slot 2, 1 to 0, 2 to 3, 3 to 1
    assert restore.tolist() == [[2, 0, 3, 1]]


def test_random_masking_given_noise_is_reproducible_and_ignores_rng():
    tokens = torch.randn(3, 16, 4)
    noise = torch.rand(3, 16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = random_masking(tokens, 0.75, noise=noise)
    assert torch.equal(torch.get_rng_state(), state), "random_masking drew from the RNG although noise was given"
    torch.manual_seed(123)
    b = random_masking(tokens, 0.75, noise=noise)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # and the result is the one the noise dictates: the 4 smallest-noise positions are kept
    kept_pos = noise.argsort(dim=1)[:, :4]
    assert torch.equal(a[0][:, :, 0], torch.gather(tokens[:, :, 0], 1, kept_pos))


@pytest.mark.parametrize(
    ("n", "ratio", "keep"), [(196, 0.75, 49), (10, 0.75, 2), (10, 0.0, 10), (64, 0.9, 6), (5, 0.5, 2)]
)
def test_random_masking_counts(n, ratio, keep):
    kept, mask, restore = random_masking(torch.randn(3, n, 6), ratio)
    assert kept.shape == (3, keep, 6)
    assert mask.shape == (3, n) and restore.shape == (3, n)
    assert mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [float(n - keep)] * 3
    # restore is a permutation of 0..L-1 in every row
    assert torch.equal(restore.sort(dim=1).values, torch.arange(n).expand(3, n))


def test_random_masking_keeps_original_tokens_at_unmasked_positions():
    torch.manual_seed(0)
    tokens = _indexed_tokens(4, 50, 6)
    kept, mask, _ = random_masking(tokens, 0.6)
    for i in range(4):
        pos = kept[i, :, 0].long()  # where each kept token came from
        assert len(set(pos.tolist())) == kept.shape[1]
        assert torch.equal(kept[i], tokens[i, pos])  # the very tokens, all channels, unchanged
        assert torch.equal(mask[i, pos], torch.zeros(len(pos)))  # kept <=> mask == 0
        assert sorted(pos.tolist()) == torch.nonzero(mask[i] == 0).flatten().tolist()
    assert not torch.equal(kept[0, :, 0], kept[1, :, 0]), "every sample must get its own random subset"


def test_random_masking_restore_unshuffles():
    """As in MAE's decoder: append mask tokens to the kept ones, gather with restore -> original order."""
    torch.manual_seed(1)
    tokens = _indexed_tokens(3, 20, 4)
    kept, mask, restore = random_masking(tokens, 0.75)
    filler = torch.full((3, 20 - kept.shape[1], 4), -1.0)
    shuffled = torch.cat([kept, filler], dim=1)
    unshuffled = torch.gather(shuffled, 1, restore[:, :, None].expand(-1, -1, 4))
    visible = mask == 0
    assert torch.equal(unshuffled[visible], tokens[visible])
    assert (unshuffled[~visible] == -1).all()


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_random_masking_rejects_bad_ratio(ratio):
    with pytest.raises(ConfigError, match=r"mask_ratio must be in \[0, 1\), got"):
        random_masking(torch.randn(2, 8, 4), ratio)


@pytest.mark.parametrize("shape", [(2, 7), (8,), (1, 8), (2, 8, 1)])
def test_random_masking_rejects_bad_noise_shape(shape):
    with pytest.raises(ValueError, match=r"noise must have shape \[B, L\] = \[2, 8\]"):
        random_masking(torch.randn(2, 8, 4), 0.5, noise=torch.rand(shape))


def test_random_masking_rejects_bad_token_shape():
    with pytest.raises(ValueError, match=r"expects tokens of shape \[B, L, D\], got \(2, 8\)"):
        random_masking(torch.randn(2, 8), 0.5)


# ---------------------------------------------------------------------------------------------- BEiT block-wise


def _beit_reference(
    height: int,
    width: int,
    num_masking_patches: int,
    min_num_patches: int,
    max_num_patches: int,
    log_aspect_ratio: tuple[float, float],
    uniform4: Callable[[], list[float]],
) -> np.ndarray:
    """microsoft/unilm beit/masking_generator.py, loops and all, with its random.uniform / random.randint calls
    fed from 4 uniforms per attempt (area, log-aspect, top, left) so that it sees the same draws."""
    mask = np.zeros((height, width), dtype=np.int64)
    mask_count = 0
    while mask_count < num_masking_patches:
        max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
        delta = 0
        for _attempt in range(10):
            u = uniform4()
            target_area = min_num_patches + (max_mask_patches - min_num_patches) * u[0]  # random.uniform
            aspect_ratio = math.exp(log_aspect_ratio[0] + (log_aspect_ratio[1] - log_aspect_ratio[0]) * u[1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = int(u[2] * (height - h + 1))  # random.randint(0, height - h)
                left = int(u[3] * (width - w + 1))  # random.randint(0, width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask


@pytest.mark.parametrize(
    ("kwargs", "ref_args"),
    [
        (dict(input_size=14, num_masking_patches=75), (14, 14, 75, 4, 75, (math.log(0.3), math.log(1 / 0.3)))),
        (
            dict(input_size=(8, 12), num_masking_patches=40, min_num_patches=2, max_num_patches=10, min_aspect=0.5),
            (8, 12, 40, 2, 10, (math.log(0.5), math.log(2.0))),
        ),
        (
            dict(input_size=6, num_masking_patches=20, min_aspect=0.2, max_aspect=3.0),
            (6, 6, 20, 4, 20, (math.log(0.2), math.log(3.0))),
        ),
    ],
)
def test_blockwise_matches_beit_reference_on_the_same_draws(kwargs, ref_args):
    gen = BlockwiseMaskGenerator(**kwargs)
    for seed in range(40):
        torch.manual_seed(seed)
        ours = gen()
        torch.manual_seed(seed)
        ref = _beit_reference(*ref_args, uniform4=lambda: torch.rand(4, dtype=torch.float64).tolist())
        assert np.array_equal(ours.numpy().astype(np.int64), ref), f"seed {seed}"


def test_blockwise_shape_and_dtype():
    assert BlockwiseMaskGenerator(14, 75)().shape == (14, 14)
    mask = BlockwiseMaskGenerator((8, 12), 30)()
    assert mask.shape == (8, 12) and mask.dtype == torch.bool
    assert not BlockwiseMaskGenerator(14, 0)().any()


def test_blockwise_count_for_beit_settings():
    """14x14 grid, 75 patches (BEiT-B at 224 px): almost always exactly 75, never more, at worst a few short."""
    gen = BlockwiseMaskGenerator(14, 75)
    counts = []
    for seed in range(300):
        torch.manual_seed(seed)
        counts.append(int(gen().sum()))
    assert max(counts) == 75
    assert min(counts) >= 71, "the reference only falls short by the few patches no block can fill"
    assert sum(c == 75 for c in counts) >= 0.85 * len(counts)


@pytest.mark.parametrize(
    ("height", "width", "num", "max_new"),
    [(10, 14, 60, 16), (2, 10, 8, 8)],  # on a 2-row grid every block must be a single row
)
def test_blockwise_mask_is_the_union_of_in_bounds_blocks(height, width, num, max_new):
    gen = BlockwiseMaskGenerator((height, width), num, min_num_patches=2, max_num_patches=max_new)
    for seed in range(100):
        torch.manual_seed(seed)
        mask, blocks = gen.sample_with_blocks()
        painted = torch.zeros(height, width, dtype=torch.bool)
        count = 0
        for top, left, h, w in blocks:
            assert 1 <= h < height and 1 <= w < width, f"block {h}x{w} is not strictly smaller than the grid"
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width, "a block leaves the grid"
            new = int((~painted[top : top + h, left : left + w]).sum())
            assert 1 <= new <= max_new, "each block masks 1 to max_num_patches new patches"
            painted[top : top + h, left : left + w] = True
            count += new
            assert count <= num
        assert torch.equal(mask, painted)
        if count == num:  # (on the 2-row grid, 10 misses in a row can stop it early, as in the reference)
            assert len(blocks) >= math.ceil(num / max_new)


def test_blockwise_every_cell_is_masked_sometimes_without_position_bias():
    gen = BlockwiseMaskGenerator(14, 75)
    torch.manual_seed(0)
    freq = torch.stack([gen() for _ in range(400)]).double().sum(dim=0)  # [14, 14] times masked
    assert (freq > 0).all(), f"never-masked cells: {torch.nonzero(freq == 0).tolist()}"
    quadrants = torch.stack([freq[:7, :7].sum(), freq[:7, 7:].sum(), freq[7:, :7].sum(), freq[7:, 7:].sum()])
    # over 100 seeds the largest quadrant deviation was < 9% of the mean (a diagonal bias gives ~47%)
    assert (quadrants - quadrants.mean()).abs().max() < 0.15 * quadrants.mean(), quadrants.tolist()
    # the four border lines get a fair share as well (largest deviation over 100 seeds < 19%)
    edges = torch.stack([freq[0].sum(), freq[-1].sum(), freq[:, 0].sum(), freq[:, -1].sum()])
    assert (edges - edges.mean()).abs().max() < 0.3 * edges.mean(), edges.tolist()


def test_blockwise_is_seeded_by_torch():
    gen = BlockwiseMaskGenerator(14, 75)
    masks = []
    for seed in range(20):
        torch.manual_seed(seed)
        masks.append(gen())
    assert len({m.numpy().tobytes() for m in masks}) == 20, "different seeds must give different masks"
    torch.manual_seed(7)
    assert torch.equal(gen(), masks[7]), "the same torch seed must give the same mask"


def test_blockwise_generator_argument():
    gen = BlockwiseMaskGenerator(14, 75)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = gen(torch.Generator().manual_seed(5))
    b = gen(torch.Generator().manual_seed(5))
    c = gen(torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state), "with a generator, the global RNG must not be used"
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    assert torch.equal(gen(), a), "a generator seeded s and the global RNG seeded s must agree"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_size=14, num_masking_patches=197), r"num_masking_patches must be in \[0, 196\].*got 197"),
        (dict(input_size=14, num_masking_patches=-1), r"num_masking_patches must be in \[0, 196\]"),
        (dict(input_size=0, num_masking_patches=0), r"input_size must be positive"),
        (dict(input_size=(14, 14, 3), num_masking_patches=75), r"input_size must be an int or a pair"),
        (dict(input_size=14, num_masking_patches=75, min_num_patches=0), r"min_num_patches must be >= 1, got 0"),
        (
            dict(input_size=14, num_masking_patches=75, min_num_patches=8, max_num_patches=4),
            r"max_num_patches \(4\) must be >= min_num_patches \(8\)",
        ),
        (dict(input_size=14, num_masking_patches=75, min_aspect=0.0), r"need 0 < min_aspect <= max_aspect"),
        (dict(input_size=14, num_masking_patches=75, min_aspect=2.0), r"need 0 < min_aspect <= max_aspect"),
        (
            dict(input_size=14, num_masking_patches=75, min_aspect=0.5, max_aspect=0.4),
            r"got min_aspect=0.5, max_aspect=0.4",
        ),
    ],
)
def test_blockwise_rejects_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BlockwiseMaskGenerator(**kwargs)


# ---------------------------------------------------------------------------------------------- SimMIM


def test_simmim_default_shape():
    mask = SimMIMMaskGenerator()()
    assert mask.shape == (48, 48)  # 192 / 4
    assert mask.dtype == torch.bool


@pytest.mark.parametrize(
    ("kwargs", "side", "scale", "masked_patches"),
    [
        (dict(), 48, 8, 22),  # 6x6 mask patches, ceil(36 * 0.6) = 22
        (dict(input_size=224, mask_patch_size=32, model_patch_size=16), 14, 2, 30),  # 7x7, ceil(29.4) = 30
        (dict(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5), 8, 2, 8),  # 4x4, 8
        (dict(input_size=64, mask_patch_size=16, model_patch_size=16, mask_ratio=0.75), 4, 1, 12),  # no upsampling
    ],
)
def test_simmim_exact_fraction_and_constant_blocks(kwargs, side, scale, masked_patches):
    gen = SimMIMMaskGenerator(**kwargs)
    rand = side // scale
    for seed in range(10):
        torch.manual_seed(seed)
        mask = gen()
        assert mask.shape == (side, side)
        assert int(mask.sum()) == masked_patches * scale * scale
        blocks = mask.reshape(rand, scale, rand, scale).permute(0, 2, 1, 3).reshape(rand, rand, scale * scale)
        assert (blocks == blocks[:, :, :1]).all(), f"mask is not constant on {scale}x{scale} blocks"
        assert int(blocks[:, :, 0].sum()) == masked_patches


def test_simmim_is_seeded_and_uniform():
    gen = SimMIMMaskGenerator()
    torch.manual_seed(3)
    a = gen()
    torch.manual_seed(3)
    assert torch.equal(gen(), a), "the same torch seed must give the same mask"
    torch.manual_seed(4)
    assert not torch.equal(gen(), a)
    state = torch.get_rng_state()
    g1, g2 = gen(torch.Generator().manual_seed(9)), gen(torch.Generator().manual_seed(9))
    assert torch.equal(g1, g2) and torch.equal(torch.get_rng_state(), state)
    # every mask patch is picked with probability 22/36 (binomial std over 300 draws ~ 0.03)
    torch.manual_seed(0)
    freq = torch.stack([gen()[::8, ::8] for _ in range(300)]).double().mean(dim=0)  # [6, 6]
    assert ((freq - 22 / 36).abs() < 0.12).all(), freq


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_size=192, mask_patch_size=30), r"input_size \(192\) must be divisible by mask_patch_size \(30\)"),
        (
            dict(mask_patch_size=32, model_patch_size=5),
            r"mask_patch_size \(32\) must be divisible by the model",
        ),
        (dict(model_patch_size=0), r"model_patch_size must be a positive int, got 0"),
        (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\), got 1.0"),
    ],
)
def test_simmim_rejects_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SimMIMMaskGenerator(**kwargs)
