"""The batched view executor against torchvision: the same pixels for the same parameters (within interpolation
tolerance), the same parameter distributions, and views that depend on nothing but the image's seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from selfsup.data.batched import (
    BatchedViews,
    ViewParams,
    _colour_op,
    colour_jitter,
    gaussian_blur,
    geometry,
    grayscale,
    photometric,
    sample_params,
    splitmix64,
    uniforms,
)
from selfsup.data.datasets import Digits, FakeImages
from selfsup.data.views import GridConfig, MaskConfig, ViewConfig, view_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Real images with smooth strokes (upscaled 8 x 8 digits at 32 px), where interpolation differences stay small."""
    return Digits("train", image_size=32).images[:64]


def _params(spec: ViewConfig, n: int, size: int = 32, stream: int = 0, seed0: int = 11) -> ViewParams:
    seeds = torch.arange(n, dtype=torch.long) * 7_919 + seed0
    hw = torch.full((n,), size)
    return sample_params(spec, seeds, hw, hw, stream)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# ---------------------------------------------------------------------------------------------- random numbers
def _splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_and_uniforms_match_a_python_reference():
    xs = [0, 1, 12345, 2**40 + 17, 2**63 - 1]
    got = splitmix64(torch.tensor(xs, dtype=torch.long)).tolist()
    assert [g % 2**64 for g in got] == [_splitmix64_reference(x) for x in xs]
    seeds, stream, golden = [3, 2**62 + 5], 2, 0x9E3779B97F4A7C15
    u = uniforms(torch.tensor(seeds), stream, 4)
    for b, seed in enumerate(seeds):
        base = _splitmix64_reference((seed + stream * golden) % 2**64)
        want = [(_splitmix64_reference((base + k * golden) % 2**64) >> 11) / 2**53 for k in range(4)]
        assert u[b].tolist() == want
    assert float(u.min()) >= 0 and float(u.max()) < 1


def test_a_view_depends_only_on_its_image_and_seed(digits):
    """Image b's views are the same in any batch, at any position, and change with its seed."""
    spec = ViewConfig(size=32, copies=2, crop_scale=[0.3, 1.0], rotation=20, translate=0.1, color_jitter=0.8,
                      grayscale=0.2, blur=0.5, solarize=0.2)  # fmt: skip
    ex = BatchedViews([spec])
    seeds = torch.arange(16) * 1_000_003 + 5
    views, targets, masks = ex(digits[:16], seeds)
    perm = torch.tensor([5, 3, 9, 0])
    again, _, _ = ex(digits[:16][perm], seeds[perm])
    for v, w in zip(views, again, strict=True):
        torch.testing.assert_close(v[perm], w, atol=1e-3, rtol=0)
    assert not torch.allclose(views[0], views[1])  # the two copies draw different parameters
    other, _, _ = ex(digits[:16], seeds + 1)
    assert (other[0] - views[0]).abs().mean() > 5
    assert targets.shape == (16, 2) and (targets == -1).all() and masks == {}


# ---------------------------------------------------------------------------------------------- geometry
def _tv_geometry(image: torch.Tensor, p: ViewParams, b: int, size: int, rotate: bool) -> torch.Tensor:
    i, j, h, w = p.box[b].tolist()
    out = TF.resized_crop(image, i, j, h, w, [size, size], antialias=True)
    if rotate:
        shift = [int(p.shift[b, 0]), int(p.shift[b, 1])]
        out = TF.affine(out, angle=float(p.angle[b]), translate=shift, scale=1.0, shear=[0.0, 0.0])
    if p.flip[b]:
        out = TF.horizontal_flip(out)
    return out.float()


def test_crop_and_resize_match_torchvision_for_the_same_boxes(digits):
    spec = ViewConfig(size=32, crop_scale=[0.2, 1.0], hflip=0.5)
    p = _params(spec, 32)
    out = geometry(digits[:32], p, spec)
    for b in range(32):
        assert (
            out[b] - _tv_geometry(digits[b], p, b, 32, rotate=False)
        ).abs().max() <= 1.0  # torchvision's rounding to uint8
    assert p.flip.any() and not p.flip.all()


