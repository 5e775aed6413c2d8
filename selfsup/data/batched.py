"""Batched view executor: the ``algo.views`` declarations run on a whole uint8 batch at once, on the device.

The per-sample path (:class:`~selfsup.data.views.ViewPipeline`, torchvision v2 on one image at a time in
DataLoader workers) is the reference; this executor (``data.executor=batched``, the default) gives views of the
same distribution from the same declarations, with every random choice made per image:

    for each view run v (an entry of algo.views, once per copy) and each image b of the batch:
        u[b, :] = uniforms(seed_b, stream=v)                        # counter-based: splitmix64 of (seed, v, k)
        crop box    (i, j, h, w)  RandomResizedCrop.get_params       # 10 tries of (area, log-ratio), then centre
        angle, (tx, ty)           RandomAffine.get_params            # degrees, integer pixel shifts
        flip, jitter?, 4 factors, order, grey?, blur? + sigma, solarize?
    geometry:   ONE grid_sample for the whole batch: crop + resize + rotation + shift + flip folded into one
                affine map per image (bilinear/bicubic; pixels rotated in from outside the crop are black, as
                torchvision fills them); a crop larger than the view is supersampled k x k (k = ceil(crop / size))
                and averaged, a box-filter stand-in for torchvision's antialiasing
    photometric: brightness, contrast, saturation, hue in each image's own random order (torchvision's
                ColorJitter draws a permutation per call), grayscale, Gaussian blur (per-image sigma, reflect
                padding, separable, one grouped convolution), solarize (>= 128)
    then Rotation-Pred's rotations, Relative-Loc's grid patches, a second resolution, masks.

Seeding: image b's parameters are a pure function of its seed (the loader's f(seed, epoch, position), as for
the per-sample path) and the view run, so a view does not depend on the batch it is in, the device, the number
of processes or workers, or an interruption; resume stays bit-exact. The two executors draw from different
generators, so they give different (equally distributed) views for the same seed.

Differences from torchvision, all within interpolation tolerance (``tests/data/test_batched.py`` compares the
pixels for fixed parameters and the parameter distributions): one resampling instead of two (torchvision resizes
bilinearly, then rotates with nearest-neighbour), box supersampling instead of a triangle antialiasing filter on
downscaling crops, and float arithmetic throughout (torchvision rounds to uint8 after every colour operation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.views import ViewConfig, _mask_generator, as_view_config


# ---------------------------------------------------------------------------------------------- random numbers
def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """Steele, Lea & Flood's SplitMix64 finaliser on int64 tensors (two's-complement wrap-around = mod 2^64)."""
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniforms(seeds: Tensor, stream: int | Tensor, n: int) -> Tensor:
    """[B, n] float64 uniforms in [0, 1): draw k of image b is splitmix64(splitmix64(seed_b + stream * G) + k),
    top 53 bits. A pure function of (seed, stream, k): the same on every device and in every batch."""
    seeds = seeds.to(torch.int64)
    offset = _i64(stream * (_GOLDEN % 2**64) % 2**64) if isinstance(stream, int) else stream.long() * _GOLDEN
    base = splitmix64(seeds + offset)  # [B]
    k = torch.arange(n, dtype=torch.int64, device=seeds.device)
    z = splitmix64(base[:, None] + k * _GOLDEN)
    return _shr(z, 11).double() * 2.0**-53


# ---------------------------------------------------------------------------------------------- parameters
#: where each parameter's draws sit in an image's stream (fixed, so adding a view option never moves others)
_CROP, _POS, _AFFINE, _FLIP, _JITTER, _FACTORS, _ORDER, _GREY, _BLUR, _SOLAR, _GRID = (
    0, 20, 22, 25, 26, 27, 31, 35, 36, 38, 39,
)  # fmt: skip


@dataclass
class ViewParams:
    """Every random choice of one view run for a batch of B images (torchvision's meaning and units)."""

    box: Tensor  # [B, 4] int64: top, left, height, width of the crop in the source image
    angle: Tensor  # [B] float64 degrees, counter-clockwise
    shift: Tensor  # [B, 2] float64 (tx, ty) integer pixels of the view
    flip: Tensor  # [B] bool
    jitter: Tensor  # [B] bool: colour jitter applied
    factors: Tensor  # [B, 4] float64 brightness, contrast, saturation (1 = unchanged), hue shift (0 = unchanged)
    order: Tensor  # [B, 4] int64: a permutation of (brightness 0, contrast 1, saturation 2, hue 3)
    grey: Tensor  # [B] bool
    blur: Tensor  # [B] bool
    sigma: Tensor  # [B] float64
    solarize: Tensor  # [B] bool
    grid: Tensor | None  # [B, cells^2, 2] int64 (dy, dx) of each grid patch inside its cell, or None


def crop_boxes(u_crop: Tensor, u_pos: Tensor, height: Tensor, width: Tensor, spec: ViewConfig) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for every image: 10 tries of an area fraction
    U(scale) and a log aspect ratio U(log ratio) (u_crop [B, 20]), the first that fits, then a uniform
    position (u_pos [B, 2]); if none fits, the central crop clamped to the ratio range. [B, 4] (i, j, h, w)."""
    h_img, w_img = height.double()[:, None], width.double()[:, None]
    s0, s1 = spec.crop_scale
    r0, r1 = math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])
    area = h_img * w_img * (s0 + (s1 - s0) * u_crop[:, :10])
    ratio = torch.exp(r0 + (r1 - r0) * u_crop[:, 10:20])
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    hh, ww = h_img[:, 0], w_img[:, 0]
    # fallback: the whole image, cut to the nearest allowed ratio
    in_ratio = ww / hh
    lo_r, hi_r = spec.crop_ratio
    fw = torch.where(in_ratio > hi_r, torch.round(hh * hi_r), ww)
    fh = torch.where(in_ratio < lo_r, torch.round(ww / lo_r), hh)
    ok = fits.any(dim=1)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    i = torch.where(ok, torch.floor(u_pos[:, 0] * (hh - h + 1)), torch.floor((hh - h) / 2))
    j = torch.where(ok, torch.floor(u_pos[:, 1] * (ww - w + 1)), torch.floor((ww - w) / 2))
    return torch.stack([i, j, h, w], dim=1).long()


def sample_params(spec: ViewConfig, seeds: Tensor, height: Tensor, width: Tensor, stream: int | Tensor) -> ViewParams:
    """The parameters of view run ``stream`` (one for all, or [B]) for images with these seeds and source sizes
    ([B] each)."""
    cells = spec.grid.cells
    u = uniforms(seeds, stream, _GRID + 2 * cells * cells)
    size = float(spec.size)
    angle = (2 * u[:, _AFFINE] - 1) * float(spec.rotation)
    max_d = float(spec.translate) * size  # torchvision: max_dx = translate * width of the (cropped) view
    shift = torch.round((2 * u[:, _AFFINE + 1 : _AFFINE + 3] - 1) * max_d)
    lo = [max(0.0, 1 - spec.brightness), max(0.0, 1 - spec.contrast), max(0.0, 1 - spec.saturation), -spec.hue]
    hi = [1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue]
    lo_t, hi_t = (torch.tensor(v, dtype=torch.float64, device=u.device) for v in (lo, hi))
    factors = lo_t + (hi_t - lo_t) * u[:, _FACTORS : _FACTORS + 4]
    jitter = u[:, _JITTER] < spec.color_jitter
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=u.device)
    factors = torch.where(jitter[:, None], factors, identity)
    sigma = spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[:, _BLUR + 1]
    grid = None
    if cells:
        room = size // cells - spec.grid.patch_size + 1  # positions of a patch inside its cell
        grid = torch.floor(u[:, _GRID:].view(-1, cells * cells, 2) * room).long()
    return ViewParams(
        box=crop_boxes(u[:, _CROP:_POS], u[:, _POS : _POS + 2], height, width, spec),
        angle=angle,
        shift=shift,
        flip=u[:, _FLIP] < spec.hflip,
        jitter=jitter,
        factors=factors,
        order=u[:, _ORDER : _ORDER + 4].argsort(dim=1),
        grey=u[:, _GREY] < spec.grayscale,
        blur=u[:, _BLUR] < spec.blur,
        sigma=sigma,
        solarize=u[:, _SOLAR] < spec.solarize,
        grid=grid,
    )


# ---------------------------------------------------------------------------------------------- geometry
def _maps(p: ViewParams, size: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Per image, in grid_sample's normalised coordinates (align_corners=False): the 2 x 3 map ``to_crop`` of an
    output position u to v = M diag(s, 1) u - M t_n, where it lands in the crop-resized image before the rotation
    (M torchvision's inverse rotation [[cos, sin], [-sin, cos]], s = -1 for a flip, t_n the shift), and the
    per-axis scale and offset that take v to the source image (the crop's size and centre), all float32 [B, ...]."""
    rad = torch.deg2rad(p.angle)
    cos, sin = torch.cos(rad), torch.sin(rad)
    s = torch.where(p.flip, -1.0, 1.0).to(cos)
    m = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # [B, 2, 2]
    lin = m * torch.stack([s, torch.ones_like(s)], -1)[:, None, :]
    t_n = p.shift * (2.0 / size)  # pixels of the view -> normalised units
    off = -(m @ t_n[:, :, None])[:, :, 0]
    to_crop = torch.cat([lin, off[:, :, None]], dim=2)
    i, j, h, w = (p.box[:, k].double() for k in range(4))
    scale = torch.stack([w / width, h / height], -1)  # [B, 2]
    centre = torch.stack([(2 * j + w) / width - 1, (2 * i + h) / height - 1], -1)
    # the centres of the crop's first and last pixels: torchvision resizes the cut-out crop, whose border
    # pixels extend outwards (edge replication), so sampling never reads past them
    lo = torch.stack([(2 * j + 1) / width - 1, (2 * i + 1) / height - 1], -1)
    hi = torch.stack([(2 * (j + w) - 1) / width - 1, (2 * (i + h) - 1) / height - 1], -1)
    return to_crop.float(), torch.stack([scale, centre, lo, hi], 1).float()  # [B, 2, 3], [B, 4, 2]


def supersampling(height: int, width: int, size: int) -> int:
    """K: a view of ``size`` px from a ``height`` x ``width`` source is sampled on a K x K grid per output pixel
    (K = ceil(source side / size), at most 4), fixed by the shapes alone (no host synchronisation)."""
    return max(1, min(4, math.ceil(max(height, width) / size)))


def geometry(images: Tensor, p: ViewParams, spec: ViewConfig) -> Tensor:
    """Crop + resize + rotate/shift + flip of a uint8 batch [B, 3, H, W] of one size: float32 [B, 3, size,
    size] in [0, 255], one grid_sample for the batch. A crop larger than the view (downscaling) is sampled at
    K x K points spread over each output pixel and averaged (a box filter: antialiasing); a smaller one is
    sampled at the pixel centres (plain bilinear, as torchvision resizes up)."""
    b, c, height, width = images.shape
    size = int(spec.size)
    to_crop, to_source = _maps(p, size, height, width)
    k = supersampling(height, width, size)
    dev = images.device
    centres = (torch.arange(size, device=dev, dtype=torch.float32) * 2 + 1) / size - 1  # [size]
    if k == 1:
        u = centres[None].expand(b, size)
    else:
        spread = (p.box[:, 2:].max(dim=1).values > size).float()  # [B]: 1 = downscaling
        delta = ((torch.arange(k, device=dev, dtype=torch.float32) + 0.5) / k - 0.5) * (2 / size)  # [K]
        u = (centres[None, :, None] + spread[:, None, None] * delta[None, None, :]).reshape(b, size * k)
    ux, uy = u[:, None, :], u[:, :, None]  # [B, 1, side], [B, side, 1]
    a, st = to_crop[:, :, :, None, None], to_source[:, :, :, None, None]
    vx = a[:, 0, 0] * ux + a[:, 0, 1] * uy + a[:, 0, 2]  # [B, side, side]: where it lands in the crop
    vy = a[:, 1, 0] * ux + a[:, 1, 1] * uy + a[:, 1, 2]
    gx = torch.clamp(vx * st[:, 0, 0] + st[:, 1, 0], st[:, 2, 0], st[:, 3, 0])  # in the source, inside the crop
    gy = torch.clamp(vy * st[:, 0, 1] + st[:, 1, 1], st[:, 2, 1], st[:, 3, 1])
    grid = torch.stack([gx, gy], dim=-1)
    x = F.grid_sample(images.float(), grid, mode=spec.interpolation, padding_mode="border", align_corners=False)
    if spec.rotation or spec.translate:  # black where the rotation or shift brings in what lay outside the crop
        x = x * ((vx.abs() <= 1) & (vy.abs() <= 1))[:, None].to(x.dtype)
    if k > 1:
        x = F.avg_pool2d(x, k)
    return x.clamp_(0, 255) if spec.interpolation == "bicubic" else x


# ---------------------------------------------------------------------------------------------- colour
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def grayscale(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    r, g, b = x.unbind(1)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b)[:, None]


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of [B, 3, H, W] images in [0, 1] by ``shift`` [B] turns (torchvision's adjust_hue: HSV,
    h <- (h + shift) mod 1)."""
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(chroma > 0, h / 6, torch.zeros_like(h))
    h = torch.remainder(h + shift[:, None, None], 1.0)
    # hsv -> rgb: channel n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6 * h, 6.0)
        out.append(maxc - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=1)


def _colour_op(x: Tensor, op: int, f: Tensor) -> Tensor:
    """One ColorJitter operation with per-image factors f [n] on [n, 3, H, W] in [0, 1]."""
    fb = f.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:  # brightness: blend with black
        return (x * fb).clamp_(0, 1)
    if op == 1:  # contrast: blend with the mean luma of the image
        return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), fb)
    if op == 2:  # saturation: blend with the image's grey version
        return _blend(x, grayscale(x), fb)
    return adjust_hue(x, f.to(x.dtype))


def _apply_where(x: Tensor, chosen: Tensor, fn: Callable[[Tensor, Tensor], Tensor], masked: bool) -> Tensor:
    """x with ``fn(rows, their indices)`` applied to the rows where ``chosen`` [B] is set. ``masked``: compute it
    for every row and select (no host synchronisation: for accelerators); else only on the chosen rows (less
    work: for the CPU, where synchronising costs nothing)."""
    if masked:
        every = torch.arange(len(x), device=x.device)
        return torch.where(chosen[:, None, None, None], fn(x, every), x)
    sel = chosen.nonzero()[:, 0]
    if len(sel) == 0:
        return x
    x = x.clone()
    x[sel] = fn(x[sel], sel)
    return x


def _jitter_op(rows: Tensor, idx: Tensor, op: int, factors: Tensor) -> Tensor:
    return _colour_op(rows, op, factors[idx])


def colour_jitter(x: Tensor, p: ViewParams, spec: ViewConfig, masked: bool | None = None) -> Tensor:
    """ColorJitter on the images with ``p.jitter``, each in its own order ``p.order``; an operation whose
    strength is 0 is skipped, as torchvision skips it. ``masked`` (default: off the CPU): see _apply_where."""
    masked = x.device.type != "cpu" if masked is None else masked
    enabled = [op for op, v in enumerate((spec.brightness, spec.contrast, spec.saturation, spec.hue)) if v > 0]
    for position in range(4):
        for op in enabled:
            chosen = p.jitter & (p.order[:, position] == op)
            x = _apply_where(x, chosen, partial(_jitter_op, op=op, factors=p.factors[:, op]), masked)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-image Gaussian blur (torchvision's kernel: exp(-t^2 / 2 sigma^2) on t = -(k-1)/2..(k-1)/2, normalised;
    reflect padding), separable, as one grouped convolution per direction."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=torch.float64)
    kern = torch.exp(-0.5 * (t[None] / sigma[:, None].double()) ** 2)
    kern = (kern / kern.sum(dim=1, keepdim=True)).to(x.dtype)  # [n, k]
    weight = kern.repeat_interleave(c, dim=0)  # [n * c, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weight[:, None, None, :], groups=n * c)  # along the width
    y = F.conv2d(y, weight[:, None, :, None], groups=n * c)  # along the height
    return y.view(n, c, h, w)


def blur_kernel_size(spec: ViewConfig) -> int:
    """The odd kernel side of a view's blur (the per-sample path's rule)."""
    return max(3, int(round(spec.blur_kernel * spec.size)) // 2 * 2 + 1)


def photometric(x: Tensor, p: ViewParams, spec: ViewConfig, masked: bool | None = None) -> Tensor:
    """Colour jitter, grayscale, blur, solarize of float [B, 3, S, S] in [0, 255] (per image, as drawn).
    ``masked`` (default: off the CPU): no host synchronisation, see _apply_where."""
    masked = x.device.type != "cpu" if masked is None else masked
    x = x / 255.0
    if spec.color_jitter > 0:
        x = colour_jitter(x, p, spec, masked)
    if spec.grayscale > 0:
        x = torch.where(p.grey[:, None, None, None], grayscale(x).expand_as(x), x)
    if spec.blur > 0:
        k = blur_kernel_size(spec)
        x = _apply_where(x, p.blur, lambda rows, idx: gaussian_blur(rows, p.sigma[idx], k), masked)
    if spec.solarize > 0:
        x = torch.where(p.solarize[:, None, None, None] & (x >= 128 / 255), 1 - x, x)
    return x * 255.0


# ---------------------------------------------------------------------------------------------- runs
def grid_patches(view: Tensor, offsets: Tensor, cells: int, patch: int) -> list[Tensor]:
    """Relative-Loc's patches: for each of cells x cells cells, a patch x patch square at its own per-image
    offset [B, cells^2, 2] inside the cell; returned in row-major cell order."""
    b, c, size, _ = view.shape
    cell = size // cells
    ar = torch.arange(patch, device=view.device)
    rows_b = torch.arange(b, device=view.device)[:, None, None]
    out = []
    for q in range(cells * cells):
        row, col = divmod(q, cells)
        top = row * cell + offsets[:, q, 0]  # [B]
        left = col * cell + offsets[:, q, 1]
        ys = (top[:, None] + ar)[:, :, None]  # [B, p, 1]
        xs = (left[:, None] + ar)[:, None, :]  # [B, 1, p]
        out.append(view.permute(0, 2, 3, 1)[rows_b, ys, xs].permute(0, 3, 1, 2))
    return out


@dataclass
class BatchedOutputs:
    """One view run on a batch: its images (float [B, 3, s, s], integers in [0, 255]), a target per image (-1: none) and
    the mask drawn with the first image ([B, gh, gw] bool) or None."""

    images: list[Tensor]
    targets: list[int]
    mask: Tensor | None = None


class BatchedViewPipeline:
    """One :class:`ViewConfig` with its ``copies`` run on a batch as one batch of ``copies`` x B images (copy c
    draws from stream ``first_stream + c``): geometry (on source images, or skipped for views that workers already
    cropped), photometric, then rotations / grid patches / second size, and the masks."""

    def __init__(self, spec: ViewConfig | dict[str, Any], first_stream: int) -> None:
        self.spec = as_view_config(spec)
        self.copies = int(self.spec.copies)
        self.streams = list(range(first_stream, first_stream + self.copies))
        self.mask = _mask_generator(self.spec)

    def params(self, seeds: Tensor, height: Tensor, width: Tensor, streams: int | Tensor) -> ViewParams:
        return sample_params(self.spec, seeds, height, width, streams)

    def __call__(self, images: Tensor | Sequence[Tensor], seeds: Tensor, cropped: bool = False) -> list[BatchedOutputs]:
        """``images``: uint8 [B, 3, H, W] source images, or (``cropped``) one uint8 [B, 3, s, s] per copy, cut to
        the view size by :meth:`geometry_one` in the workers. One :class:`BatchedOutputs` per copy."""
        spec, c = self.spec, self.copies
        if cropped:
            src = torch.cat(list(images))
        else:
            assert isinstance(images, Tensor)
            src = images.repeat(c, 1, 1, 1) if c > 1 else images
        b = len(seeds)
        device = src.device
        seeds = seeds.to(device)
        streams = torch.tensor(self.streams, device=device).repeat_interleave(b)
        hw = torch.full((b * c,), src.shape[-2], device=device), torch.full((b * c,), src.shape[-1], device=device)
        p = self.params(seeds.repeat(c), *hw, streams)
        view = src.float() if cropped else geometry(src, p, spec)
        # on the uint8 grid, as torchvision's views: float noise below half a grey level (thread counts,
        # batch sizes, devices) then changes no view, and processes that split a batch see the same pixels
        view = photometric(view, p, spec).round_()
        if spec.grid.cells:
            assert p.grid is not None
            views = grid_patches(view, p.grid, spec.grid.cells, spec.grid.patch_size)
            centre = spec.grid.cells**2 // 2
            targets = [-1 if q == centre else q - (q > centre) for q in range(len(views))]
        elif spec.rotations:
            views = [torch.rot90(view, r // 90, dims=(2, 3)) for r in spec.rotations]
            targets = list(range(len(views)))
        else:
            views = [view]
            if spec.second_size:
                second = F.interpolate(view, size=(spec.second_size,) * 2, mode=spec.interpolation, antialias=True)
                views.append(second.clamp_(0, 255).round_())
            targets = [-1] * len(views)
        return [
            BatchedOutputs(
                [v[k * b : (k + 1) * b] for v in views],
                targets,
                self._masks(seeds, stream) if self.mask is not None else None,
            )
            for k, stream in enumerate(self.streams)
        ]

    def _masks(self, seeds: Tensor, stream: int) -> Tensor:
        """One mask per image from the (small, per-sample) mask generator, seeded by the image's stream."""
        assert self.mask is not None
        keys = splitmix64(seeds.cpu().to(torch.int64) + _i64((stream + 1) * (_MIX1 % 2**64) % 2**64))
        out = []
        for key in keys.tolist():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key % 2**63)
                out.append(self.mask())
        return torch.stack(out).to(seeds.device)

    def geometry_one(self, image: Tensor, seed: int, copy: int) -> Tensor:
        """The geometric part of copy ``copy`` of this view for one uint8 image [3, H, W] of any size (in a loader
        worker): uint8 [3, size, size]. The device then runs the rest with ``cropped=True``."""
        h, w = image.shape[-2:]
        one = partial(torch.tensor, device=image.device)
        p = self.params(one([seed]), one([h]), one([w]), self.streams[copy])
        return geometry(image[None], p, self.spec)[0].round_().to(torch.uint8)


