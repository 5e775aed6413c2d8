"""Export a trained backbone under torchvision's or timm's key names: MMSelfSup's
``extract_backbone_weights.py``, plus the renaming that makes the file load into those libraries.

    python -m selfsup.tools.export CKPT OUT [format=auto|torchvision|timm] [allow_cifar_stem=true]
    python -m selfsup.tools.export outputs/<run>/last.pt zoo/                 # -> zoo/last_torchvision-<sha8>.pth
    python -m selfsup.tools.export outputs/<run>/last.pt zoo/mae_vitb_timm    # -> zoo/mae_vitb_timm-<sha8>.pth

``CKPT`` is a selfsup checkpoint (``last.pt``, ``epoch_NNNN.pt`` or its ``publish``-ed form). The
algorithm is rebuilt from the config it stores (``load_pretrained``) and its backbone's state is
written, renamed, as a plain dict of CPU tensors that loads with ``torch.load(weights_only=True)``.
``OUT`` is a folder (the stem is ``<CKPT stem>_<format>``) or a file name stem, as for
``selfsup.tools.publish``: the file is written atomically as ``<stem>-<sha8>.pth``.

* **ResNet -> torchvision** (``format=auto`` or ``torchvision``): selfsup's ResNet keeps torchvision's
  names (conv1, bn1, layer1..layer4), so the file loads into ``torchvision.models.<arch>()`` with
  ``strict=False`` and only ``fc.weight`` / ``fc.bias`` missing (timm's ResNets use the same names). It
  also loads, every key, into a detection backbone: ``fasterrcnn_resnet50_fpn(weights=None,
  weights_backbone=None).backbone.body.load_state_dict(sd)`` (likewise ``maskrcnn_resnet50_fpn``). With a
  pretrained ``weights_backbone`` torchvision builds that body with ``FrozenBatchNorm2d``, which has no
  ``num_batches_tracked``: it drops those keys itself while loading, and nothing else is ignored.
  A ResNet trained with ``backbone.stem=cifar`` (3x3 stride-1 conv1, no max-pool) is refused: its
  ``conv1.weight`` is [64, 3, 3, 3] where torchvision's is [64, 3, 7, 7]. ``allow_cifar_stem=true``
  exports it anyway; the printed load line then swaps torchvision's conv1 and max-pool for the CIFAR ones.
* **ViT -> timm** (``format=auto`` or ``timm``): the names of ``timm.models.vision_transformer.
  VisionTransformer``: ``patch_embed`` -> ``patch_embed.proj``, ``blocks.i.mlp.0`` / ``mlp.2`` ->
  ``blocks.i.mlp.fc1`` / ``fc2``; ``cls_token``, ``pos_embed`` (our fixed sin-cos table becomes timm's
  learned parameter of the same shape), ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2`` keep theirs.
  ``global_pool=token``: the final ``norm`` is timm's ``norm`` (timm's ``fc_norm`` is an Identity).
  ``global_pool=avg``: timm then normalises the mean patch token with ``fc_norm`` and has no final
  ``norm``, exactly as our ``forward`` does, so ``fc_norm`` is exported and ``norm`` (used only by MAE's
  pre-training encoder, never by ``forward``) is left out. Either way timm's pooled feature
  (``forward_head(forward_features(x), pre_logits=True)``) equals our backbone's output.

The printed line ``load:`` is the Python that loads the file. The reverse mapping,
:func:`import_backbone_state`, is how ``load_encoder`` (every benchmark's ``ckpt=``, with
``backbone=<arch>``) evaluates an exported file. Bad input prints one line ``selfsup: error: ...`` and
exits with status 2.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torchvision
from torch import Tensor, nn

from selfsup.engine import checkpoint as ckpt_io
from selfsup.errors import CheckpointError, ConfigError
from selfsup.models.resnet import ResNet
from selfsup.models.vit import Block, VisionTransformer
from selfsup.tools import run_cli
from selfsup.tools.publish import output_stem, write_hashed

FORMATS = ("auto", "torchvision", "timm")
USAGE = "usage: python -m selfsup.tools.export CKPT OUT [format=auto|torchvision|timm] [allow_cifar_stem=true]"

# (selfsup ViT name, timm VisionTransformer name); {b} is a block index, {t} weight or bias. Read in
# both directions: export (selfsup -> timm) and import_backbone_state (timm -> selfsup).
VIT_NAMES: tuple[tuple[str, str], ...] = (
    ("patch_embed.{t}", "patch_embed.proj.{t}"),
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("blocks.{b}.norm1.{t}", "blocks.{b}.norm1.{t}"),
    ("blocks.{b}.attn.qkv.{t}", "blocks.{b}.attn.qkv.{t}"),
    ("blocks.{b}.attn.proj.{t}", "blocks.{b}.attn.proj.{t}"),
    ("blocks.{b}.norm2.{t}", "blocks.{b}.norm2.{t}"),
    ("blocks.{b}.mlp.0.{t}", "blocks.{b}.mlp.fc1.{t}"),
    ("blocks.{b}.mlp.2.{t}", "blocks.{b}.mlp.fc2.{t}"),
    ("norm.{t}", "norm.{t}"),
    ("fc_norm.{t}", "fc_norm.{t}"),
)
VIT_FINAL_NORM = ("norm.weight", "norm.bias")  # MAE's pre-training norm: not in an avg-pooled export
TIMM_HEAD = ["head.weight", "head.bias"]  # timm.create_model's classifier (num_classes=1000)
TORCHVISION_FC = ["fc.weight", "fc.bias"]
# timm's ViT names by (embed_dim, depth, num_heads), for the printed create_model line
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}


def _pattern(template: str) -> re.Pattern[str]:
    text = re.escape(template).replace(r"\{b\}", r"(?P<b>\d+)").replace(r"\{t\}", r"(?P<t>weight|bias)")
    return re.compile(text)


_TO_TIMM = [(_pattern(ours), theirs) for ours, theirs in VIT_NAMES]
_FROM_TIMM = [(_pattern(theirs), ours) for ours, theirs in VIT_NAMES]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    """``key`` renamed by the first rule of ``table`` that matches all of it; None if none does."""
    for pattern, template in table:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict())
    return None


@dataclass
class Exported:
    path: Path
    sha256: str
    format: str  # torchvision | timm
    arch: str  # resnet50, vit(embed 768, depth 12, ...)
    tensors: int
    target: str  # the Python expression of the model the file loads into
    target_missing: list[str]  # keys that model has and the file lacks (its classifier)
    left_out: list[str] = field(default_factory=list)  # backbone tensors the format cannot carry
    load: str = ""  # the one line of Python that loads the file


# --------------------------------------------------------------------------------------------
# selfsup -> torchvision / timm


def backbone_kind(backbone: nn.Module, source: str = "the checkpoint") -> str:
    """``"resnet"`` or ``"vit"``; any other backbone, or one whose first layer takes Sobel edges (DeepCluster's
    ``sobel=true``: 2 input channels, which no torchvision or timm model has), is a :class:`ConfigError`."""
    from selfsup.algorithms.deepcluster import SobelConv2d

    if any(isinstance(m, SobelConv2d) for m in backbone.modules()):
        raise ConfigError(
            f"{source}'s backbone sees Sobel edges (algo.model.sobel=true): its first layer takes 2 edge channels, "
            "not RGB, so no torchvision/timm model can load it; benchmark the checkpoint itself (selfsup.benchmark "
            "ckpt=...) or pretrain with algo.model.sobel=false to export"
        )
    if isinstance(backbone, ResNet):
        return "resnet"
    if isinstance(backbone, VisionTransformer):
        return "vit"
    raise ConfigError(
        f"{source}'s backbone is a {type(backbone).__module__}.{type(backbone).__name__}: export knows "
        "selfsup's ResNet (torchvision names) and VisionTransformer (timm names) only"
    )


def resolve_format(backbone: nn.Module, fmt: str = "auto", source: str = "the checkpoint") -> str:
    """The format ``fmt`` names for ``backbone``: ``auto`` picks torchvision for a ResNet and timm for a
    ViT; the other pairs are a :class:`ConfigError`."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    kind = backbone_kind(backbone, source)
    natural = "torchvision" if kind == "resnet" else "timm"
    if fmt in ("auto", natural):
        return natural
    if kind == "resnet":
        raise ConfigError(
            f"format=timm is for ViT backbones; {source} holds a ResNet ({getattr(backbone, 'arch', '?')}), which "
            "exports with torchvision's key names (timm's ResNets use the same ones): use format=torchvision or auto"
        )
    raise ConfigError(
        f"format=torchvision is for ResNet backbones; {source} holds a ViT, which exports with timm's key names "
        "(torchvision's ViT is laid out differently): use format=timm or auto"
    )


