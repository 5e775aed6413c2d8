"""MAE's patchify / unpatchify / random_masking against numpy references of the official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from references import mae_reference
from selfsup.models.masking import patchify, random_masking, unpatchify


def patchify_reference(imgs: np.ndarray, p: int) -> np.ndarray:
    """Explicit loops: patch index = row-major over the grid, pixel index = (row, col, channel)."""
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    out = np.zeros((b, gh * gw, p * p * c), dtype=imgs.dtype)
    for n in range(b):
        for i in range(gh):
            for j in range(gw):
                for r in range(p):
                    for s in range(p):
                        for ch in range(c):
                            out[n, i * gw + j, (r * p + s) * c + ch] = imgs[n, ch, i * p + r, j * p + s]
    return out


@pytest.mark.parametrize(("b", "c", "hw", "p"), [(2, 3, 8, 4), (1, 3, 12, 3), (2, 1, 6, 2), (1, 2, 4, 4)])
def test_patchify_matches_reference(b, c, hw, p):
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(b, c, hw, hw)).astype(np.float32)
    out = patchify(torch.tensor(imgs), p)
    assert out.shape == (b, (hw // p) ** 2, p * p * c)
    np.testing.assert_array_equal(out.numpy(), patchify_reference(imgs, p))


def test_patchify_matches_official_einsum():
    rng = np.random.default_rng(1)
    imgs = rng.normal(size=(2, 3, 16, 16))
    p = 4
    x = imgs.reshape(2, 3, 4, p, 4, p)
    official = np.einsum("nchpwq->nhwpqc", x).reshape(2, 16, p * p * 3)
    np.testing.assert_array_equal(patchify(torch.tensor(imgs), p).numpy(), official)


@pytest.mark.parametrize(("c", "hw", "p"), [(3, 8, 4), (3, 12, 3), (1, 6, 2)])
def test_unpatchify_inverts_patchify(c, hw, p):
    x = torch.randn(2, c, hw, hw)
    patches = patchify(x, p)
    torch.testing.assert_close(unpatchify(patches, p, c), x, rtol=0, atol=0)
    # and the other way round
    torch.testing.assert_close(patchify(unpatchify(patches, p, c), p), patches, rtol=0, atol=0)


def test_unpatchify_matches_reference_inverse():
    rng = np.random.default_rng(2)
    imgs = rng.normal(size=(1, 3, 6, 6))
    patches = patchify_reference(imgs, 3)
    np.testing.assert_array_equal(unpatchify(torch.tensor(patches), 3, 3).numpy(), imgs)


@pytest.mark.parametrize(("n", "ratio"), [(16, 0.75), (10, 0.5), (49, 0.75), (7, 0.0), (5, 0.9)])
def test_random_masking_counts(n, ratio):
    torch.manual_seed(0)
    b, d = 4, 6
    tokens = torch.randn(b, n, d)
    kept, mask, restore = random_masking(tokens, ratio)
    keep = int(n * (1 - ratio))
    assert kept.shape == (b, keep, d)
    assert mask.shape == (b, n) and restore.shape == (b, n)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == n - keep).all()
    for row in restore:  # a permutation of 0..n-1
        assert sorted(row.tolist()) == list(range(n))


def test_random_masking_kept_tokens_are_the_unmasked_originals():
    torch.manual_seed(1)
    b, n, d = 3, 16, 5
    tokens = torch.randn(b, n, d)
    kept, mask, restore = random_masking(tokens, 0.75)
    for i in range(b):
        visible = [j for j in range(n) if mask[i, j] == 0]
        assert len(visible) == kept.shape[1]
        # every kept token is one of the originals at a position where mask == 0, each exactly once
        matched = []
        for t in kept[i]:
            hits = [j for j in range(n) if torch.equal(tokens[i, j], t)]
            assert len(hits) == 1
            matched.append(hits[0])
        assert sorted(matched) == visible
    # MAE's decoder: append placeholders for the removed tokens and un-shuffle with `restore`
    filled = torch.cat([kept, torch.full((b, n - kept.shape[1], d), float("nan"))], dim=1)
    unshuffled = torch.gather(filled, 1, restore[:, :, None].expand(-1, -1, d))
    visible_mask = mask == 0
    torch.testing.assert_close(unshuffled[visible_mask], tokens[visible_mask])
    assert torch.isnan(unshuffled[~visible_mask]).all()


def test_random_masking_differs_between_samples():
    torch.manual_seed(2)
    tokens = torch.randn(8, 64, 4)
    _, mask, _ = random_masking(tokens, 0.75)
    distinct = {tuple(row.tolist()) for row in mask}
    assert len(distinct) == 8


def test_random_masking_is_seeded():
    tokens = torch.randn(2, 16, 4)
    torch.manual_seed(3)
    a = random_masking(tokens, 0.5)
    torch.manual_seed(3)
    b = random_masking(tokens, 0.5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def _tiny_mae(norm_pix: bool = True):
    from selfsup.algorithms.mae import MAE
    from selfsup.models.vit import VisionTransformer

    torch.manual_seed(4)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    return MAE(vit, mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_forward_loss_is_on_the_masked_patches_only(norm_pix):
    """MAE.forward's loss = the reference MSE over the patches its mask removed (not over all patches),
    with the prediction and mask that ``reconstruct`` gives for the same random state."""
    mae = _tiny_mae(norm_pix)
    x = torch.randn(3, 3, 16, 16)
    torch.manual_seed(5)
    loss = mae({"views": [x], "index": torch.arange(3), "label": torch.zeros(3, dtype=torch.long)})["loss"]
    torch.manual_seed(5)
    with torch.no_grad():
        out = mae.reconstruct(x)
    target = patchify(x, 4).numpy()
    assert out.mask.sum().item() == 3 * 12  # 75% of 16 patches per image
    expected = mae_reference(out.pred.numpy(), target, out.mask.numpy(), norm_pix)
    all_patches = mae_reference(out.pred.numpy(), target, np.ones_like(out.mask.numpy()), norm_pix)
    assert abs(expected - all_patches) > 1e-3  # the kept patches change the value: the check can fail
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)  # one call: loss, prediction and mask agree


def test_reconstruct_with_given_noise():
    """The caller's noise decides the mask (the 4 largest of 16 values per image are kept... removed: MAE keeps
    the smallest), independently of the RNG, so a visualisation can fix it."""
    mae = _tiny_mae()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = mae.reconstruct(x, noise)
        torch.manual_seed(123)
        b = mae.reconstruct(x, noise)
    torch.testing.assert_close(a.pred, b.pred)
    expected_mask = torch.zeros(2, 16)
    expected_mask.scatter_(1, noise.argsort(dim=1)[:, 4:], 1.0)  # all but the 4 smallest are removed
    assert torch.equal(a.mask, expected_mask)


def test_decoder_mlp_ratio_follows_the_encoder():
    from selfsup.algorithms.mae import MAE
    from selfsup.models.vit import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    mae = MAE(vit, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    assert mae.decoder.blocks[0].mlp[0].out_features == 48  # 24 x the encoder's 2.0, not 4
