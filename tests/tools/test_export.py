"""export: a trained backbone under torchvision's names (ResNet: loads into torchvision's classifier and
into the Faster / Mask R-CNN FPN bodies) or timm's (ViT: loads into timm's VisionTransformer and gives the
same pooled feature, token and avg pooling), written as <stem>-<sha8>.pth; import_backbone_state inverts it
exactly, so load_encoder evaluates an exported file as the checkpoint itself; bad input is one error line."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import run_tool
from selfsup.engine.pretrained import load_pretrained, load_state
from selfsup.errors import CheckpointError, ConfigError
from selfsup.eval.encoder import load_encoder
from selfsup.models.resnet import ResNet
from selfsup.models.vit import VisionTransformer
from selfsup.tools import export as ex

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def jitter(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with every parameter and BN statistic moved off its initial value (LayerNorms 1/0, zero
    biases), so a tensor loaded into the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point() and "pos_embed" not in name:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
                if "running_var" in name:
                    t.abs_()
    return net.eval()


def tiny_vit(global_pool: str = "token") -> VisionTransformer:
    net = VisionTransformer(**TINY, global_pool=global_pool)  # type: ignore[arg-type]
    jitter(net)
    return net


@pytest.fixture(scope="module")
def resnet50_state():
    _, state, left_out = ex.export_state(jitter(ResNet("resnet50")))
    assert not left_out
    return state


# --------------------------------------------------------------------------------------------
# ResNet -> torchvision


def test_resnet50_loads_into_torchvision_with_only_fc_missing(resnet50_state):
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in resnet50_state.values())
    net = torchvision.models.resnet50()
    result = net.load_state_dict(resnet50_state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(net.layer4[2].bn3.running_var, resnet50_state["layer4.2.bn3.running_var"])
    # a torchvision classifier's state comes back without its fc (e.g. a model fine-tuned there)
    own = ex.import_backbone_state(net.state_dict(), ResNet("resnet50"))
    assert own.keys() == resnet50_state.keys()


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone,
        lambda: torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone,
        # what torchvision builds with a pretrained weights_backbone: FrozenBatchNorm2d, no num_batches_tracked
        lambda: torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d
        ),
    ],
    ids=["fasterrcnn", "maskrcnn", "frozen_bn"],
)
def test_resnet50_loads_every_key_of_the_detection_body(resnet50_state, build):
    body = build().body
    result = body.load_state_dict(resnet50_state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    body_state = body.state_dict()
    ignored = set(resnet50_state) - set(body_state)  # FrozenBatchNorm2d drops the batch counters, nothing else
    assert all(k.endswith("num_batches_tracked") for k in ignored)
    assert all(torch.equal(v, resnet50_state[k]) for k, v in body_state.items())
    if ignored:  # and a detection body's state comes back into a selfsup ResNet-50 whole
        own = ex.import_backbone_state(body_state, ResNet("resnet50"))
        assert own.keys() == resnet50_state.keys()
        assert all(torch.equal(own[k], resnet50_state[k]) for k in body_state)


def test_cifar_stem_is_refused_unless_allowed():
    net = jitter(ResNet("resnet18", stem="cifar"))
    with pytest.raises(ConfigError, match=r"stem=cifar.*\[64, 3, 3, 3\].*\[64, 3, 7, 7\].*allow_cifar_stem=true"):
        ex.export_state(net)
    _, state, _ = ex.export_state(net, allow_cifar_stem=True)
    tv = torchvision.models.resnet18()
    tv.conv1, tv.maxpool, tv.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    assert not tv.load_state_dict(state, strict=False).unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), net(x))
    with pytest.raises(CheckpointError, match="backbone.stem=cifar"):  # back into an ImageNet-stem ResNet
        ex.import_backbone_state(state, ResNet("resnet18"))


def test_sobel_backbone_is_refused_with_the_way_out():
    """DeepCluster's Sobel input makes conv1 take 2 edge channels: no torchvision model can load that."""
    from selfsup.algorithms.deepcluster import use_sobel_input

    net = ResNet("resnet18")
    use_sobel_input(net)
    with pytest.raises(ConfigError, match=r"Sobel edges.*algo\.model\.sobel=false"):
        ex.export_state(net)


# --------------------------------------------------------------------------------------------
# ViT -> timm