def _torchvision_target(backbone: ResNet) -> nn.Module:
    """The torchvision model a ResNet export loads into, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        net = getattr(torchvision.models, backbone.arch)(weights=None)
        if backbone.stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return net


def resnet_to_torchvision(backbone: ResNet, allow_cifar_stem: bool = False) -> dict[str, Tensor]:
    """The ResNet's state under torchvision's names (they are the same), checked against
    ``torchvision.models.<arch>()``: every key has its place and shape there; only ``fc`` is missing."""
    if backbone.stem == "cifar" and not allow_cifar_stem:
        raise ConfigError(
            f"this {backbone.arch} was trained with backbone.stem=cifar (3x3 stride-1 conv1 [64, 3, 3, 3], no "
            f"max-pool); torchvision's {backbone.arch} has a 7x7 stride-2 conv1 [64, 3, 7, 7] and a max-pool, so "
            "the weights cannot load into it. Pass allow_cifar_stem=true to export anyway (the printed load line "
            "then replaces torchvision's conv1 and max-pool), or evaluate the checkpoint itself with selfsup"
        )
    state = dict(backbone.state_dict())
    target = _torchvision_target(backbone).state_dict()
    foreign = [k for k in state if k not in target or target[k].shape != state[k].shape]
    if foreign:  # a bug in the ResNet wrapper, not a user error: never write a file that will not load
        raise RuntimeError(f"backbone tensors without a place in torchvision's {backbone.arch}: {foreign[:5]}")
    return state


def vit_to_timm(state: dict[str, Tensor], global_pool: str) -> tuple[dict[str, Tensor], list[str]]:
    """(selfsup ViT ``state`` under timm's names, the keys left out). ``global_pool="avg"`` leaves out the
    final ``norm`` (timm's avg-pooled ViT has none: it normalises the pooled token with ``fc_norm``)."""
    left_out = [k for k in VIT_FINAL_NORM if k in state] if global_pool == "avg" else []
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in left_out:
            continue
        name = _rename(key, _TO_TIMM)
        if name is None:  # a ViT variant this table does not know: refuse rather than drop a tensor
            raise ConfigError(f"the ViT backbone's tensor {key!r} has no timm name; export cannot carry it")
        out[name] = value
    return out, left_out


def timm_model(backbone: VisionTransformer) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) for ``timm.create_model`` giving the ViT ``backbone``'s shape:
    ``vit_<size>_patch16_224`` with what differs from it as arguments."""
    first = cast(Block, backbone.blocks[0]) if len(backbone.blocks) else None
    depth, heads = len(backbone.blocks), first.attn.num_heads if first is not None else 1
    size = TIMM_SIZES.get((backbone.embed_dim, depth, heads))
    kwargs: dict[str, Any] = {}
    if backbone.img_size != 224:
        kwargs["img_size"] = backbone.img_size
    if backbone.patch_size != 16:
        kwargs["patch_size"] = backbone.patch_size
    if backbone.in_chans != 3:
        kwargs["in_chans"] = backbone.in_chans
    if size is None:
        kwargs.update(embed_dim=backbone.embed_dim, depth=depth, num_heads=heads)
    if backbone.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = backbone.mlp_ratio
    if first is not None and first.attn.qkv.bias is None:
        kwargs["qkv_bias"] = False
    if backbone.global_pool == "avg":
        kwargs["global_pool"] = "avg"
    return f"vit_{size or 'base'}_patch16_224", kwargs


def export_state(
    backbone: nn.Module, fmt: str = "auto", allow_cifar_stem: bool = False, source: str = "the checkpoint"
) -> tuple[str, dict[str, Tensor], list[str]]:
    """(format, the backbone's state under that format's names as contiguous CPU tensors, keys left out)."""
    fmt = resolve_format(backbone, fmt, source)
    if isinstance(backbone, ResNet):
        state, left_out = resnet_to_torchvision(backbone, allow_cifar_stem), list[str]()
    else:
        assert isinstance(backbone, VisionTransformer)
        state, left_out = vit_to_timm(dict(backbone.state_dict()), backbone.global_pool)
    return fmt, {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, left_out


# --------------------------------------------------------------------------------------------
# torchvision / timm -> selfsup (load_encoder)


def import_backbone_state(state: dict[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """An exported (torchvision- or timm-named) state dict under ``backbone``'s own keys, complete: the
    classifier (``fc.*`` / ``head.*``) is dropped; tensors the export does not carry and ``forward`` does not
    use are taken from ``backbone`` itself (``num_batches_tracked`` of a FrozenBatchNorm2d detection body;
    the pre-training ``norm`` of an avg-pooled ViT). A tensor with no place in ``backbone`` or a file of the
    other family or pooling is a :class:`CheckpointError`."""
    kind = backbone_kind(backbone, "backbone=")
    own = backbone.state_dict()
    if kind == "resnet":
        return _import_resnet(state, backbone, own)
    assert isinstance(backbone, VisionTransformer)
    return _import_vit(state, backbone, own)


def _import_resnet(state: dict[str, Tensor], backbone: nn.Module, own: dict[str, Tensor]) -> dict[str, Tensor]:
    arch = getattr(backbone, "arch", "ResNet")
    if "cls_token" in state or "patch_embed.proj.weight" in state:
        raise CheckpointError(
            f"the file holds a ViT (timm names) but backbone= is a {arch}: name a ViT, e.g. backbone=vit_base"
        )
    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1, mine = out.get("conv1.weight"), own["conv1.weight"]
    if conv1 is not None and conv1.shape != mine.shape:
        stem = "cifar" if conv1.shape[-1] == 3 else "imagenet"
        raise CheckpointError(
            f"the file's conv1 is {tuple(conv1.shape)} where backbone= has {tuple(mine.shape)}: it was exported "
            f"from a ResNet with the {stem} stem; set backbone.stem={stem}"
        )
    foreign = [k for k in out if k not in own]
    if foreign:
        raise CheckpointError(
            f"the file holds {len(foreign)} tensors a {arch} has no place for ({ckpt_io.summarise(foreign)}): name "
            "the architecture it was exported from (e.g. backbone=resnet50)"
        )
    for k in own:  # FrozenBatchNorm2d (a detection body) keeps no batch counter; eval never reads it
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = own[k]
    return out


def _import_vit(state: dict[str, Tensor], backbone: VisionTransformer, own: dict[str, Tensor]) -> dict[str, Tensor]:
    if "conv1.weight" in state or "layer1.0.conv1.weight" in state:
        raise CheckpointError(
            "the file holds a ResNet (torchvision names) but backbone= is a ViT: name it, e.g. backbone=resnet50"
        )
    out: dict[str, Tensor] = {}
    foreign = []
    for key, value in state.items():
        if key.startswith("head."):
            continue
        name = _rename(key, _FROM_TIMM)
        if name is None:
            foreign.append(key)
        else:
            out[name] = value
    if foreign:
        raise CheckpointError(
            f"the file holds {len(foreign)} tensors selfsup's ViT has no place for ({ckpt_io.summarise(foreign)}): "
            "a timm ViT variant selfsup does not build (layer scale, register tokens, ...)"
        )
    has_norm, has_fc_norm = "norm.weight" in out, "fc_norm.weight" in out
    if backbone.global_pool == "token" and has_fc_norm:
        raise CheckpointError(
            "the file is an average-pooled ViT (it has fc_norm, the norm after pooling): set backbone.global_pool=avg"
        )
    if backbone.global_pool == "avg" and has_norm and not has_fc_norm:
        raise CheckpointError("the file is a CLS-token ViT (a final norm, no fc_norm): set backbone.global_pool=token")
    if backbone.global_pool == "avg" and not has_norm:  # left out by the export; forward does not use it
        out.update({k: own[k] for k in VIT_FINAL_NORM})
    return out


# --------------------------------------------------------------------------------------------
# the file


def _target_and_load(backbone: nn.Module, fmt: str, path: Path) -> tuple[str, str]:
    """(the model the file loads into, the one line of Python that loads it)."""
    load = f"m.load_state_dict(torch.load({str(path)!r}, weights_only=True), strict=False)"
    if fmt == "torchvision":
        assert isinstance(backbone, ResNet)
        target = f"torchvision.models.{backbone.arch}()"
        cifar = ""
        if backbone.stem == "cifar":
            cifar = "m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity(); "
        return target, f"import torch, torchvision; m = {target}; {cifar}{load}"
    assert isinstance(backbone, VisionTransformer)
    name, kwargs = timm_model(backbone)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    target = f'timm.create_model("{name}", pretrained=False{args})'
    return target, f"import timm, torch; m = {target}; {load}"


def default_stem(src: Path, fmt: str) -> Path:
    """``<src stem>_<format>`` (a published name's ``-<sha8>`` dropped): the stem when OUT is a folder."""
    return src.with_name(f"{re.sub(r'-[0-9a-f]{8}$', '', src.stem)}_{fmt}.pth")


def export(
    src: str | os.PathLike, out: str | os.PathLike, fmt: str = "auto", allow_cifar_stem: bool = False
) -> Exported:
    """Export the backbone of checkpoint ``src`` under ``out`` (see the module doc)."""
    from selfsup.engine.pretrained import existing_file, load_pretrained

    src = existing_file(src)
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    if "format" not in ckpt_io.load(src, mmap=True, plain_ok=True):
        raise CheckpointError(
            f"{src} holds plain weights (an exported backbone?), not a selfsup checkpoint: export takes the "
            "last.pt / epoch_NNNN.pt of a selfsup run or its published .pth"
        )
    backbone = load_pretrained(src).algo.backbone
    fmt, state, left_out = export_state(backbone, fmt, allow_cifar_stem, str(src))
    stem = output_stem(default_stem(src, fmt), out)
    path, digest = write_hashed(state, stem, tag="export")
    target, load = _target_and_load(backbone, fmt, path)
    if isinstance(backbone, ResNet):
        arch = backbone.arch + (" (CIFAR stem)" if backbone.stem == "cifar" else "")
        missing = TORCHVISION_FC
    else:
        assert isinstance(backbone, VisionTransformer)
        arch = f"ViT (embed {backbone.embed_dim}, depth {len(backbone.blocks)}, patch {backbone.patch_size}, "
        arch += f"{backbone.img_size} px, global_pool={backbone.global_pool})"
        missing = TIMM_HEAD
    return Exported(path, digest, fmt, arch, len(state), target, list(missing), left_out, load)


def format_result(e: Exported) -> str:
    lines = [
        str(e.path),
        f"format: {e.format} names, {e.arch}, {e.tensors} tensors",
        f"sha256: {e.sha256}",
        f"missing in {e.target}: {', '.join(e.target_missing)} (its classifier; nothing else)",
    ]
    if e.left_out:
        lines.append(
            f"left out: {', '.join(e.left_out)} (MAE's pre-training norm: the avg-pooled feature does not use it "
            "and timm's avg-pooled ViT has none)"
        )
    lines.append(f"load: {e.load}")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[str, str, str, bool]:
    """(CKPT, OUT, format, allow_cifar_stem) from the command line."""
    positional, options = [], {"format": "auto", "allow_cifar_stem": "false"}
    for arg in argv:
        if arg.startswith("-") and arg != "-":
            raise ConfigError(f"unknown option {arg}: {USAGE}")
        key, sep, value = arg.partition("=")
        if sep and key in options:
            options[key] = value
        elif sep and re.fullmatch(r"[A-Za-z_]+", key) and not os.path.exists(arg):
            raise ConfigError(f"unknown setting {key}=: {USAGE}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise ConfigError(
            f"export takes 2 arguments, CKPT (a checkpoint) and OUT (a folder or a file name stem), got "
            f"{len(positional)}: {USAGE}"
        )
    flag = options["allow_cifar_stem"].lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"allow_cifar_stem={options['allow_cifar_stem']!r} must be true or false")
    return positional[0], positional[1], options["format"], flag in ("true", "1", "yes")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return

    def run() -> Exported:
        src, out, fmt, allow_cifar_stem = parse(argv)
        return export(src, out, fmt, allow_cifar_stem)

    result = run_cli(run)
    print(format_result(result), flush=True)


if __name__ == "__main__":
    main()
