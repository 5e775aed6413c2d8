"""The benchmark contract: what ``python -m selfsup.benchmark bench=<name>`` gives a benchmark, and what
a benchmark gives back.

A benchmark is a class named by ``_target_`` in ``conf/bench/<name>.yaml``; its constructor arguments
are its options (a typed schema is generated from the signature, as for algorithms). ``run(ctx)``
returns flat metrics ``{name: number}``; ``headline`` names the one printed and put in the markdown row.
:class:`BenchContext` holds the encoder, the two labelled splits, the output folder and the shared
options, and caches extracted features, so a benchmark that reads the same features twice pays once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from selfsup.data.datasets import ImageDataset
from selfsup.eval.features import POOLED, extract_named_features, stage_fn

if TYPE_CHECKING:  # selfsup.config imports this package (KNNConfig); the encoder imports selfsup.config
    from selfsup.eval.encoder import Encoder, EvalConfig

log = logging.getLogger("selfsup")


@dataclass
class BenchContext:
    encoder: Encoder
    train: ImageDataset  # labelled: the probe / classifier / kNN bank trains on it
    val: ImageDataset  # labelled, disjoint from train: every reported number is measured on it
    out: Path  # the work dir (JSON, markdown, subsets, classifier weights)
    cfg: EvalConfig
    _cache: dict[tuple[int, tuple[str, ...], str], tuple[dict[str, Tensor], Tensor]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def features(
        self, dataset: ImageDataset, stages: Sequence[str] = (POOLED,), token: str = "cls"
    ) -> tuple[dict[str, Tensor], Tensor]:
        """({stage: [N, D] float32}, labels [N]) of ``dataset`` through the frozen encoder (eval mode,
        deterministic eval transform), one forward pass for all ``stages``. ``pooled`` is the
        encoder's own feature; other names are backbone stages (``stem``, ``layer1`` .. ``layer4`` of a
        ResNet; ``block1`` .. ``blockN`` of a ViT; ``last``)."""
        names = tuple(stages)
        key = (id(dataset), names, token)
        if key not in self._cache:
            enc = self.encoder
            fn = stage_fn(enc.extract, enc.backbone, names, token)
            log.info("extracting %s features of %d images", ", ".join(names), len(dataset))
            self._cache[key] = extract_named_features(
                fn,
                dataset,
                enc.normalize(dataset),
                batch_size=self.cfg.batch_size,
                num_workers=self.cfg.num_workers,
                autocast=enc.autocast,
            )
        return self._cache[key]


class Benchmark:
    """Base class of the benchmarks (see the module docstring)."""

    name: ClassVar[str] = "benchmark"
    headline: ClassVar[str] = "top1"  # the metric printed and put in the markdown row

    def run(self, ctx: BenchContext) -> dict[str, Any]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options as given (for the JSON record)."""
        return dict(vars(self))