def test_a_downscaling_crop_is_antialiased_like_torchvision():
    """A 64 px source cut to 16 px views: supersampled, close to torchvision's antialiased resize (a plain
    bilinear sample of noise would be far off)."""
    images = FakeImages("train", num_samples=16, image_size=64).images
    spec = ViewConfig(size=16, crop_scale=[0.5, 1.0], hflip=0.0)
    p = _params(spec, 16, size=64)
    out = geometry(images, p, spec)
    diffs = [(out[b] - _tv_geometry(images[b], p, b, 16, rotate=False)).abs().mean() for b in range(16)]
    assert max(diffs) < 5.0  # box vs triangle filter on noise (without antialiasing: ~17)
    aliased = [
        (TF.resized_crop(images[b], *p.box[b].tolist(), [16, 16], antialias=False).float()
         - _tv_geometry(images[b], p, b, 16, rotate=False)).abs().mean()
        for b in range(16)
    ]  # fmt: skip
    assert np.mean(aliased) > 3 * np.mean(diffs)


def test_rotation_shift_and_flip_match_torchvision(digits):
    """One bilinear resampling against torchvision's resize then nearest-neighbour rotation: a few grey levels
    apart on average; the opposite rotation (a sign error) would be tens apart."""
    spec = ViewConfig(size=32, crop_scale=[0.5, 1.0], rotation=30, translate=0.1, hflip=0.5)
    p = _params(spec, 24)
    out = geometry(digits[:24], p, spec)
    mirrored = ViewParams(**{**p.__dict__, "angle": -p.angle})
    for b in range(24):
        ref = _tv_geometry(digits[b], p, b, 32, rotate=True)
        wrong = _tv_geometry(digits[b], mirrored, b, 32, rotate=True)
        close, far = (out[b] - ref).abs().mean(), (out[b] - wrong).abs().mean()
        if abs(float(p.angle[b])) > 8:
            assert close < 7 and far > 3 * close, (b, float(p.angle[b]), close, far)
        assert close < 7


