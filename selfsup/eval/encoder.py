"""What the evaluation tools and benchmarks share: the options every one of them takes
(:class:`EvalConfig`), and the trained encoder they evaluate (:func:`load_encoder`).

An encoder comes from any of three kinds of file:

* a checkpoint ``python -m selfsup.train`` wrote (``last.pt``, ``epoch_NNNN.pt``) or its published form
  (``python -m selfsup.tools.publish``): it carries its config, so the algorithm is rebuilt exactly as
  trained (:func:`~selfsup.engine.pretrained.load_pretrained`) and its ``extract`` gives the features;
* an exported backbone (``python -m selfsup.tools.export``: torchvision or timm key names, no config):
  the architecture comes from the ``backbone=`` option (e.g. ``backbone=resnet50``).

Every load reports loaded / missing / unexpected keys and fails when the backbone did not load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from selfsup.config import Precision, TrainConfig
from selfsup.data.datasets import ImageDataset
from selfsup.data.views import Normalize
from selfsup.distributed import resolve_device
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.build import build_backbone, build_dataset
from selfsup.engine.pretrained import LoadReport, existing_file, load_pretrained, load_state
from selfsup.errors import CheckpointError, ConfigError

log = logging.getLogger("selfsup")


@dataclass
class EvalConfig:
    """Options shared by every tool that evaluates a checkpoint (benchmarks, t-SNE, MAE visualisation)."""

    ckpt: str = MISSING  # a selfsup checkpoint (trained or published) or an exported backbone
    dataset: Any = None  # a dataset option (dataset=cifar10 dataset.root=...); None = the checkpoint's own
    backbone: Any = None  # the architecture of an exported backbone file (backbone=resnet50); else unused
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto = bf16 autocast on CUDA, fp32 on the CPU
    batch_size: int = 256  # images per feature-extraction batch
    num_workers: int = 0  # DataLoader workers for feature extraction
    seed: int = 0
    out: str | None = None  # output folder; None = <checkpoint folder>/<tool>

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class Encoder:
    """A trained backbone, ready to evaluate (eval mode, on its device)."""

    backbone: nn.Module
    extract: Callable[[Tensor], Tensor]  # pooled features of normalised images (the algorithm's ``extract``)
    config: TrainConfig | None  # the training config (None for an exported backbone)
    source: Path
    report: LoadReport
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved)
    epoch: int | None = None  # epochs the checkpoint had trained (None for an exported backbone)

    @property
    def dataset_node(self) -> Any:
        return None if self.config is None else self.config.dataset

    def autocast(self) -> AbstractContextManager:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def normalize(self, dataset: ImageDataset) -> Normalize:
        """The dataset's normalisation, on this encoder's device."""
        return Normalize(dataset.mean, dataset.std, self.device)


def resolve_precision(precision: Precision | str, device: torch.device) -> str:
    value = Precision(precision).value
    if value == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if value == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on the CPU")
    return value


def load_encoder(
    path: str | os.PathLike, device: str = "auto", backbone: Any = None, precision: Precision | str = "auto"
) -> Encoder:
    """The encoder in ``path`` (see the module docstring), in eval mode on ``device``. ``backbone`` (a
    backbone config node) is needed for, and only used with, an exported backbone file."""
    path = existing_file(path)
    dev = resolve_device(device)
    state = ckpt_io.load(path, plain_ok=True)
    if "format" in state:
        pre = load_pretrained(path, dev)
        algo = pre.algo
        prec = resolve_precision(precision, dev)
        return Encoder(algo.backbone, algo.extract, pre.config, path, pre.report, dev, prec, pre.epoch)
    if backbone is None:
        raise ConfigError(
            f"{path} holds plain backbone weights (an exported file) without a config: name the architecture, "
            "e.g. backbone=resnet50 or backbone=vit_base"
        )
    from selfsup.tools.export import import_backbone_state

    net = build_backbone(backbone)
    own = import_backbone_state(state, net)
    report = load_state(net, own, str(path), required="")
    net.to(dev).eval()
    return Encoder(net, net, None, path, report, dev, resolve_precision(precision, dev))


def eval_datasets(cfg: EvalConfig, encoder: Encoder) -> tuple[ImageDataset, ImageDataset | None]:
    """(train split, labelled held-out split or None) of ``cfg.dataset``, or of the checkpoint's dataset."""
    node = cfg.dataset if cfg.dataset is not None else encoder.dataset_node
    if node is None:
        raise ConfigError(
            f"{encoder.source} carries no dataset config (an exported backbone): choose one, e.g. dataset=digits "
            "or dataset=cifar10 dataset.root=<folder>"
        )
    train = build_dataset(node, "train")
    val = build_dataset(node, "val") if train.has_labels else None
    return train, (val if val is not None and len(val) > 0 else None)


def default_out(cfg: EvalConfig, tool: str) -> Path:
    """``cfg.out``, or ``<checkpoint folder>/<tool>``."""
    if cfg.out:
        return Path(cfg.out).expanduser()
    return Path(cfg.ckpt).expanduser().resolve().parent / tool


def check_checkpoint_arg(path: str) -> None:
    if not path or path == MISSING:
        raise CheckpointError("ckpt is not set: pass ckpt=<path to a .pt checkpoint>")
