"""Numeric settings are validated where the config is composed: each settings dataclass checks itself in
``__post_init__`` (``selfsup.config.typed`` builds them), naming the key as the user types it."""

from __future__ import annotations

import re

import pytest

from conftest import compose_cfg
from selfsup.config import typed
from selfsup.data.loader import LoaderConfig
from selfsup.data.views import GridConfig, MaskConfig, ViewConfig
from selfsup.distributed import DistConfig
from selfsup.engine.checkpoint import CheckpointConfig
from selfsup.engine.logger import LogConfig
from selfsup.engine.optim import OptimizerConfig, ParamOverride
from selfsup.engine.schedules import ScheduleConfig
from selfsup.errors import ConfigError
from selfsup.eval.knn import KNNConfig

NAN = float("nan")

# (dataclass, bad field values, the message it must give)
BAD: list[tuple[type, dict, str]] = [
    # algo.optimizer
    (OptimizerConfig, {"lr": -1.0}, "algo.optimizer.lr must be > 0, got -1.0"),
    (OptimizerConfig, {"lr": 0.0}, "algo.optimizer.lr must be > 0, got 0.0"),
    (OptimizerConfig, {"lr": NAN}, "algo.optimizer.lr must be > 0, got nan"),
    (OptimizerConfig, {"base_batch_size": 0}, "algo.optimizer.base_batch_size must be >= 1, got 0"),
    (OptimizerConfig, {"weight_decay": -1e-4}, "algo.optimizer.weight_decay must be >= 0, got -0.0001"),
    (
        OptimizerConfig,
        {"weight_decay_end": -0.1},
        "algo.optimizer.weight_decay_end must be >= 0 or null (a constant weight decay), got -0.1",
    ),
    (OptimizerConfig, {"momentum": 1.5}, "algo.optimizer.momentum must be in [0, 1], got 1.5"),
    (OptimizerConfig, {"momentum": -0.1}, "algo.optimizer.momentum must be in [0, 1], got -0.1"),
    (
        OptimizerConfig,
        {"betas": [0.9, 1.0]},
        "algo.optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got [0.9, 1.0]",
    ),
    (OptimizerConfig, {"betas": [0.9]}, "algo.optimizer.betas must be two numbers in [0, 1)"),
    (OptimizerConfig, {"betas": [-0.1, 0.9]}, "algo.optimizer.betas must be two numbers in [0, 1)"),
    (OptimizerConfig, {"eps": 0.0}, "algo.optimizer.eps must be > 0, got 0.0"),
    (OptimizerConfig, {"lars_eta": -0.001}, "algo.optimizer.lars_eta must be > 0, got -0.001"),
    (
        ParamOverride,
        {"lr_mult": -1.0},
        "algo.optimizer.paramwise.<name>.lr_mult must be >= 0 (a factor of the learning rate), got -1.0",
    ),
    (
        ParamOverride,
        {"decay_mult": -2.0},
        "algo.optimizer.paramwise.<name>.decay_mult must be >= 0 (a factor of the weight decay), got -2.0",
    ),
    (ParamOverride, {"momentum": 2.0}, "algo.optimizer.paramwise.<name>.momentum must be in [0, 1] or null, got 2.0"),
    # schedule
    (ScheduleConfig, {"epochs": 0}, "schedule.epochs must be >= 1, got 0"),
    (ScheduleConfig, {"batch_size": 0}, "schedule.batch_size must be >= 1, got 0"),
    (ScheduleConfig, {"accumulate": -1}, "schedule.accumulate must be >= 1, got -1"),
    (ScheduleConfig, {"warmup_epochs": -1.0}, "schedule.warmup_epochs must be in [0, schedule.epochs=10], got -1.0"),
    (
        ScheduleConfig,
        {"epochs": 5, "warmup_epochs": 10.0},
        "schedule.warmup_epochs must be in [0, schedule.epochs=5], got 10.0",
    ),
    (
        ScheduleConfig,
        {"warmup_start_factor": 0.0},
        "schedule.warmup_start_factor must be in (0, 1] (the warm-up starts at this fraction of the lr), got 0.0",
    ),
    (ScheduleConfig, {"warmup_start_factor": 1.5}, r"schedule.warmup_start_factor must be in (0, 1]"),
    (
        ScheduleConfig,
        {"min_lr_ratio": 1.1},
        "schedule.min_lr_ratio must be in [0, 1] (the lr ends at this fraction), got 1.1",
    ),
    (ScheduleConfig, {"min_lr_ratio": -0.1}, "schedule.min_lr_ratio must be in [0, 1]"),
    (
        ScheduleConfig,
        {"epochs": 100, "milestones": [60, 120]},
        "schedule.milestones must be epochs in [1, schedule.epochs=100], got [60, 120]",
    ),
    (ScheduleConfig, {"milestones": [0]}, "schedule.milestones must be epochs in [1, schedule.epochs=10], got [0]"),
    (ScheduleConfig, {"gamma": 0.0}, "schedule.gamma must be > 0, got 0.0"),
    (ScheduleConfig, {"clip_grad": 0.0}, "schedule.clip_grad must be > 0 or null (no clipping), got 0.0"),
    # algo.views[]
    (
        ViewConfig,
        {"size": 0},
        "algo.views[].size must be >= 1 (the views take dataset.image_size unless they set their own), got 0",
    ),
    (ViewConfig, {"size": 32, "copies": 0}, "algo.views[].copies must be >= 1, got 0"),
    (
        ViewConfig,
        {"size": 32, "crop_scale": [0.5, 0.2]},
        "algo.views[].crop_scale must be two numbers [min, max] with 0 < min <= max <= 1, got [0.5, 0.2]",
    ),
    (ViewConfig, {"size": 32, "crop_scale": [0.0, 1.0]}, "algo.views[].crop_scale must be two numbers"),
    (ViewConfig, {"size": 32, "crop_scale": [0.5, 1.5]}, "algo.views[].crop_scale must be two numbers"),
    (ViewConfig, {"size": 32, "crop_scale": [0.5]}, "algo.views[].crop_scale must be two numbers"),
    (
        ViewConfig,
        {"size": 32, "crop_ratio": [1.3, 0.7]},
        "algo.views[].crop_ratio must be two numbers [min, max] with 0 < min <= max, got [1.3, 0.7]",
    ),
    (ViewConfig, {"size": 32, "crop_ratio": [-1.0, 1.0]}, "algo.views[].crop_ratio must be two numbers"),
    (ViewConfig, {"size": 32, "hflip": 1.5}, "algo.views[].hflip=1.5 is a probability and must be in [0, 1]"),
    (ViewConfig, {"size": 32, "color_jitter": -0.1}, "algo.views[].color_jitter=-0.1 is a probability and must be"),
    (ViewConfig, {"size": 32, "grayscale": 2.0}, "algo.views[].grayscale=2.0 is a probability and must be"),
    (ViewConfig, {"size": 32, "blur": 1.01}, "algo.views[].blur=1.01 is a probability and must be"),
    (ViewConfig, {"size": 32, "solarize": -1.0}, "algo.views[].solarize=-1.0 is a probability and must be"),
    (ViewConfig, {"size": 32, "rotation": -10.0}, "algo.views[].rotation must be >= 0, got -10.0"),
    (
        ViewConfig,
        {"size": 32, "translate": 1.5},
        "algo.views[].translate must be in [0, 1] (a fraction of the view size), got 1.5",
    ),
    (ViewConfig, {"size": 32, "translate": -0.1}, "algo.views[].translate must be in [0, 1]"),
    (ViewConfig, {"size": 32, "brightness": -0.4}, "algo.views[].brightness must be >= 0, got -0.4"),
    (ViewConfig, {"size": 32, "contrast": -0.4}, "algo.views[].contrast must be >= 0, got -0.4"),
    (ViewConfig, {"size": 32, "saturation": -0.4}, "algo.views[].saturation must be >= 0, got -0.4"),
    (ViewConfig, {"size": 32, "hue": 0.6}, "algo.views[].hue must be in [0, 0.5], got 0.6"),
    (ViewConfig, {"size": 32, "hue": -0.1}, "algo.views[].hue must be in [0, 0.5], got -0.1"),
    (
        ViewConfig,
        {"size": 32, "blur_sigma": [2.0, 0.1]},
        "algo.views[].blur_sigma must be two numbers [min, max] with 0 < min <= max, got [2.0, 0.1]",
    ),
    (ViewConfig, {"size": 32, "blur_sigma": [0.0, 2.0]}, "algo.views[].blur_sigma must be two numbers"),
    (
        ViewConfig,
        {"size": 32, "blur_kernel": 0.0},
        "algo.views[].blur_kernel must be in (0, 1] (a fraction of the view size), got 0.0",
    ),
    (ViewConfig, {"size": 32, "blur_kernel": 1.5}, "algo.views[].blur_kernel must be in (0, 1]"),
    (ViewConfig, {"size": 32, "second_size": 0}, "algo.views[].second_size must be >= 1, got 0"),
    (MaskConfig, {"patch_size": 0}, "algo.views[].mask.patch_size must be >= 1, got 0"),
    (MaskConfig, {"min_block": 0}, "algo.views[].mask.min_block must be >= 1, got 0"),
    (MaskConfig, {"mask_patch_size": -32}, "algo.views[].mask.mask_patch_size must be >= 1, got -32"),
    (MaskConfig, {"num_patches": -1}, "algo.views[].mask.num_patches must be >= 0, got -1"),
    (
        MaskConfig,
        {"min_block": 4, "max_block": 2},
        "algo.views[].mask.max_block must be >= mask.min_block=4 or null (num_patches), got 2",
    ),
    (MaskConfig, {"min_aspect": 0.0}, "algo.views[].mask.min_aspect must be in (0, 1], got 0.0"),
    (MaskConfig, {"min_aspect": 3.0}, "algo.views[].mask.min_aspect must be in (0, 1], got 3.0"),
    (MaskConfig, {"ratio": 1.0}, "algo.views[].mask.ratio must be in [0, 1), got 1.0"),
    (MaskConfig, {"ratio": -0.1}, "algo.views[].mask.ratio must be in [0, 1), got -0.1"),
    (GridConfig, {"cells": -1}, "algo.views[].grid.cells must be >= 0 (0 = no grid), got -1"),
    (GridConfig, {"patch_size": 0}, "algo.views[].grid.patch_size must be >= 1, got 0"),
    # loader, checkpoint, log, knn, dist
    (LoaderConfig, {"num_workers": -1}, "loader.num_workers must be >= 0 or null (auto), got -1"),
    (LoaderConfig, {"prefetch_factor": 0}, "loader.prefetch_factor must be >= 1 (batches buffered per worker), got 0"),
    (CheckpointConfig, {"interval": -1}, "checkpoint.interval must be >= 0 (0 = only last.pt), got -1"),
    (CheckpointConfig, {"keep": -2}, "checkpoint.keep must be >= 0 (0 = keep all), got -2"),
    (LogConfig, {"interval": 0}, "log.interval must be >= 1 (optimizer steps between log lines), got 0"),
    (KNNConfig, {"k": 0}, "knn.k must be >= 1, got 0"),
    (KNNConfig, {"temperature": 0.0}, "knn.temperature must be > 0, got 0.0"),
    (KNNConfig, {"batch_size": 0}, "knn.batch_size must be >= 1, got 0"),
    (KNNConfig, {"interval": -1}, "knn.interval must be >= 0 (0 = only before and after training), got -1"),
    (DistConfig, {"backend": "mpi"}, "dist.backend='mpi' must be auto, nccl or gloo"),
    (DistConfig, {"timeout_s": 0}, "dist.timeout_s must be >= 1 (seconds a collective may wait), got 0"),
]


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    BAD,
    ids=[f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in values.items())}" for cls, values, _ in BAD],
)
def test_a_bad_value_names_its_key(cls, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        cls(**values)
    assert "\n" not in str(e.value)


# the edges of every range are allowed
GOOD: list[tuple[type, dict]] = [
    (OptimizerConfig, {"lr": 1e-30, "weight_decay": 0.0, "weight_decay_end": 0.0, "momentum": 0.0}),
    (OptimizerConfig, {"momentum": 1.0, "betas": [0.0, 0.999], "base_batch_size": 1}),
    (ParamOverride, {"lr_mult": 0.0, "decay_mult": 0.0, "momentum": 0.0}),
    (ScheduleConfig, {"epochs": 1, "warmup_epochs": 1.0, "warmup_start_factor": 1.0, "min_lr_ratio": 1.0}),
    (ScheduleConfig, {"epochs": 3, "milestones": [1, 3], "clip_grad": 1.0}),
    (ViewConfig, {"size": 1, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip": 0.0, "solarize": 1.0}),
    (ViewConfig, {"size": 8, "translate": 1.0, "hue": 0.5, "blur_kernel": 1.0, "blur_sigma": [1.0, 1.0]}),
    (MaskConfig, {"num_patches": 0, "min_block": 1, "max_block": 1, "min_aspect": 1.0, "ratio": 0.0}),
    (GridConfig, {"cells": 0, "patch_size": 1}),
    (LoaderConfig, {"num_workers": 0, "prefetch_factor": 1}),
    (CheckpointConfig, {"interval": 0, "keep": 0}),
    (LogConfig, {"interval": 1}),
    (KNNConfig, {"k": 1, "interval": 0, "batch_size": 1}),
    (DistConfig, {"backend": "gloo", "timeout_s": 1}),
]


@pytest.mark.parametrize(("cls", "values"), GOOD, ids=[f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(GOOD)])
def test_the_edges_of_each_range_are_allowed(cls, values):
    cls(**values)


def test_a_view_declared_without_a_size_is_left_to_the_config():
    """``size: ???`` until composed; Hydra names the unset key when it is read."""
    assert ViewConfig().size == "???"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.optimizer.lr=-1"], "algo.optimizer.lr must be > 0, got -1.0"),  # as typed, not the scaled lr
        (["schedule.epochs=2", "schedule.warmup_epochs=3"], "schedule.warmup_epochs must be in [0, schedule.epochs=2]"),
        (["algo.views.0.solarize=2"], "algo.views[].solarize=2.0 is a probability and must be in [0, 1]"),
        (["algo.views.0.mask.ratio=1.0"], "algo.views[].mask.ratio must be in [0, 1), got 1.0"),
        (["dataset.image_size=0"], "dataset.image_size must be >= 8, got 0"),  # as typed, before the views
        (["algo=odc", "algo.optimizer.paramwise.head.lr_mult=-1"], "paramwise.<name>.lr_mult must be >= 0"),
        (["loader.prefetch_factor=0"], "loader.prefetch_factor must be >= 1"),
        (["knn.k=0"], "knn.k must be >= 1, got 0"),
        (["dist.backend=mpi"], "dist.backend='mpi' must be auto, nccl or gloo"),
    ],
)
def test_typed_raises_the_dataclass_error_itself(overrides, message):
    """OmegaConf's ``to_object`` does not wrap what ``__post_init__`` raises: the CLI prints this line."""
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        typed(compose_cfg(overrides))
    assert type(e.value) is ConfigError and e.value.__cause__ is None


def test_every_shipped_config_is_valid():
    typed(compose_cfg([]))
    typed(compose_cfg(["algo=mae", "backbone=vit_tiny", "schedule=cosine"]))
    typed(compose_cfg(["algo=odc", "schedule=step"]))