# ---------------------------------------------------------------------------------------------- colour
@pytest.fixture(scope="module")
def colours() -> torch.Tensor:
    """Smooth colourful uint8 images."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 3, 16, 16, generator=gen) * 255).round().to(torch.uint8)
    return TF.gaussian_blur(x, [5, 5], [1.5, 1.5])


@pytest.mark.parametrize(
    ("op", "reference", "factors"),
    [
        (0, TF.adjust_brightness, [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 0.3, 1.9]),
        (1, TF.adjust_contrast, [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 0.3, 1.9]),
        (2, TF.adjust_saturation, [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 0.0, 1.9]),
        (3, TF.adjust_hue, [-0.1, -0.05, 0.0, 0.03, 0.07, 0.1, 0.5, -0.4]),
    ],
)
def test_colour_operations_match_torchvision(colours, op, reference, factors):
    f = torch.tensor(factors, dtype=torch.float64)
    out = _colour_op(colours.float() / 255, op, f) * 255
    ref = torch.stack([reference(colours[b], float(f[b])) for b in range(8)]).float()
    assert (out - ref).abs().max() <= 1.5  # torchvision rounds to uint8


def test_grayscale_blur_and_solarize_match_torchvision(colours):
    x = colours.float() / 255
    assert ((grayscale(x) * 255).expand(-1, 3, -1, -1) - TF.rgb_to_grayscale(colours, 3).float()).abs().max() <= 1
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.3, 0.7, 1.9], dtype=torch.float64)
    blurred = gaussian_blur(x, sigma, 5) * 255
    ref = torch.stack([TF.gaussian_blur(colours[b], [5, 5], [float(sigma[b])] * 2) for b in range(8)]).float()
    assert (blurred - ref).abs().max() <= 0.51
    spec = ViewConfig(size=16, solarize=1.0, hflip=0.0)
    p = _params(spec, 8, size=16)
    assert p.solarize.all()
    torch.testing.assert_close(
        photometric(colours.float(), p, spec), TF.solarize(colours, 128).float(), atol=1e-3, rtol=0
    )


def test_jitter_applies_each_images_own_order_like_torchvision(colours):
    """Each image's four operations in its drawn order equal torchvision's in that order (the order matters:
    brightness before or after contrast differ)."""
    spec = ViewConfig(size=16, color_jitter=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    p = _params(spec, 8, size=16)
    out = colour_jitter(colours.float() / 255, p, spec) * 255
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    assert len({tuple(o) for o in p.order.tolist()}) > 1
    for b in range(8):
        ref = colours[b]
        for op in p.order[b].tolist():
            ref = fns[op](ref, float(p.factors[b, op]))
        assert (out[b] - ref.float()).abs().max() <= 6, b  # torchvision rounds after every operation
        backwards = colours[b]
        for op in reversed(p.order[b].tolist()):
            backwards = fns[op](backwards, float(p.factors[b, op]))
        if (backwards.float() - ref.float()).abs().max() > 20:
            assert (out[b] - backwards.float()).abs().max() > 10


# ---------------------------------------------------------------------------------------------- distributions
N = 20_000


def test_crop_boxes_follow_random_resized_crop():
    """Area fraction and aspect ratio of the boxes: the distribution of torchvision's get_params, drawn on a
    non-square 40 x 24 image (so the fallback and the bounds matter)."""
    spec = ViewConfig(size=16, crop_scale=[0.08, 1.0])
    seeds = torch.arange(N) * 104_729 + 1
    p = sample_params(spec, seeds, torch.full((N,), 24), torch.full((N,), 40), 3)
    torch.manual_seed(0)
    image = torch.zeros(3, 24, 40)
    tv = torch.tensor([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(N)])
    for boxes in (p.box, tv):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 24).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 40).all()
    area = lambda b: (b[:, 2] * b[:, 3]).double().numpy() / (24 * 40)  # noqa: E731
    ratio = lambda b: (b[:, 3] / b[:, 2]).double().log().numpy()  # noqa: E731
    top = lambda b: (b[:, 0].double() / (24 - b[:, 2] + 1).double()).numpy()  # noqa: E731
    assert _ks(area(p.box), area(tv)) < 0.02
    assert _ks(ratio(p.box), ratio(tv)) < 0.02
    assert _ks(top(p.box), top(tv)) < 0.02


def test_other_parameters_follow_torchvision():
    spec = ViewConfig(size=32, rotation=15, translate=0.2, hflip=0.3, color_jitter=0.8, brightness=0.4,
                      contrast=0.3, saturation=0.2, hue=0.1, grayscale=0.2, blur=0.5, blur_sigma=[0.1, 2.0],
                      solarize=0.1)  # fmt: skip
    p = _params(spec, N)
    rates = {"flip": (p.flip, 0.3), "jitter": (p.jitter, 0.8), "grey": (p.grey, 0.2), "blur": (p.blur, 0.5),
             "solarize": (p.solarize, 0.1)}  # fmt: skip
    for name, (flags, rate) in rates.items():
        assert abs(flags.double().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / N), name
    torch.manual_seed(0)
    affine = v2.RandomAffine(degrees=15, translate=(0.2, 0.2))
    tv = [affine.make_params([torch.zeros(3, 32, 32)]) for _ in range(N)]
    assert _ks(p.angle.numpy(), np.array([t["angle"] for t in tv])) < 0.02
    tx = np.array([t["translate"][0] for t in tv], dtype=float)
    assert _ks(p.shift[:, 0].numpy(), tx) < 0.02 and _ks(p.shift[:, 1].numpy(), tx) < 0.02
    assert set(p.shift.flatten().tolist()) <= set(range(-6, 7))
    jittered = p.factors[p.jitter]
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        f = jittered[:, k].numpy()
        assert _ks(f, np.random.default_rng(k).uniform(lo, hi, N)) < 0.02
    assert (p.factors[~p.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)).all()
    counts = torch.unique(p.order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 0.8 * N / 24 and counts.max() < 1.2 * N / 24
    assert _ks(p.sigma.numpy(), np.random.default_rng(9).uniform(0.1, 2.0, N)) < 0.02


# ---------------------------------------------------------------------------------------------- runs
def test_worker_geometry_then_device_photometric_equals_the_whole_batch(digits):
    """dataset.cache=none: workers cut each view (uint8) and the device does the rest: the same views as the
    whole-batch path up to the uint8 rounding of the cut."""
    specs = [ViewConfig(size=32, copies=2, crop_scale=[0.3, 1.0], rotation=10, color_jitter=0.8),
             ViewConfig(size=16, copies=2, crop_scale=[0.1, 0.4], grayscale=0.5)]  # fmt: skip
    ex = BatchedViews(specs)
    seeds = torch.arange(12) * 31 + 2
    whole, targets, _ = ex(digits[:12], seeds)
    crops = [ex.crops(digits[b], int(seeds[b])) for b in range(12)]
    cropped = [torch.stack([c[v] for c in crops]) for v in range(4)]
    split, targets2, _ = ex(None, seeds, cropped=cropped)
    assert [v.shape[-1] for v in split] == view_sizes(specs) == [32, 32, 16, 16]
    for a, b in zip(whole, split, strict=True):
        assert (a - b).abs().max() <= 2.5
    assert torch.equal(targets, targets2)


def test_rotations_grid_second_size_and_masks(digits):
    specs = [
        ViewConfig(size=32, crop_scale=[0.5, 1.0], rotations=[0, 90, 180, 270]),
        ViewConfig(size=48, crop_scale=[0.7, 1.0], grid=GridConfig(cells=3, patch_size=12)),
        ViewConfig(size=32, second_size=16, mask=MaskConfig(kind="block", patch_size=8, num_patches=5)),
    ]
    ex = BatchedViews(specs)
    seeds = torch.arange(6) + 100
    views, targets, masks = ex(digits[:6], seeds)
    assert [v.shape[-1] for v in views] == view_sizes(specs)
    assert targets[0].tolist() == [0, 1, 2, 3] + [0, 1, 2, 3, -1, 4, 5, 6, 7] + [-1, -1]
    for k in range(1, 4):
        assert torch.equal(views[k], torch.rot90(views[0], k, dims=(2, 3)))
    assert list(masks) == ["13"] and masks["13"].shape == (6, 4, 4) and (masks["13"].sum((1, 2)) == 5).all()
    again = ex(digits[:6], seeds)[2]["13"]
    assert torch.equal(again, masks["13"])  # masks are seeded per image too
    # each grid patch lies inside its cell of the (unseen) 48 px view: patches of one image differ
    assert not torch.equal(views[4], views[5])


def test_the_masked_colour_path_of_accelerators_equals_the_cpus_row_selection(digits):
    """Off the CPU every operation is computed for all rows and selected (no host synchronisation); the CPU
    computes only the chosen rows. Same views."""
    spec = ViewConfig(size=32, color_jitter=0.8, hue=0.1, grayscale=0.3, blur=0.5, solarize=0.3)
    p = _params(spec, 32)
    x = geometry(digits[:32], p, spec)
    torch.testing.assert_close(photometric(x, p, spec, masked=True), photometric(x, p, spec, masked=False))
    assert p.blur.any() and not p.blur.all() and p.jitter.any() and not p.jitter.all()


@pytest.mark.cuda
def test_the_executor_on_cuda_makes_the_cpus_views(digits):
    """Every operation at once on the GPU (its masked colour path, no host synchronisation): the CPU's views,
    within one grey level where float rounding tips a value over a .5 of the uint8 grid (or, at a rotated
    crop's edge, a pixel in or out of the black border); the same targets and masks."""
    specs = [
        ViewConfig(size=32, copies=2, crop_scale=[0.2, 1.0], rotation=15, translate=0.1, color_jitter=0.8, hue=0.1,
                   grayscale=0.2, blur=0.5, solarize=0.2),
        ViewConfig(size=16, copies=2, crop_scale=[0.05, 0.4], color_jitter=0.8, blur=0.5),
        ViewConfig(size=32, crop_scale=[0.5, 1.0], rotations=[0, 90, 180, 270]),
        ViewConfig(size=48, crop_scale=[0.7, 1.0], grid=GridConfig(cells=3, patch_size=12)),
        ViewConfig(size=32, second_size=16, mask=MaskConfig(kind="block", patch_size=8, num_patches=5)),
    ]  # fmt: skip
    ex = BatchedViews(specs)
    seeds = torch.arange(48) * 1_000_003 + 5
    cpu = ex(digits[:48], seeds)
    gpu = ex(digits[:48].cuda(), seeds.cuda())
    for a, b in zip(cpu[0], gpu[0], strict=True):
        assert b.is_cuda and b.shape == a.shape
        diff = (a - b.cpu()).abs()
        assert (diff > 1.001).float().mean() < 1e-3 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert torch.equal(cpu[1], gpu[1].cpu())
    assert cpu[2].keys() == gpu[2].keys() and all(torch.equal(cpu[2][k], gpu[2][k].cpu()) for k in cpu[2])
