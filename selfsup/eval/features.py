"""Features for evaluation: a backbone's stages (ResNet stem + 4 stages, ViT blocks), and extraction
over a whole dataset, sharded over ranks and gathered back in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from selfsup import distributed
from selfsup.data.datasets import ImageDataset
from selfsup.data.views import MultiViewDataset, Normalize
from selfsup.errors import ConfigError

RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # MMSelfSup's feat1 .. feat5
POOLED = "pooled"  # the encoder's own feature (the algorithm's ``extract``), not a stage


def stage_names(backbone: nn.Module) -> list[str]:
    """The stages :func:`stage_features` can read: ``stem, layer1 .. layer4`` of a ResNet (MMSelfSup's
    ``feat1 .. feat5``), ``block1 .. blockN`` of a ViT; the last one is the backbone's own feature."""
    if hasattr(backbone, "forward_stages"):
        return list(RESNET_STAGES)
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return [f"block{i + 1}" for i in range(len(blocks))]
    raise ConfigError(f"{type(backbone).__name__} has no stages to read features from (a ResNet or ViT has)")


def check_stages(backbone: nn.Module, stages: Sequence[str]) -> list[str]:
    """``stages`` with ``last`` resolved to the final stage; an unknown name is a :class:`ConfigError`."""
    names = stage_names(backbone)
    resolved = [names[-1] if s == "last" else s for s in stages]
    unknown = [s for s in resolved if s not in names]
    if unknown or not resolved:
        raise ConfigError(
            f"unknown stage(s) {unknown or '(none given)'} for {type(backbone).__name__}: choose from "
            f"{', '.join(names)} or last"
        )
    return resolved


@torch.no_grad()
def stage_features(
    backbone: nn.Module, x: Tensor, stages: Sequence[str], token: Literal["cls", "mean"] = "cls"
) -> dict[str, Tensor]:
    """Pooled features [B, C] of the named stages (see :func:`stage_names`) of images ``x``.

    ResNet: each stage's feature map, globally average-pooled (``layer4`` = ``backbone(x)``).
    ViT: each block's tokens through the final LayerNorm, then the CLS token (``token="cls"``; for the
    last block this is ``backbone(x)`` of a ``global_pool="token"`` ViT) or the mean of the patch tokens.
    """
    wanted = set(check_stages(backbone, stages))
    out: dict[str, Tensor] = {}
    if hasattr(backbone, "forward_stages"):
        maps = backbone.forward_stages(x)  # type: ignore[operator]
        for name, fmap in zip(RESNET_STAGES, maps, strict=True):
            if name in wanted:
                out[name] = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return out
    if token not in ("cls", "mean"):
        raise ConfigError(f"token={token!r} must be 'cls' or 'mean'")
    names = stage_names(backbone)
    cls = (backbone.cls_token + backbone.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # type: ignore[operator,index]
    z = torch.cat([cls, backbone.embed(x)], dim=1)  # type: ignore[operator]
    for name, block in zip(names, backbone.blocks, strict=True):  # type: ignore[arg-type]
        z = block(z)
        if name in wanted:
            normed = backbone.norm(z)  # type: ignore[operator]
            out[name] = normed[:, 0] if token == "cls" else normed[:, 1:].mean(dim=1)
        if len(out) == len(wanted):
            break
    return out


def stage_fn(
    extract: Callable[[Tensor], Tensor], backbone: nn.Module, stages: Sequence[str], token: str = "cls"
) -> Callable[[Tensor], dict[str, Tensor]]:
    """``x -> {stage: [B, D]}``: ``pooled`` is ``extract`` (the encoder's feature), other names are
    backbone stages (:func:`~selfsup.eval.features.stage_features`; ``last`` = the final stage)."""
    names = list(stages)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"stages must name each stage once, got {names}")
    inner = [s for s in names if s != POOLED]
    resolved = check_stages(backbone, inner) if inner else []
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"stages={names} names the same stage twice (last is {resolved[-1]})")
    rename = dict(zip(resolved, inner, strict=True))

    def fn(x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if POOLED in names:
            out[POOLED] = extract(x)
        if resolved:
            got = stage_features(backbone, x, resolved, token)  # type: ignore[arg-type]
            out.update({rename[k]: v for k, v in got.items()})
        return out

    return fn


@torch.no_grad()
def extract_features(
    fn: Callable[[Tensor], Tensor],
    dataset: ImageDataset,
    normalize: Normalize,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> tuple[Tensor, Tensor]:
    """(features [N, D] float32, labels [N]) on the device, row i = dataset item i, on every rank.

    Images go through the dataset's deterministic ``eval_transform``. Each rank processes its shard;
    the shards are all-gathered with their indices (DistributedSampler's padding repeats a few
    items, which land on the same rows).
    """
    feats, labels = extract_named_features(lambda x: {"": fn(x)}, dataset, normalize, batch_size, num_workers, autocast)
    return feats[""], labels


@torch.no_grad()
def extract_named_features(
    fn: Callable[[Tensor], dict[str, Tensor]],
    dataset: ImageDataset,
    normalize: Normalize,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`extract_features` for a ``fn`` that returns several features per image (one forward pass
    for all the stages of :func:`stage_features`): ({name: [N, D_name]}, labels [N])."""
    views = MultiViewDataset(dataset, [dataset.eval_transform()])
    world = distributed.get_world_size()
    sampler = DistributedSampler(views, shuffle=False, drop_last=False) if world > 1 else SequentialSampler(views)
    loader = DataLoader(
        views, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=torch.Generator()
    )
    feats: dict[str, Tensor] = {}
    labels = torch.full((len(dataset),), -1, dtype=torch.long, device=normalize.device)
    for batch in loader:
        with autocast() if autocast is not None else nullcontext():
            out = fn(normalize(batch["views"][0]))
        index = distributed.all_gather(batch["index"].to(normalize.device))
        for name, f in out.items():
            f = distributed.all_gather(f.float())
            if name not in feats:
                feats[name] = torch.zeros(len(dataset), f.shape[1], device=normalize.device)
            feats[name][index] = f
        labels[index] = distributed.all_gather(batch["label"].to(normalize.device))
    if not feats:
        raise ValueError("cannot extract features of an empty dataset")
    return feats, labels


def top_k_accuracy(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Fraction of rows whose label has the highest score (``top1``) and, with more than 5 classes, is
    among the 5 highest (``top5``): the metric of kNN, the linear probe, fine-tuning."""
    labels = labels.to(scores.device)
    ranked = scores.float().topk(min(5, scores.shape[1]), dim=1).indices
    out = {"top1": (ranked[:, 0] == labels).float().mean().item()}
    if num_classes > 5:
        out["top5"] = (ranked == labels[:, None]).any(dim=1).float().mean().item()
    return out