def test_vit_base_loads_into_timm_vit_base_with_only_head_missing(timm):
    ours = jitter(VisionTransformer())  # ViT-B/16, 224 px: selfsup's defaults
    fmt, state, left_out = ex.export_state(ours)
    assert (fmt, left_out) == ("timm", []) and ex.timm_model(ours) == ("vit_base_patch16_224", {})
    with torch.device("meta"):  # shapes and names only: no 86M random numbers to draw
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False)
    result = theirs.load_state_dict(state, strict=False, assign=True)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    assert all(p.device.type == "cpu" for n, p in theirs.named_parameters() if not n.startswith("head."))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # everything but the (meta) head was assigned: the pooled feature runs, and agrees
        pooled = theirs.eval().forward_head(theirs.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_tiny_vit_gives_timms_pooled_feature(timm, pool):
    ours = tiny_vit(pool)
    _, state, left_out = ex.export_state(ours, "timm")
    assert left_out == ([] if pool == "token" else ["norm.weight", "norm.bias"])
    theirs = timm.models.vision_transformer.VisionTransformer(**TINY, num_classes=0, global_pool=pool)
    theirs.load_state_dict(state)  # strict: every key, nothing left over
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ours(x)
        torch.testing.assert_close(theirs.eval().forward_head(theirs.forward_features(x), pre_logits=True), want)
        # the printed create_model line builds the same network (with a classifier, the only missing keys)
        name, kwargs = ex.timm_model(ours)
        made = timm.create_model(name, pretrained=False, **kwargs)
        result = made.load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
        torch.testing.assert_close(made.eval().forward_head(made.forward_features(x), pre_logits=True), want)
        # and timm's state (with its head) comes back into a selfsup ViT as the same network
        back = VisionTransformer(**TINY, global_pool=pool)  # type: ignore[arg-type]
        load_state(back, ex.import_backbone_state(made.state_dict(), back), "timm", required="")
        torch.testing.assert_close(back.eval()(x), want)


# --------------------------------------------------------------------------------------------
# import_backbone_state: the exact inverse


def build(kind: str) -> nn.Module:
    return ResNet("resnet18") if kind == "resnet18" else VisionTransformer(**TINY, global_pool=kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["token", "avg", "resnet18"])
def test_import_inverts_export(kind):
    ours = jitter(build(kind))
    _, state, _ = ex.export_state(ours)
    fresh = build(kind)
    own = ex.import_backbone_state(state, fresh)
    assert own.keys() == ours.state_dict().keys()
    load_state(fresh, own, "exported", required="")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ours(x))


def test_format_must_fit_the_backbone():
    r18, vit = ResNet("resnet18"), VisionTransformer(**TINY)
    assert [ex.resolve_format(r18, f) for f in ("auto", "torchvision")] == ["torchvision"] * 2
    assert [ex.resolve_format(vit, f) for f in ("auto", "timm")] == ["timm"] * 2
    with pytest.raises(ConfigError, match="format=timm is for ViT backbones.*use format=torchvision"):
        ex.resolve_format(r18, "timm")
    with pytest.raises(ConfigError, match="format=torchvision is for ResNet backbones.*use format=timm"):
        ex.resolve_format(vit, "torchvision")
    with pytest.raises(ConfigError, match="Linear: export knows"):
        ex.resolve_format(nn.Linear(2, 2))


def test_import_refuses_a_file_of_another_architecture():
    vit_token, vit_avg = ex.export_state(tiny_vit("token"))[1], ex.export_state(tiny_vit("avg"))[1]
    r18 = ex.export_state(ResNet("resnet18"))[1]
    with pytest.raises(CheckpointError, match="holds a ViT.*backbone=vit_base"):
        ex.import_backbone_state(vit_token, ResNet("resnet18"))
    with pytest.raises(CheckpointError, match="holds a ResNet"):
        ex.import_backbone_state(r18, VisionTransformer(**TINY))
    with pytest.raises(CheckpointError, match="global_pool=avg"):
        ex.import_backbone_state(vit_avg, VisionTransformer(**TINY, global_pool="token"))
    with pytest.raises(CheckpointError, match="global_pool=token"):
        ex.import_backbone_state(vit_token, VisionTransformer(**TINY, global_pool="avg"))
    with pytest.raises(CheckpointError, match=r"no place for \(blocks\.0\.ls1\.gamma\).*layer scale"):
        ex.import_backbone_state({**vit_token, "blocks.0.ls1.gamma": torch.ones(32)}, VisionTransformer(**TINY))
    with pytest.raises(CheckpointError, match="no place for.*backbone=resnet50"):
        ex.import_backbone_state({**r18, "layer1.0.conv3.weight": torch.ones(1)}, ResNet("resnet18"))
    with pytest.raises(ConfigError, match="Linear.*ResNet.*VisionTransformer"):
        ex.import_backbone_state(r18, nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# the tool, on trained checkpoints


def test_cli_exports_the_simclr_backbone(simclr_digits_ckpt, tmp_path, capsys):
    ex.main([str(simclr_digits_ckpt), f"{tmp_path / 'zoo'}/"])  # (python -m: test_missing_file_...)
    out = capsys.readouterr().out.splitlines()
    path = tmp_path / "zoo" / out[0].rsplit("/", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out[0] == str(path) and re.fullmatch(rf"last_torchvision-{digest[:8]}\.pth", path.name)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert f"sha256: {digest}" in out and "format: torchvision names, resnet18," in out[1]
    assert any(line.startswith("missing in torchvision.models.resnet18(): fc.weight, fc.bias") for line in out)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in state.values())
    assert f"{len(state)} tensors" in out[1]

    scope: dict = {}  # the printed line loads it
    exec(out[-1].removeprefix("load: "), scope)
    tv = scope["m"]
    tv.fc = nn.Identity()
    pre = load_pretrained(simclr_digits_ckpt)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), pre.algo.backbone(x))

    # load_encoder evaluates the exported file exactly as the checkpoint
    exported = load_encoder(path, device="cpu", backbone=pre.config.backbone)
    original = load_encoder(simclr_digits_ckpt, device="cpu")
    assert exported.config is None and not exported.report.missing and not exported.report.unexpected
    with torch.no_grad():
        assert torch.equal(exported.extract(x), original.extract(x))


