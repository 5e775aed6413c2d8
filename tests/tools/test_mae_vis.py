"""python -m selfsup.tools.mae_vis: the four panels, the seeded mask, the de-normalisation of norm_pix
predictions (known answers), the PNG, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_tool
from selfsup.config import compose_tool
from selfsup.errors import ConfigError, DataError
from selfsup.models.masking import patchify
from selfsup.tools import mae_vis
from selfsup.tools.mae_vis import GREY, MAEVisConfig, compose_panels, fit_image, read_image

P = 8  # the tiny MAE's patch: 32 px images, a 4 x 4 grid of 16 patches
S = 32


def pattern(h: int, w: int) -> np.ndarray:
    """A coloured uint8 [h, w, 3] pattern: a gradient per channel plus a checker."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 5 + 20, y * 6 + 10, 120 + 60 * (((x // 5) + (y // 5)) % 2)], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def pixel_mask(mask: torch.Tensor, p: int = P) -> np.ndarray:
    """[L] patch mask (1 = removed) -> bool [H, W, 3], patch l at row l // g, column l % g (row-major)."""
    g = int(mask.numel() ** 0.5)
    out = np.zeros((g * p, g * p, 3), dtype=bool)
    for l_idx, m in enumerate(mask.tolist()):
        r, c = divmod(l_idx, g)
        out[r * p : (r + 1) * p, c * p : (c + 1) * p] = bool(m)
    return out


def cfg_of(*overrides: str) -> MAEVisConfig:
    return compose_tool("mae_vis", MAEVisConfig, list(overrides))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mae_vis") / "pattern.png"
    Image.fromarray(pattern(40, 48)).save(path)  # 40 x 48: resized to 32 x 38, centre-cropped to 32 x 32
    return path


@pytest.fixture(scope="module")
def result(mae_digits_ckpt, image_file, tmp_path_factory) -> mae_vis.Result:
    out = tmp_path_factory.mktemp("mae_vis_out") / "vis.png"
    return mae_vis.run(cfg_of(f"img={image_file}", f"ckpt={mae_digits_ckpt}", f"out={out}", "device=cpu"))


# ------------------------------------------------------------------------------------ the command


