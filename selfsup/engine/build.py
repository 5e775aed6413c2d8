"""Building a run's objects from its typed config: datasets, the algorithm around its backbone,
the views. The trainer, ``load_pretrained`` and every tool build through these functions.

Objects are created by ``hydra.utils.instantiate`` from their ``_target_`` (the only registry);
a :class:`~selfsup.errors.SelfsupError` raised by a constructor surfaces as itself (one line), not
wrapped in Hydra's ``InstantiationException``.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from selfsup.algorithms.base import Algorithm
from selfsup.config import TrainConfig, to_plain
from selfsup.data.datasets import ImageDataset
from selfsup.data.views import ViewPipeline, count_views, expand_views
from selfsup.errors import ConfigError, SelfsupError


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of a typed config node (or a plain dict with ``_target_``)."""
    try:
        return instantiate(to_plain(node), **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, SelfsupError):
            raise e.__cause__ from None
        raise


def build_dataset(node: Any, split: str) -> ImageDataset:
    """The ``dataset`` node (its ``hints`` are for the backbone config and ``cache`` for the trainer, not the
    constructor)."""
    plain = {k: v for k, v in to_plain(node).items() if k not in ("hints", "cache")}
    return build(plain, split=split)


def build_backbone(node: Any) -> nn.Module:
    return build(node)


def build_algorithm(cfg: TrainConfig, num_samples: int) -> Algorithm:
    """The algorithm around a fresh backbone, with its state sized for ``num_samples`` images
    (``setup``), checked against the number of views ``algo.views`` declares."""
    algo = build(cfg.algo.model, backbone=build_backbone(cfg.backbone))
    if not isinstance(algo, Algorithm):
        raise ConfigError(f"algo.model._target_ builds a {type(algo).__name__}, not a selfsup Algorithm")
    views = count_views(cfg.algo.views)
    if views != algo.num_views:
        raise ConfigError(
            f"{type(algo).__name__} takes {algo.num_views} view(s) per image but algo.views declares "
            f"{views}; fix the views' copies"
        )
    algo.setup(num_samples)
    return algo


def view_pipelines(cfg: TrainConfig) -> list[ViewPipeline]:
    """One :class:`ViewPipeline` per run of a declared view (``copies`` each), in the order the algorithm
    receives their outputs."""
    return [ViewPipeline(spec) for spec in expand_views(cfg.algo.views)]
