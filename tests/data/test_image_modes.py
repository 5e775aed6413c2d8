"""ImageFolder decodes every PIL image mode to the right 8-bit RGB values.

Each test writes a small image with known pixel values in one mode, in a format that keeps that mode
(checked by reopening it), loads it through ImageFolder and compares the tensor with 8-bit values
computed here with numpy (not with the conversion under test). Alpha is composited onto black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datasets import ImageFolder, to_rgb_uint8

H, W = 8, 32  # 256 pixels: an 8-bit gradient covers every value once


def _load(tmp_path: Path, img: Image.Image, name: str, mode: str | None = None, **save) -> torch.Tensor:
    """Save ``img`` as root/cls/<name>, check its mode survived, and return ImageFolder's tensor."""
    (tmp_path / "data" / "cls").mkdir(parents=True)
    path = tmp_path / "data" / "cls" / name
    img.save(path, **save)
    with Image.open(path) as back:
        assert back.mode == (mode or img.mode), f"{img.mode} did not survive a round trip through {name}"
    ds = ImageFolder(str(tmp_path / "data"), image_size=8)
    image, label, index = ds[0]
    assert (label, index) == (0, 0) and image.dtype == torch.uint8 and tuple(image.shape) == (3, H, W)
    return image


def _rgb(expected: np.ndarray) -> torch.Tensor:
    """[H, W] grey or [H, W, 3] colour uint8 values as the [3, H, W] tensor ImageFolder should give."""
    expected = np.asarray(expected)
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert expected.dtype == np.uint8
    return torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1)))