def test_cli_writes_one_png_of_four_panels(mae_digits_ckpt, image_file, tmp_path):
    out = tmp_path / "vis.png"
    proc = run_tool("selfsup.tools.mae_vis", f"img={image_file}", f"ckpt={mae_digits_ckpt}", f"out={out}", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert "loss " in proc.stdout and "mask ratio 0.75 (12 of 16 patches removed)" in proc.stdout
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (mae_vis.FIGSIZE[0] * mae_vis.DPI, mae_vis.FIGSIZE[1] * mae_vis.DPI) == (1200, 360)
        pixels = np.asarray(png.convert("RGB")).astype(float)
    assert pixels.std() > 10  # not a blank figure
    # the original panel's colours are in the figure (the pattern's green-heavy lower right, e.g.)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("img={missing}", "ckpt={mae}"), "does not exist"),
        (("img={text}", "ckpt={mae}"), "cannot read image"),
        (("img={image}", "ckpt={simclr}"), "holds a SimCLR, not an MAE"),
    ],
    ids=["missing-image", "not-an-image", "simclr-checkpoint"],
)
def test_bad_input_is_one_error_line(args, message, mae_digits_ckpt, simclr_digits_ckpt, image_file, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    paths = {
        "missing": tmp_path / "nope.png",
        "text": text,
        "image": image_file,
        "mae": mae_digits_ckpt,
        "simclr": simclr_digits_ckpt,
    }
    proc = run_tool("selfsup.tools.mae_vis", *(a.format(**paths) for a in args), f"out={tmp_path / 'v.png'}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfsup: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "v.png").exists()


def test_help_and_options(capsys, tmp_path):
    mae_vis.main(["--help"])
    assert "reconstruction + visible" in capsys.readouterr().out
    cfg = cfg_of("img=photos/cat.jpg", "ckpt=runs/a/last.pt")
    assert (cfg.seed, cfg.denorm, cfg.mask_ratio) == (0, mae_vis.Denorm.visible, None)
    assert mae_vis.output_path(cfg) == Path("runs/a").resolve() / "mae_vis" / "cat.png"
    assert mae_vis.output_path(cfg_of("img=cat.jpg", "ckpt=x.pt", f"out={tmp_path}")) == tmp_path / "cat.png"
    with pytest.raises(ConfigError, match="not a .png"):
        mae_vis.output_path(cfg_of("img=cat.jpg", "ckpt=x.pt", "out=vis.jpg"))
    with pytest.raises(ConfigError, match="mask_ratio"):
        cfg_of("img=a.png", "ckpt=x.pt", "mask_ratio=1.0")
    with pytest.raises(DataError, match="img is not set"):
        read_image("")  # make mae-vis without IMG= passes img=
    with pytest.raises(ConfigError, match="no dataset= option"):
        mae_vis.run(cfg_of("img=a.png", "ckpt=x.pt", "dataset=digits"))


# ------------------------------------------------------------------------------- the panels of a run


def test_original_panel_is_the_resized_centre_crop(result, image_file):
    panels = result.vis.panels
    assert all(p.shape == (S, S, 3) and p.dtype == np.float32 for p in panels)
    want = fit_image(read_image(image_file), S).permute(1, 2, 0).numpy() / 255
    np.testing.assert_array_equal(panels.original, want.astype(np.float32))
    # the resize + centre crop itself: an image whose short side is already 32 is only cropped (columns 4..35)
    wide = torch.from_numpy(pattern(32, 40)).permute(2, 0, 1)
    assert torch.equal(fit_image(wide, S), wide[:, :, 4:36])
    # 40 x 48 -> 32 x 38, crop 3 columns each side: a ramp stays that ramp (a column off would be 6 levels off)
    ramp = torch.from_numpy(np.broadcast_to((np.arange(48) * 5)[None, :, None], (40, 48, 3)).astype(np.uint8).copy())
    got = fit_image(ramp.permute(2, 0, 1), S)[0, 16].float().numpy()
    src_x = (np.arange(S) + 3 + 0.5) * 48 / 38 - 0.5  # output column -> input column
    np.testing.assert_allclose(got[2:-2], (src_x * 5)[2:-2], atol=3.0)  # antialias: ~2.6 levels off linear


def test_masked_and_pasted_panels(result):
    panels, mask = result.vis.panels, result.vis.mask
    assert int(mask.sum()) == 12  # mask_ratio 0.75 of 16 patches
    removed = pixel_mask(mask)
    assert (panels.masked[removed] == np.float32(GREY)).all()
    np.testing.assert_array_equal(panels.masked[~removed], panels.original[~removed])
    np.testing.assert_array_equal(panels.pasted[~removed], panels.original[~removed])
    np.testing.assert_array_equal(panels.pasted[removed], panels.reconstruction[removed])
    assert panels.reconstruction.min() >= 0.0 and panels.reconstruction.max() <= 1.0
    assert not np.allclose(panels.reconstruction, panels.original, atol=0.05)  # one epoch: far from perfect


def test_reconstruction_panel_is_the_denormalised_prediction(result):
    """The run's reconstruction panel = the model's prediction, de-normalised as documented (numpy here)."""
    vis = result.vis
    mean, std = np.array(result.mean), np.array(result.std)  # the checkpoint's (digits) normalisation
    x = vis.panels.original.astype(np.float64)
    norm = (x - mean) / std  # [H, W, 3]
    g = S // P
    patches = norm.reshape(g, P, g, P, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, P * P * 3)  # [L, P*P*3]
    mu, sd = patches.mean(1), np.sqrt(patches.var(1, ddof=1) + 1e-6)
    seen = vis.mask.numpy() == 0
    mu = np.where(seen, mu, mu[seen].mean())
    sd = np.where(seen, sd, np.sqrt((sd[seen] ** 2).mean()))
    pix = vis.pred.double().numpy() * sd[:, None] + mu[:, None]  # [L, P*P*3]
    img = pix.reshape(g, g, P, P, 3).transpose(0, 2, 1, 3, 4).reshape(S, S, 3) * std + mean
    np.testing.assert_allclose(vis.panels.reconstruction, np.clip(img, 0, 1), atol=1e-5)
    # and that prediction is the model's, of the normalised image, masked with the seed's noise
    x = torch.from_numpy(norm.transpose(2, 0, 1)).float()[None]  # [1, 3, H, W]
    with torch.no_grad():
        out = result.algo.reconstruct(x, mae_vis.mask_noise(0, g * g))
    torch.testing.assert_close(vis.pred, out.pred[0], atol=1e-4, rtol=1e-4)
    assert vis.loss == pytest.approx(float(out.loss), abs=1e-4)


def test_the_seed_fixes_the_mask(result, image_file):
    algo, mean, std = result.algo, result.mean, result.std
    image = fit_image(read_image(image_file), S)
    noise = mae_vis.mask_noise(0, 16)[0]
    kept = noise.argsort()[:4]  # the 4 of smallest noise are kept, the rest removed
    want = torch.ones(16)
    want[kept] = 0
    assert torch.equal(result.vis.mask, want)
    again = mae_vis.visualise(algo, image, mean, std, seed=0)
    assert torch.equal(again.mask, result.vis.mask)
    np.testing.assert_array_equal(again.panels.reconstruction, result.vis.panels.reconstruction)
    other = mae_vis.visualise(algo, image, mean, std, seed=1)
    assert not torch.equal(other.mask, result.vis.mask) and int(other.mask.sum()) == 12


def test_mask_ratio_and_denorm_options_reach_the_model(mae_digits_ckpt, image_file, tmp_path):
    args = [f"img={image_file}", f"ckpt={mae_digits_ckpt}", f"out={tmp_path}", "device=cpu"]
    res = mae_vis.run(cfg_of(*args, "mask_ratio=0.5", "seed=3", "denorm=original"))
    assert res.out == tmp_path / "pattern.png" and res.out.is_file()
    assert int(res.vis.mask.sum()) == 8 and res.algo.mask_ratio == 0.5
    image = fit_image(read_image(image_file), S)
    want = compose_panels(image, res.vis.pred, res.vis.mask, P, res.mean, res.std, True, "original")
    np.testing.assert_array_equal(res.vis.panels.reconstruction, want.reconstruction)


# ------------------------------------------------------------------- de-normalisation, known answers


def norm_pix_target(image: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """The perfect norm_pix prediction of ``image``: its per-patch normalised target [1, L, P*P*3]."""
    t = patchify(mae_vis.normalise(image, mean, std), P)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


def random_image(seed: int, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, (3, S, S), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


MASK = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1]], dtype=torch.float32)  # 12 removed


def test_perfect_prediction_with_denorm_original_is_the_original():
    image, mean, std = random_image(0), [0.48, 0.45, 0.40], [0.23, 0.22, 0.26]
    pred = norm_pix_target(image, mean, std)
    panels = compose_panels(image, pred, MASK, P, mean, std, norm_pix=True, denorm="original")
    np.testing.assert_allclose(panels.reconstruction, panels.original, atol=1e-5)
    np.testing.assert_allclose(panels.pasted, panels.original, atol=1e-5)
    # denorm=visible: visible patches use their own statistics (exact), the removed ones do not see theirs
    vis = compose_panels(image, pred, MASK, P, mean, std, norm_pix=True, denorm="visible")
    removed = pixel_mask(MASK[0])
    np.testing.assert_allclose(vis.reconstruction[~removed], panels.original[~removed], atol=1e-5)
    assert np.abs(vis.reconstruction[removed] - panels.original[removed]).mean() > 0.02


def test_perfect_prediction_with_denorm_visible_when_patches_share_their_statistics():
    """Every patch is the same 8 x 8 x 3 values rearranged (channels rolled, flipped): one mean, one variance."""
    base = random_image(1)[:, :P, :P]
    patches = []
    for k in range(16):
        patch = torch.roll(base, shifts=k % 3, dims=0)
        patches.append(patch.flip(-1) if k % 2 else patch.flip(-2) if k % 5 == 0 else patch)
    rows = [torch.cat(patches[r * 4 : r * 4 + 4], dim=-1) for r in range(4)]
    image = torch.cat(rows, dim=-2)  # [3, 32, 32]
    mean, std = [0.5] * 3, [0.25] * 3  # the same for every channel: rolled channels keep the patch statistics
    pred = norm_pix_target(image, mean, std)
    panels = compose_panels(image, pred, MASK, P, mean, std, norm_pix=True, denorm="visible")
    np.testing.assert_allclose(panels.reconstruction, panels.original, atol=1e-5)


def test_denorm_visible_estimates_from_the_visible_patches_only():
    """A flat prediction shows the estimate: pred = 0 -> mean of the visible patch means, pred = 1 -> plus the
    pooled standard deviation sqrt(mean of visible (var + eps)); the removed patches' own pixels do not matter."""
    mean, std = [0.5] * 3, [0.25] * 3
    image = random_image(2, 60, 160)
    removed = pixel_mask(MASK[0])
    other = image.clone()
    other[torch.from_numpy(removed).permute(2, 0, 1)] = 255  # change only the removed patches' pixels
    norm = (image.double() / 255 - 0.5) / 0.25  # [3, H, W]
    t = norm.reshape(3, 4, P, 4, P).permute(1, 3, 2, 4, 0).reshape(16, -1)  # [L, P*P*3]
    seen = MASK[0] == 0
    mu = t.mean(1)[seen].mean()
    sd = (t.var(1)[seen] + 1e-6).mean().sqrt()
    for value, want in ((0.0, mu), (1.0, mu + sd)):
        pred = torch.full((1, 16, P * P * 3), value)
        for img in (image, other):
            panels = compose_panels(img, pred, MASK, P, mean, std, norm_pix=True, denorm="visible")
            np.testing.assert_allclose(panels.reconstruction[removed], float(want) * 0.25 + 0.5, atol=1e-5)


def test_pixel_targets_are_not_denormalised_per_patch():
    image, mean, std = random_image(3), [0.48, 0.45, 0.40], [0.23, 0.22, 0.26]
    pred = patchify(mae_vis.normalise(image, mean, std), P)  # a perfect norm_pix_loss=false prediction
    for denorm in ("visible", "original"):
        panels = compose_panels(image, pred, MASK, P, mean, std, norm_pix=False, denorm=denorm)
        np.testing.assert_allclose(panels.reconstruction, panels.original, atol=1e-5)
    flat = compose_panels(image, torch.zeros_like(pred), MASK, P, mean, std, norm_pix=False)
    np.testing.assert_allclose(flat.reconstruction, np.broadcast_to(np.array(mean), (S, S, 3)), atol=1e-6)


def test_no_visible_patch_is_an_error_for_denorm_visible():
    image, mean, std = random_image(4), [0.5] * 3, [0.25] * 3
    everything = torch.ones(1, 16)
    pred = norm_pix_target(image, mean, std)
    with pytest.raises(ConfigError, match="no patch is visible"):
        compose_panels(image, pred, everything, P, mean, std, norm_pix=True, denorm="visible")
    panels = compose_panels(image, pred, everything, P, mean, std, norm_pix=True, denorm="original")
    np.testing.assert_allclose(panels.reconstruction, panels.original, atol=1e-5)
