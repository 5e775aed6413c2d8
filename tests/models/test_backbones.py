"""ResNet / ViT backbones, sin-cos position embeddings and necks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from selfsup.errors import ConfigError
from selfsup.models.necks import MLPNeck, ODCNeck
from selfsup.models.resnet import ResNet
from selfsup.models.vit import Attention, VisionTransformer, sincos_pos_embed_2d

# ---------------------------------------------------------------------------------------------- ResNet


@pytest.fixture(scope="module")
def r18_imagenet():
    torch.manual_seed(0)
    return ResNet("resnet18", stem="imagenet").eval()


@pytest.fixture(scope="module")
def r18_cifar():
    torch.manual_seed(0)
    return ResNet("resnet18", stem="cifar").eval()


def test_resnet18_imagenet_stem_stages(r18_imagenet):
    with torch.no_grad():
        outs = r18_imagenet.forward_stages(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 8, 8),  # 7x7/2 conv + 3x3/2 max-pool
        (1, 64, 8, 8),
        (1, 128, 4, 4),
        (1, 256, 2, 2),
        (1, 512, 1, 1),
    ]


def test_resnet18_cifar_stem_keeps_resolution(r18_cifar):
    assert isinstance(r18_cifar.maxpool, nn.Identity)
    assert r18_cifar.conv1.kernel_size == (3, 3) and r18_cifar.conv1.stride == (1, 1)
    with torch.no_grad():
        outs = r18_cifar.forward_stages(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 32, 32),
        (1, 64, 32, 32),
        (1, 128, 16, 16),
        (1, 256, 8, 8),
        (1, 512, 4, 4),
    ]


@pytest.mark.parametrize("fixture", ["r18_imagenet", "r18_cifar"])
def test_resnet18_pooled_output(fixture, request):
    net = request.getfixturevalue(fixture)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x)
        last = net.forward_stages(x)[-1]
    assert out.shape == (2, 512) and net.num_features == 512
    torch.testing.assert_close(out, last.mean(dim=(2, 3)))  # global average pool of the last stage


def test_resnet50_pooled_output():
    net = ResNet("resnet50", stem="imagenet").eval()
    assert net.num_features == 2048
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 2048)


def test_resnet_state_dict_loads_into_torchvision(r18_imagenet):
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(r18_imagenet.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(tv.conv1.weight, r18_imagenet.conv1.weight)
    tv.fc = nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), r18_imagenet(x))


def test_resnet_zero_init_residual():
    net = ResNet("resnet18", stem="cifar", zero_init_residual=True)
    assert all((blk.bn2.weight == 0).all() for layer in (net.layer1, net.layer4) for blk in layer)


@pytest.mark.parametrize("arch", ["vgg16", "resnet19", "densenet121", "foo"])
def test_resnet_bad_arch(arch):
    with pytest.raises(ConfigError, match="arch"):
        ResNet(arch)


def test_resnet_bad_stem():
    with pytest.raises(ConfigError, match="stem"):
        ResNet("resnet18", stem="tiny")


# ---------------------------------------------------------------------------------------------- ViT


def _vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    args.update(kw)
    return VisionTransformer(**args).eval()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_output_shape(pool):
    torch.manual_seed(0)
    vit = _vit(global_pool=pool)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = vit(x)
        z = vit.encode(vit.embed(x))
        blocks = vit.blocks_with_cls(vit.embed(x))  # [B, 1 + L, D] before any final norm
        # token: the normalised CLS token; avg (timm / MAE fine-tuning): fc_norm of the mean patch token
        expected = z[:, 0] if pool == "token" else vit.fc_norm(blocks[:, 1:].mean(dim=1))
    assert out.shape == (3, 32) and vit.num_features == 32
    torch.testing.assert_close(out, expected)
    if pool == "avg":  # not the mean of individually normalised tokens (the old, non-timm definition)
        assert not torch.allclose(out, z[:, 1:].mean(dim=1), atol=1e-3)
        assert isinstance(vit.fc_norm, torch.nn.LayerNorm)


def test_vit_embed_encode_shapes():
    vit = _vit()
    assert vit.grid == 4 and vit.num_patches == 16
    assert vit.pos_embed.shape == (1, 17, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = vit.embed(x)
        assert t.shape == (2, 16, 32)
        assert vit.encode(t).shape == (2, 17, 32)
        assert vit.encode(t[:, :5]).shape == (2, 6, 32)  # any subset of tokens


def test_vit_embed_adds_positions_to_patches():
    vit = _vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        t = vit.embed(x)
        # patch (row 1, col 2) = linear projection of its pixels + position of token 1*4+2
        patch = x[0, :, 8:16, 16:24]
        proj = (vit.patch_embed.weight * patch).sum(dim=(1, 2, 3)) + vit.patch_embed.bias
    torch.testing.assert_close(t[0, 6], proj + vit.pos_embed[0, 1 + 6], atol=1e-5, rtol=1e-5)


def test_vit_embed_wrong_size():
    with pytest.raises(ValueError, match=r"expected 32x32 images, got \(24, 24\)"):
        _vit().embed(torch.randn(1, 3, 24, 24))


@pytest.mark.parametrize(("img", "patch"), [(32, 5), (30, 8), (224, 15)])
def test_vit_img_not_divisible_by_patch(img, patch):
    with pytest.raises(ConfigError, match="patch"):
        VisionTransformer(img_size=img, patch_size=patch, embed_dim=16, depth=1, num_heads=2)


def test_vit_bad_global_pool():
    with pytest.raises(ConfigError, match="global_pool"):
        _vit(global_pool="max")


def test_vit_heads_must_divide_dim():
    with pytest.raises(ConfigError, match="embed dim 36 is not divisible by num_heads 8"):
        _vit(embed_dim=36, num_heads=8)


def test_vit_no_weight_decay():
    assert "cls_token" in _vit().no_weight_decay()


def test_attention_matches_hand_written_reference():
    torch.manual_seed(0)
    dim, heads, b, n = 12, 3, 2, 5
    attn = Attention(dim, heads).double()
    x = torch.randn(b, n, dim, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x).numpy()
    wqkv, bqkv = attn.qkv.weight.detach().numpy(), attn.qkv.bias.detach().numpy()
    wp, bp = attn.proj.weight.detach().numpy(), attn.proj.bias.detach().numpy()
    xn = x.numpy()
    hd = dim // heads
    ref = np.zeros((b, n, dim))
    for i in range(b):
        qkv = xn[i] @ wqkv.T + bqkv  # [n, 3*dim]: q | k | v, each split into heads
        q, k, v = qkv[:, :dim], qkv[:, dim : 2 * dim], qkv[:, 2 * dim :]
        heads_out = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs = scores / scores.sum(axis=1, keepdims=True)
            heads_out.append(probs @ v[:, sl])
        ref[i] = np.concatenate(heads_out, axis=1) @ wp.T + bp
    np.testing.assert_allclose(out, ref, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------- sin-cos


def sincos_reference(dim: int, grid: int) -> np.ndarray:
    """MAE formula, one entry at a time: [col half | row half], each half [sin(pos w_k) | cos(pos w_k)]."""
    q = dim // 4
    out = np.zeros((1 + grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            token = 1 + r * grid + c
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                out[token, k] = math.sin(c * w)
                out[token, q + k] = math.cos(c * w)
                out[token, 2 * q + k] = math.sin(r * w)
                out[token, 3 * q + k] = math.cos(r * w)
    return out


@pytest.mark.parametrize(("dim", "grid"), [(8, 3), (32, 4), (64, 7)])
def test_sincos_matches_mae_formula(dim, grid):
    emb = sincos_pos_embed_2d(dim, grid)
    assert emb.shape == (1, 1 + grid * grid, dim) and emb.dtype == torch.float32
    assert (emb[0, 0] == 0).all()
    np.testing.assert_allclose(emb[0].numpy(), sincos_reference(dim, grid), atol=1e-6)


def test_sincos_without_cls():
    emb = sincos_pos_embed_2d(16, 4, cls_token=False)
    assert emb.shape == (1, 16, 16)
    np.testing.assert_allclose(emb[0].numpy(), sincos_reference(16, 4)[1:], atol=1e-6)


def test_sincos_dim_not_divisible_by_4():
    with pytest.raises(ConfigError, match="divisible by 4 .* got 10"):
        sincos_pos_embed_2d(10, 4)


def test_vit_uses_sincos_buffer():
    vit = _vit()
    torch.testing.assert_close(vit.pos_embed, sincos_pos_embed_2d(32, 4))
    assert "pos_embed" not in dict(vit.named_parameters())


# ---------------------------------------------------------------------------------------------- necks


def test_mlp_neck_structure_last_bn():
    neck = MLPNeck(16, hidden_dim=32, out_dim=8, num_layers=3, last_bn=True)
    kinds = [type(m) for m in neck.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    linears = [m for m in neck.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert all(m.bias is None for m in linears)
    assert neck(torch.randn(4, 16)).shape == (4, 8)


def test_mlp_neck_structure_no_last_bn():
    neck = MLPNeck(16, hidden_dim=32, out_dim=8, num_layers=2, last_bn=False)
    kinds = [type(m) for m in neck.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert neck.mlp[0].bias is None
    assert neck.mlp[3].bias is not None  # last Linear keeps its bias without a BN after it
    assert neck(torch.randn(4, 16)).shape == (4, 8)


def test_mlp_neck_single_layer_and_invalid():
    neck = MLPNeck(16, out_dim=8, num_layers=1, last_bn=False)
    assert [type(m) for m in neck.mlp] == [nn.Linear]
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        MLPNeck(16, num_layers=0)


def test_odc_neck_shape_and_non_negative():
    torch.manual_seed(0)
    neck = ODCNeck(64, hidden_dim=32, out_dim=16)
    assert neck.bn0.affine is False and neck.bn0.momentum == 0.001
    assert (neck.fc0.bias == 0).all() and neck.fc0.weight.std().item() == pytest.approx(0.01, rel=0.2)
    x = torch.randn(8, 64)
    out = neck.train()(x)
    assert out.shape == (8, 16) and (out >= 0).all()
    neck.eval()
    with torch.no_grad():
        out_eval = neck(x)
    assert out_eval.shape == (8, 16) and (out_eval >= 0).all()
    assert (out_eval > 0).any()