def _over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha composited onto black, rounded to the nearest integer."""
    out = colour.astype(np.float64) * alpha.astype(np.float64)[..., None] / 255.0
    return np.round(out).astype(np.uint8)


def _ramp(dtype=np.uint8, top: int = 255) -> np.ndarray:
    """[H, W] values from 0 to ``top`` (both included), row-major."""
    return np.round(np.linspace(0, top, H * W)).astype(dtype).reshape(H, W)


RNG = np.random.default_rng(0)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)


def _paletted(mode: str, alpha: np.ndarray | None = None) -> Image.Image:
    index = _ramp()
    if mode == "PA":
        data = np.stack([index, alpha], axis=-1)
        img = Image.frombytes("PA", (W, H), np.ascontiguousarray(data).tobytes())
    else:
        img = Image.frombytes("P", (W, H), index.tobytes())
    img.putpalette(PALETTE.tobytes())
    return img


# ------------------------------------------------------------------------------------ 8-bit modes


def test_mode_1(tmp_path):
    bits = (np.indices((H, W)).sum(axis=0) % 3) == 0
    image = _load(tmp_path, Image.fromarray(bits), "bits.png", mode="1")
    assert torch.equal(image, _rgb(np.where(bits, 255, 0).astype(np.uint8)))


def test_mode_L(tmp_path):
    grey = _ramp()
    image = _load(tmp_path, Image.fromarray(grey), "grey.png", mode="L")
    assert torch.equal(image, _rgb(grey))


def test_mode_LA_is_composited_onto_black(tmp_path):
    grey, alpha = _ramp(), _ramp()[::-1, ::-1].copy()  # bright pixels are the transparent ones
    image = _load(tmp_path, Image.fromarray(np.stack([grey, alpha], axis=-1)), "grey_alpha.png", mode="LA")
    expected = _over_black(np.repeat(grey[..., None], 3, axis=2), alpha)
    assert torch.equal(image, _rgb(expected))
    assert int(image.max()) < 255  # torchvision's convert("RGB") drops alpha and would give 255 here


def test_mode_RGB(tmp_path):
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = _load(tmp_path, Image.fromarray(rgb), "colour.png", mode="RGB")
    assert torch.equal(image, _rgb(rgb))


def test_mode_RGBA_is_composited_onto_black(tmp_path):
    rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 0)  # fully transparent: black, whatever colour it hides
    rgba[0, 1] = (200, 100, 50, 255)  # opaque: its colour
    image = _load(tmp_path, Image.fromarray(rgba), "colour_alpha.png", mode="RGBA")
    assert torch.equal(image, _rgb(_over_black(rgba[..., :3], rgba[..., 3])))
    assert image[:, 0, 0].tolist() == [0, 0, 0] and image[:, 0, 1].tolist() == [200, 100, 50]


def test_mode_P_uses_its_palette(tmp_path):
    image = _load(tmp_path, _paletted("P"), "palette.png", mode="P")
    assert torch.equal(image, _rgb(PALETTE[_ramp()]))


def test_mode_P_with_transparency_is_composited_onto_black(tmp_path):
    palette_alpha = RNG.integers(0, 256, 256, dtype=np.uint8)  # a tRNS chunk: one alpha per palette entry
    image = _load(tmp_path, _paletted("P"), "palette_trns.png", mode="P", transparency=palette_alpha.tobytes())
    with Image.open(tmp_path / "data" / "cls" / "palette_trns.png") as back:
        assert "transparency" in back.info
    index = _ramp()
    assert torch.equal(image, _rgb(_over_black(PALETTE[index], palette_alpha[index])))


def test_colour_key_transparency_of_L_and_RGB_is_black(tmp_path):
    """A PNG tRNS chunk on a grey or RGB image makes one colour transparent: it becomes black."""
    grey = _ramp()
    image = _load(tmp_path, Image.fromarray(grey), "key.png", mode="L", transparency=200)
    assert torch.equal(image, _rgb(np.where(grey == 200, 0, grey).astype(np.uint8)))
    rgb = np.stack([grey, grey[::-1], np.full_like(grey, 7)], axis=-1)
    key = tuple(int(c) for c in rgb[3, 5])
    (tmp_path / "data").rename(tmp_path / "grey")
    image = _load(tmp_path, Image.fromarray(rgb), "key_rgb.png", mode="RGB", transparency=key)
    assert torch.equal(image, _rgb(np.where((rgb == key).all(-1, keepdims=True), 0, rgb).astype(np.uint8)))


def test_mode_PA_uses_its_palette_and_alpha(tmp_path):
    alpha = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    image = _load(tmp_path, _paletted("PA", alpha), "palette_alpha.tif", mode="PA")  # PNG cannot hold PA
    assert torch.equal(image, _rgb(_over_black(PALETTE[_ramp()], alpha)))


def test_mode_CMYK(tmp_path):
    cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    img = Image.frombytes("CMYK", (W, H), cmyk.tobytes())
    image = _load(tmp_path, img, "cmyk.tif", mode="CMYK")  # PNG cannot hold CMYK
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.round((255 - c) * (255 - k) / 255).astype(np.uint8)  # naive CMYK -> RGB, as PIL converts
    assert torch.equal(image, _rgb(expected))


def test_mode_YCbCr(tmp_path):
    ycc = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    img = Image.frombytes("YCbCr", (W, H), ycc.tobytes())
    image = _load(tmp_path, img, "ycbcr.tif", mode="YCbCr")  # PNG cannot hold YCbCr
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack(  # JPEG's full-range ITU-R BT.601
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
        axis=-1,
    )
    expected = np.clip(np.round(rgb), 0, 255).astype(np.int16)
    assert (image.permute(1, 2, 0).numpy().astype(np.int16) - expected).__abs__().max() <= 1  # PIL's fixed point


# ------------------------------------------------------------------------------------ 16-bit, 32-bit and float


def _scaled16(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    """The regression: convert("RGB") clips every value above 255, so a 16-bit PNG came out all white."""
    values = _ramp(np.uint16, top=65535)
    assert values.min() == 0 and values.max() == 65535
    image = _load(tmp_path, Image.fromarray(values), "deep.png", mode="I;16")
    assert not bool((image == 255).all())
    assert torch.equal(image, _rgb(_scaled16(values)))
    assert int(image.min()) == 0 and int(image.max()) == 255 and len(image.unique()) == 256


def test_16_bit_big_endian(tmp_path):
    values = _ramp(np.uint16, top=65535)
    img = Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes())
    image = _load(tmp_path, img, "deep_be.tif", mode="I;16B")  # PNG reopens as I;16, TIFF keeps I;16B
    assert torch.equal(image, _rgb(_scaled16(values)))


def test_mode_I_within_16_bits_is_scaled_as_16_bit(tmp_path):
    values = _ramp(np.int32, top=40000)  # PIL often opens 16-bit PNGs as I
    image = _load(tmp_path, Image.fromarray(values), "int.tif", mode="I")  # PNG cannot hold I
    assert torch.equal(image, _rgb(_scaled16(values)))
    assert int(image.max()) == round(40000 * 255 / 65535)


def test_mode_I_beyond_16_bits_is_scaled_by_its_maximum(tmp_path):
    values = _ramp(np.int32, top=1_000_000)
    values[0, :4] = [-5, -1, 0, 1]  # negatives are black
    image = _load(tmp_path, Image.fromarray(values), "int32.tif", mode="I")
    expected = np.round(np.clip(values, 0, None).astype(np.float64) * 255 / 1_000_000).astype(np.uint8)
    assert torch.equal(image, _rgb(expected))
    assert image[0, 0, :4].tolist() == [0, 0, 0, 0] and int(image.max()) == 255


def test_mode_F_in_unit_range(tmp_path):
    values = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    values[0, 0] = -0.25  # below 0: black
    image = _load(tmp_path, Image.fromarray(values), "float01.tif", mode="F")  # PNG cannot hold F
    expected = np.round(np.clip(values.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    assert torch.equal(image, _rgb(expected))
    assert int(image.max()) == 255 and int(image[0, 0, 0]) == 0


def test_mode_F_beyond_unit_range_is_clipped_to_8_bits(tmp_path):
    values = np.linspace(-20, 300, H * W, dtype=np.float32).reshape(H, W)
    image = _load(tmp_path, Image.fromarray(values), "float.tif", mode="F")
    expected = np.round(np.clip(values.astype(np.float64), 0, 255)).astype(np.uint8)
    assert torch.equal(image, _rgb(expected))


# ------------------------------------------------------------------------------------ in-memory modes


@pytest.mark.parametrize("mode", ["I;16L", "I;16N"])
def test_other_16_bit_layouts(mode):
    values = _ramp(np.uint16, top=65535)
    img = Image.frombytes(mode, (W, H), values.astype("<u2" if mode == "I;16L" else "=u2").tobytes())
    assert img.mode == mode
    assert torch.equal(to_rgb_uint8(img), _rgb(_scaled16(values)))


def test_premultiplied_alpha_is_already_over_black():
    rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    img = Image.frombytes("RGBa", (W, H), rgba.tobytes())  # no file format stores RGBa: built in memory
    assert torch.equal(to_rgb_uint8(img), _rgb(rgba[..., :3]))


def test_rgbx_drops_its_padding():
    rgbx = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    img = Image.frombytes("RGBX", (W, H), rgbx.tobytes())
    assert torch.equal(to_rgb_uint8(img), _rgb(rgbx[..., :3]))