class BatchedViews:
    """All of an algorithm's views for a batch: view run v (``algo.views`` expanded by ``copies``) draws from
    stream v of each image. Returns (views, view_targets [B, V], masks) like the per-sample loader's batch."""

    def __init__(self, specs: Sequence[ViewConfig | dict[str, Any]]) -> None:
        self.pipelines: list[BatchedViewPipeline] = []
        first = 0
        for spec in map(as_view_config, specs):
            self.pipelines.append(BatchedViewPipeline(spec, first))
            first += int(spec.copies)

    def crops(self, image: Tensor, seed: int) -> list[Tensor]:
        """Every view run's geometric part for one image (loader workers, ``dataset.cache=none``)."""
        return [pipe.geometry_one(image, seed, k) for pipe in self.pipelines for k in range(pipe.copies)]

    def crops_of(self, images: Sequence[Tensor], seeds: Sequence[int]) -> list[Tensor]:
        """:meth:`crops` of images of different sizes (decoded on the device): uint8 [B, 3, s, s] per view run."""
        per_image = [self.crops(image, seed) for image, seed in zip(images, seeds, strict=True)]
        return [torch.stack(run) for run in zip(*per_image, strict=True)]

    def __call__(
        self, images: Tensor | None, seeds: Tensor, cropped: Sequence[Tensor] | None = None
    ) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """``images``: uint8 [B, 3, H, W] sources; or ``cropped``: per view run, uint8 [B, 3, s, s] views whose
        geometry the workers did (then ``images`` is unused)."""
        views: list[Tensor] = []
        targets: list[int] = []
        masks: dict[str, Tensor] = {}
        run = 0
        for pipe in self.pipelines:
            if cropped is not None:
                outs = pipe(cropped[run : run + pipe.copies], seeds, cropped=True)
            else:
                assert images is not None
                outs = pipe(images, seeds)
            run += pipe.copies
            for out in outs:
                if out.mask is not None:
                    masks[str(len(views))] = out.mask
                views += out.images
                targets += out.targets
        b = len(seeds)
        device = views[0].device
        return views, torch.tensor(targets, dtype=torch.long, device=device).expand(b, -1).contiguous(), masks
