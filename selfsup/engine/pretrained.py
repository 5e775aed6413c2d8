"""``load_pretrained(path)``: a trained algorithm back from a checkpoint, for tools and benchmarks.

The checkpoint carries its resolved config, so the algorithm (backbone, neck, head, and its state such
as ODC's memory) is rebuilt exactly as it was trained, then loaded with ``torch.load(weights_only=True)``.
Every load reports what it loaded and what was missing or unexpected; a backbone that did not load
completely is an error, never a silently random network (MMSelfSup issues #88, #330, #340).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from selfsup.algorithms.base import Algorithm
from selfsup.config import TrainConfig, group_schema
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.build import build_algorithm
from selfsup.errors import CheckpointError

log = logging.getLogger("selfsup")


@dataclass
class LoadReport:
    """What a state-dict load did: tensors loaded, keys the model has but the file lacks, keys the
    file has but the model lacks."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {ckpt_io.summarise(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {ckpt_io.summarise(self.unexpected)}")
        return "; ".join(parts)


def load_state(model: nn.Module, state: dict[str, Any], source: str, required: str = "backbone.") -> LoadReport:
    """Load ``state`` into ``model`` non-strictly and report; any missing key under ``required`` (the
    backbone) or any shape mismatch is a :class:`CheckpointError`."""
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    if shapes:
        raise CheckpointError(f"{source}: shape mismatches (file vs model): {ckpt_io.summarise(shapes, 3)}")
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(
        len(state) - len(result.unexpected_keys), list(result.missing_keys), list(result.unexpected_keys)
    )
    missing_required = [k for k in report.missing if k.startswith(required)]
    if missing_required:
        raise CheckpointError(
            f"{source} does not hold the backbone ({len(missing_required)} of its tensors are missing: "
            f"{ckpt_io.summarise(missing_required)}); refusing to continue with random weights"
        )
    log.info("%s: %s", source, report)
    return report


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a file; a missing path or a folder is a :class:`CheckpointError` (checked here so
    the message speaks of the tool's ``ckpt=`` argument, not of training's ``resume=``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        example = next(iter(sorted(p.glob("*.pt"))), p / "last.pt")
        raise CheckpointError(f"{p} is a folder, not a checkpoint: pass a checkpoint file (e.g. {example})")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def config_from_checkpoint(text: str) -> TrainConfig:
    """The typed config of a run from the YAML its checkpoint carries."""
    raw = OmegaConf.create(text)
    base = OmegaConf.structured(TrainConfig)
    with open_dict(base):
        base.algo = OmegaConf.structured(group_schema("algo", raw.algo.model._target_))
        base.backbone = OmegaConf.structured(group_schema("backbone", raw.backbone._target_))
        base.dataset = OmegaConf.structured(group_schema("dataset", raw.dataset._target_))
    obj = OmegaConf.to_object(OmegaConf.merge(base, raw))
    assert isinstance(obj, TrainConfig)
    return obj


@dataclass
class Pretrained:
    algo: Algorithm
    config: TrainConfig
    path: Path
    epoch: int
    step: int
    meta: dict[str, Any]
    report: LoadReport


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """The algorithm a selfsup training checkpoint holds, in eval mode on ``device``."""
    path = Path(path).expanduser()
    state = ckpt_io.load(path)
    if not state.get("config"):
        raise CheckpointError(f"{path} carries no config; it was not written by selfsup.train")
    cfg = config_from_checkpoint(state["config"])
    meta = dict(state.get("meta") or {})
    algo = build_algorithm(cfg, int(meta.get("num_samples", 1)))
    report = load_state(algo, state["model"], str(path))
    algo.to(device).eval()
    return Pretrained(algo, cfg, path, int(state["epoch"]), int(state["step"]), meta, report)
