"""Typed schema of every config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` extend these dataclasses (``defaults: [/schema/<group>/<name>@_here_]``),
so a misspelt key (``schedule.lrr=0.1``), a value of the wrong type (``schedule.epochs=ten``) or an
unknown enum value (``precision=fp8``) fails while Hydra composes the config, before anything is built.

Objects are built with ``hydra.utils.instantiate`` from the ``_target_`` fields; there is no other
registry. Layout of a composed run config::

    algo:      model (``_target_`` = the algorithm class + its hyper-parameters),
               views (the augmentation pipelines), optimizer (type, lr for ``base_batch_size``)
    backbone:  ``_target_`` = a ResNet or ViT class and its shape
    dataset:   ``_target_`` = a dataset class, resolution, normalisation, held-out split
    schedule:  epochs, per-device batch, accumulation, LR policy (warm-up, cosine / step), LR scaling
    launcher:  how processes are started (``local`` only for now)
    (top level) device, precision, seed, resume, checkpoint, logging, kNN monitor, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# --------------------------------------------------------------------------------------------
# enums (OmegaConf rejects any other value with the list of valid ones)


class OptimizerName(str, Enum):
    sgd = "sgd"
    adamw = "adamw"
    lars = "lars"


class LRPolicy(str, Enum):
    cosine = "cosine"  # linear warm-up, then half-cosine to min_lr_ratio * lr
    step = "step"  # linear warm-up, then lr *= gamma at each milestone epoch
    constant = "constant"  # linear warm-up, then constant


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # autocast + dynamic loss scaling (CUDA only)


class Stem(str, Enum):
    imagenet = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool (torchvision default)
    cifar = "cifar"  # 3x3/1 conv, no max-pool (small images)


class BadImagePolicy(str, Enum):
    skip = "skip"  # warn with the file name and use the next readable image
    error = "error"  # stop the run


class CifarValSplit(str, Enum):
    holdout = "holdout"  # hold out val_fraction of the training images
    test = "test"  # the official 10,000-image test split


# --------------------------------------------------------------------------------------------
# algo


@dataclass
class ViewConfig:
    """One augmentation pipeline; ``copies`` identical-but-independently-sampled views of it.

    Order: random-resized crop -> affine (rotation/translation) -> flip -> colour jitter ->
    grayscale -> Gaussian blur -> solarize. Probabilities are per sample. The same declaration is
    meant to run per sample in DataLoader workers (today) or batched on the device (speed issue).
    """

    size: int = MISSING
    copies: int = 1
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: str = "bilinear"  # bilinear | bicubic
    rotation: float = 0.0  # max degrees of a random rotation
    translate: float = 0.0  # max fraction of a random translation
    hflip: float = 0.5
    color_jitter: float = 0.0  # probability of applying jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel: float = 0.1  # kernel size as a fraction of the view size (rounded to odd)
    solarize: float = 0.0


@dataclass
class ParamOverride:
    """Per-parameter optimizer options for parameters whose name contains the key."""

    lr_mult: float = 1.0
    decay_mult: float = 1.0
    momentum: float | None = None
    lars_exclude: bool | None = None


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.1  # learning rate for a global batch of base_batch_size
    base_batch_size: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lars_eta: float = 0.001
    # 1-D parameters (biases, norm weights) and the algorithm's no_weight_decay() names get wd 0
    no_decay_norm_bias: bool = True
    # also exclude them from LARS' trust ratio (SimCLR/BYOL recipes)
    lars_exclude_norm_bias: bool = True
    paramwise: dict[str, ParamOverride] = field(default_factory=dict)


@dataclass
class AlgoConfig:
    model: Any = MISSING
    views: list[ViewConfig] = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class SimCLRModel:
    _target_: str = "selfsup.algorithms.simclr.SimCLR"
    hidden_dim: int = 2048
    out_dim: int = 128
    num_layers: int = 2
    temperature: float = 0.1


@dataclass
class SimCLRConfig(AlgoConfig):
    model: SimCLRModel = field(default_factory=SimCLRModel)


@dataclass
class ODCModel:
    _target_: str = "selfsup.algorithms.odc.ODC"
    num_clusters: int = 10000
    hidden_dim: int = 512
    feat_dim: int = 256
    memory_momentum: float = 0.5
    min_cluster: int = 20
    centroid_interval: int = 10
    reweight_pow: float = 0.5
    kmeans_iters: int = 20
    kmeans_seed: int = 0


@dataclass
class ODCConfig(AlgoConfig):
    model: ODCModel = field(default_factory=ODCModel)


@dataclass
class MAEModel:
    _target_: str = "selfsup.algorithms.mae.MAE"
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


@dataclass
class MAEConfig(AlgoConfig):
    model: MAEModel = field(default_factory=MAEModel)


# --------------------------------------------------------------------------------------------
# backbone


@dataclass
class BackboneConfig:
    _target_: str = MISSING


@dataclass
class ResNetConfig(BackboneConfig):
    _target_: str = "selfsup.models.resnet.ResNet"
    arch: str = "resnet50"  # any torchvision resnet* / wide_resnet* / resnext* name
    stem: Stem = Stem.imagenet
    zero_init_residual: bool = False


@dataclass
class ViTConfig(BackboneConfig):
    _target_: str = "selfsup.models.vit.VisionTransformer"
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    global_pool: str = "token"  # token (CLS) | avg


# --------------------------------------------------------------------------------------------
# dataset


@dataclass
class BackboneHints:
    """What suits this resolution; backbone configs read these through interpolation."""

    stem: Stem = Stem.imagenet
    patch_size: int = 16


@dataclass
class DatasetConfig:
    _target_: str = MISSING
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    val_fraction: float = 0.1  # held-out labelled split for the kNN monitor (0 = none)
    split_seed: int = 0
    hints: BackboneHints = field(default_factory=BackboneHints)


@dataclass
class DigitsConfig(DatasetConfig):
    _target_: str = "selfsup.data.datasets.Digits"


@dataclass
class ImageFolderConfig(DatasetConfig):
    _target_: str = "selfsup.data.datasets.ImageFolder"
    root: str = MISSING
    val_root: str | None = None
    on_bad_image: BadImagePolicy = BadImagePolicy.skip


@dataclass
class CIFAR10Config(DatasetConfig):
    _target_: str = "selfsup.data.datasets.CIFAR10"
    root: str = MISSING
    download: bool = False
    val_split: CifarValSplit = CifarValSplit.holdout


@dataclass
class FakeConfig(DatasetConfig):
    _target_: str = "selfsup.data.datasets.FakeImages"
    num_samples: int = 256
    num_classes: int = 4
    seed: int = 0


# --------------------------------------------------------------------------------------------
# schedule, launcher, trainer


@dataclass
class ScheduleConfig:
    epochs: int = 10
    batch_size: int = 64  # per device (process)
    accumulate: int = 1  # gradient accumulation steps
    policy: LRPolicy = LRPolicy.cosine
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 1e-3
    min_lr_ratio: float = 0.0
    milestones: list[int] = field(default_factory=list)  # epochs (policy=step)
    gamma: float = 0.1
    # linear scaling rule: lr = algo.optimizer.lr * global batch / algo.optimizer.base_batch_size
    scale_lr: bool = True
    clip_grad: float | None = None  # max global grad norm


@dataclass
class LauncherConfig:
    name: str = "local"


@dataclass
class LoaderConfig:
    num_workers: int | None = None  # None = auto: 0 on the CPU, up to 8 per GPU process
    pin_memory: bool = True  # only used on CUDA
    persistent_workers: bool = True
    prefetch_factor: int = 2


@dataclass
class CheckpointConfig:
    interval: int = 1  # keep epoch_NNNN.pt every N epochs (last.pt is rewritten every epoch)
    keep: int = 0  # how many epoch_NNNN.pt to keep (0 = all)


@dataclass
class LogConfig:
    interval: int = 10  # optimizer steps between log lines
    tensorboard: bool = True
    progress: bool = True  # progress bar on a TTY (plain lines otherwise)


@dataclass
class KNNConfig:
    enabled: bool = True
    interval: int = 0  # epochs between kNN evaluations (0 = only before and after training)
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800


@dataclass
class TrainConfig:
    algo: AlgoConfig = MISSING
    backbone: BackboneConfig = MISSING
    dataset: DatasetConfig = MISSING
    schedule: ScheduleConfig = MISSING
    launcher: LauncherConfig = MISSING
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    channels_last: bool | None = None  # None = on for conv nets
    compile: bool = False
    sync_bn: bool = False
    fused_optimizer: bool | None = None  # None = fused SGD/AdamW on CUDA
    resume: str | None = None  # PATH to a checkpoint, or "auto" (last.pt in the run dir)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=TrainConfig)
    for name, node in {"simclr": SimCLRConfig, "odc": ODCConfig, "mae": MAEConfig}.items():
        cs.store(group="schema/algo", name=name, node=node)
    cs.store(group="schema/backbone", name="resnet", node=ResNetConfig)
    cs.store(group="schema/backbone", name="vit", node=ViTConfig)
    datasets = {
        "digits": DigitsConfig,
        "imagefolder": ImageFolderConfig,
        "cifar10": CIFAR10Config,
        "fake": FakeConfig,
    }
    for name, node in datasets.items():
        cs.store(group="schema/dataset", name=name, node=node)
    cs.store(group="schema/schedule", name="base", node=ScheduleConfig)
    cs.store(group="schema/launcher", name="base", node=LauncherConfig)


register_configs()