def test_mae_checkpoint_exports_to_timm(timm, mae_digits_ckpt, tmp_path):
    result = ex.export(mae_digits_ckpt, tmp_path / "mae_tiny.pth")
    assert re.fullmatch(r"mae_tiny-[0-9a-f]{8}\.pth", result.path.name) and result.format == "timm"
    assert result.target_missing == ["head.weight", "head.bias"]
    pre = load_pretrained(mae_digits_ckpt)
    text = ex.format_result(result)
    assert "patch_size=8" in text and "img_size=32" in text
    scope: dict = {}
    exec(text.splitlines()[-1].removeprefix("load: "), scope)
    m = scope["m"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = m.eval().forward_head(m.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, pre.algo.backbone(x), atol=1e-5, rtol=1e-5)
        exported = load_encoder(result.path, device="cpu", backbone=pre.config.backbone)
        assert torch.equal(exported.extract(x), pre.algo.extract(x))


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2


def test_missing_file_is_one_line_and_exit_2(tmp_path):
    """As a user runs it: ``python -m selfsup.tools.export`` in a process of its own."""
    proc = run_tool("selfsup.tools.export", str(tmp_path / "nope.pt"), str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"selfsup: error: checkpoint {tmp_path / 'nope.pt'} does not exist"


def _fails(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        ex.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error: ") and "\n" not in err
    return err


def test_bad_input_exits_2_with_one_line(simclr_digits_ckpt, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert "format=timm is for ViT backbones" in _fails(capsys, str(simclr_digits_ckpt), out, "format=timm")
    assert "format='onnx' is not one of" in _fails(capsys, str(simclr_digits_ckpt), out, "format=onnx")
    assert "takes 2 arguments" in _fails(capsys, str(simclr_digits_ckpt))
    assert "unknown setting fromat=" in _fails(capsys, str(simclr_digits_ckpt), out, "fromat=timm")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "is not a selfsup checkpoint" in _fails(capsys, str(text), out)
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    assert "holds plain weights (an exported backbone?)" in _fails(capsys, str(plain), out)
    assert "is a folder" in _fails(capsys, str(tmp_path), out)

    class Foreign:  # a checkpoint whose backbone is neither a ResNet nor a ViT
        algo = nn.Module()

    Foreign.algo.backbone = nn.Linear(2, 2)
    monkeypatch.setattr("selfsup.engine.pretrained.load_pretrained", lambda *a, **k: Foreign)
    assert "torch.nn.modules.linear.Linear: export knows" in _fails(capsys, str(simclr_digits_ckpt), out)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_out_is_a_folder_or_a_stem(tmp_path):
    from pathlib import Path

    assert ex.default_stem(Path("runs/last.pt"), "timm") == Path("runs/last_timm.pth")
    assert ex.default_stem(Path("zoo/simclr_r18-0123abcd.pth"), "torchvision") == Path("zoo/simclr_r18_torchvision.pth")
    assert ex.parse(["a.pt", "b", "allow_cifar_stem=true", "format=timm"]) == ("a.pt", "b", "timm", True)
    with pytest.raises(ConfigError, match="must be true or false"):
        ex.parse(["a.pt", "b", "allow_cifar_stem=maybe"])
