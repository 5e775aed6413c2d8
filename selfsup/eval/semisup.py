"""``bench=semisup``: semi-supervised classification, OpenSelfSup / MMSelfSup 0.x's protocol
(``configs/benchmarks/classification/imagenet/imagenet_{1,10}percent``): the whole backbone plus a new
linear head fine-tuned on 1% and on 10% of the training labels, measured on the held-out split.

Recipe: SGD momentum 0.9, weight decay 5e-4 for 1% / 1e-4 for 10% (on every parameter), 20 epochs,
lr x0.2 after 60% and 80% of the run (epochs 12 and 16), batch 256, RandomResizedCrop + flip,
BatchNorm training; a grid of base lr {0.1, 0.01, 0.001} (at ``base_batch_size`` = 256 images, scaled
linearly to the batch used) x head lr multiplier {1, 10, 100}, 9 fine-tunings per fraction, each from
the same pretrained weights and the same seed. The best top-1 of the grid is reported per fraction.

Be aware: choosing the best grid point on the held-out split, as MMSelfSup does (it reports the best of
its grid on ImageNet val), selects on the split it reports and so flatters the number somewhat; the
whole grid is reported too.

Labelled subsets are fixed and saved: per class, ``fraction`` of its images (at least one; the rounding
remainder goes to the classes with the largest remainders, so the subset has round(fraction x N)
images unless there are more classes), drawn with ``subset_seed`` and written to
``<out>/subsets/<dataset>_<pct>pct_seed<subset_seed>.txt`` (indices into the training split, one per line,
``#`` comment lines). An existing file is reused as it is (so a run can be repeated or compared on the
same images, and a hand-made list can be used); indices that do not fit the training split are an error.

Metrics: ``top1_<pct>pct`` (best of the grid, e.g. ``top1_1pct``, ``top1_10pct``), its grid point
``best_lr_<pct>pct`` / ``best_head_lr_mult_<pct>pct``, ``images_<pct>pct``, and every grid point
``top1_<pct>pct_lr<lr>_x<mult>``. Headline: the last fraction's best top-1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.data.datasets import ImageDataset
from selfsup.engine.checkpoint import write_text_atomic
from selfsup.errors import ConfigError, DataError, TrainingDiverged
from selfsup.eval.bench import BenchContext, Benchmark
from selfsup.eval.finetune import trainable_copy
from selfsup.eval.supervised import (
    FineTuneClassifier,
    TrainRecipe,
    check_options,
    evaluate_on_val,
    fit_on_train,
    require_single_process,
    train_transform,
)

log = logging.getLogger("selfsup")


def pct(fraction: float) -> str:
    """0.01 -> ``1``, 0.1 -> ``10``, 0.005 -> ``0.5`` (the ``<pct>`` of names)."""
    return f"{fraction * 100:g}"


def dataset_labels(dataset: ImageDataset) -> np.ndarray:
    """The label of every image, without decoding images where the dataset lists them."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels.cpu().numpy().astype(np.int64)
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):
        return np.array([int(label) for _, label in samples], dtype=np.int64)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``fraction`` of each class (at least 1 per class), drawn with ``seed``: each
    class gets floor(fraction x its count) (at least 1), and the remaining images up to
    round(fraction x N) go one each to the classes with the largest remainders."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"a labelled fraction must be in (0, 1], got {fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    take = np.minimum(np.maximum(1, np.floor(exact)).astype(np.int64), counts)
    rest = int(round(fraction * len(labels))) - int(take.sum())
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if rest <= 0:
            break
        if take[i] < counts[i]:
            take[i] += 1
            rest -= 1
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picks))


def read_subset(path: Path, size: int) -> np.ndarray:
    """The indices listed in ``path``, checked against a training split of ``size`` images."""
    values: list[int] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            values.append(int(text))
        except ValueError:
            raise DataError(
                f"{path} line {number}: {text!r} is not an image index; the file lists indices into the training "
                "split, one per line: fix it, or delete it to draw a new subset"
            ) from None
    index = np.array(values, dtype=np.int64)
    problems = []
    if not len(index):
        problems.append("it lists no index")
    outside = index[(index < 0) | (index >= size)]
    if len(outside):
        problems.append(f"{len(outside)} indices are outside [0, {size}) (e.g. {int(outside[0])})")
    if len(np.unique(index)) != len(index):
        problems.append(f"{len(index) - len(np.unique(index))} indices are repeated")
    if problems:
        raise DataError(
            f"{path} does not fit the training split of {size} images: {'; '.join(problems)}. It was written for "
            "another dataset or edited: delete it to draw a new subset, or pass another out=<folder>"
        )
    return np.sort(index)


def labelled_subset(
    dataset: ImageDataset, tag: str, fraction: float, seed: int, folder: Path
) -> tuple[np.ndarray, Path]:
    """(indices, file) of the fixed ``fraction`` subset of ``dataset``: read from ``folder`` when its file
    exists, otherwise drawn (:func:`stratified_subset`) and written there."""
    path = folder / f"{tag}_{pct(fraction)}pct_seed{seed}.txt"
    if path.is_file():
        index = read_subset(path, len(dataset))
        log.info("semisup: reusing the %s%% subset %s (%d images)", pct(fraction), path, len(index))
        return index, path
    labels = dataset_labels(dataset)
    index = stratified_subset(labels, fraction, seed)
    folder.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {pct(fraction)}% of the labels of the training split of {tag} ({len(dataset)} images): {len(index)} "
        f"images, stratified per class (at least 1 each), subset_seed {seed}; indices into the training split\n"
    )
    write_text_atomic(header + "".join(f"{i}\n" for i in index.tolist()), path)
    log.info("semisup: drew the %s%% subset %s (%d images)", pct(fraction), path, len(index))
    return index, path


class SemiSupervisedBenchmark(Benchmark):
    """``bench=semisup`` (see the module docstring).

    Args:
        fractions: labelled fractions of the training split, each in (0, 1].
        lrs: base learning rates of the grid (at ``base_batch_size``; scaled to the batch used).
        head_lr_mults: head lr multipliers of the grid.
        epochs: per fine-tuning (reference 20).
        milestones: epochs at which the lr is multiplied by ``gamma``; ``None`` = 60% and 80% of
            ``epochs`` (the reference's 12 and 16 of 20).
        gamma: lr factor at each milestone.
        batch_size: images per step (at most the subset's size).
        weight_decay: ``None`` = 5e-4 for fractions up to 1%, 1e-4 above (the reference's two settings).
        subset_seed: which images make up each labelled subset.
        crop_scale, hflip: RandomResizedCrop scale range and flip probability.
    """

    name = "semisup"
    headline = "top1_10pct"

    def __init__(
        self,
        fractions: list[float] = [0.01, 0.1],  # noqa: B006 - Hydra passes lists
        lrs: list[float] = [0.1, 0.01, 0.001],  # noqa: B006
        head_lr_mults: list[float] = [1.0, 10.0, 100.0],  # noqa: B006
        epochs: int = 20,
        milestones: list[float] | None = None,
        gamma: float = 0.2,
        batch_size: int = 256,
        base_batch_size: int = 256,
        momentum: float = 0.9,
        weight_decay: float | None = None,
        subset_seed: int = 0,
        crop_scale: list[float] = [0.08, 1.0],  # noqa: B006
        hflip: float = 0.5,
    ) -> None:
        fractions = [float(f) for f in fractions]
        if not fractions or any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(
                f"bench.fractions must be labelled fractions in (0, 1] (0.01 = 1% of the labels), got {fractions}"
            )
        if len({pct(f) for f in fractions}) != len(fractions):
            raise ConfigError(f"bench.fractions lists a fraction twice: {fractions}")
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ConfigError(f"bench.lrs must be a non-empty list of learning rates > 0, got {list(lrs)}")
        if not head_lr_mults or any(not m > 0 for m in head_lr_mults):
            raise ConfigError(f"bench.head_lr_mults must be a non-empty list of factors > 0, got {list(head_lr_mults)}")
        check_options(
            epochs=epochs,
            batch_size=batch_size,
            weight_decay=weight_decay,
            milestones=milestones,
            crop_scale=crop_scale,
            hflip=hflip,
        )
        if not base_batch_size >= 1:
            raise ConfigError(f"bench.base_batch_size must be >= 1, got {base_batch_size}")
        if not gamma > 0:
            raise ConfigError(f"bench.gamma must be > 0, got {gamma}")
        if not 0 <= momentum <= 1:
            raise ConfigError(f"bench.momentum must be in [0, 1], got {momentum}")
        self.fractions = fractions
        self.lrs, self.head_lr_mults = [float(v) for v in lrs], [float(v) for v in head_lr_mults]
        self.weight_decay, self.subset_seed = weight_decay, int(subset_seed)
        self.crop_scale, self.hflip = [float(v) for v in crop_scale], float(hflip)
        self.recipe = TrainRecipe(
            epochs=epochs,
            batch_size=batch_size,
            optimizer="sgd",
            lr=self.lrs[0],
            base_batch_size=base_batch_size,
            momentum=momentum,
            policy="step",
            milestones=[0.6 * epochs, 0.8 * epochs] if milestones is None else [float(m) for m in milestones],
            gamma=gamma,
            no_decay_norm_bias=False,
        )
        self.headline = f"top1_{pct(fractions[-1])}pct"  # type: ignore[misc]
        self.subsets: dict[float, np.ndarray] = {}

    def weight_decay_for(self, fraction: float) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 5e-4 if fraction <= 0.01 + 1e-9 else 1e-4

    def run(self, ctx: BenchContext) -> dict[str, Any]:
        from selfsup.benchmark import dataset_name

        require_single_process(self.name)
        enc = ctx.encoder
        tag = dataset_name(ctx.train).replace(":", "_")
        transform = train_transform(ctx.train.image_size, self.crop_scale, self.hflip)
        metrics: dict[str, Any] = {}
        for fraction in self.fractions:
            index, _ = labelled_subset(ctx.train, tag, fraction, self.subset_seed, ctx.out / "subsets")
            self.subsets[fraction] = index
            name = f"{pct(fraction)}pct"
            grid: dict[tuple[float, float], float] = {}
            for lr in self.lrs:
                for mult in self.head_lr_mults:
                    point = f"lr{lr:g}_x{mult:g}"
                    recipe = self._recipe(lr, mult, fraction)
                    torch.manual_seed(ctx.cfg.seed)
                    model = FineTuneClassifier(trainable_copy(enc), ctx.num_classes).to(enc.device)
                    try:
                        fit_on_train(ctx, model, index.tolist(), recipe, transform, f"semisup {name} {point}")
                    except TrainingDiverged as e:
                        log.warning("semisup %s %s diverged, left out of the grid: %s", name, point, e)
                        continue
                    acc = evaluate_on_val(ctx, model)[model.name]["top1"]
                    grid[(lr, mult)] = acc
                    metrics[f"top1_{name}_{point}"] = acc
                    log.info("semisup %s %s: top-1 %.2f", name, point, acc)
            if not grid:
                raise TrainingDiverged(f"semisup {name}: every grid point diverged; lower bench.lrs")
            (best_lr, best_mult), best = max(grid.items(), key=lambda kv: kv[1])
            metrics[f"top1_{name}"] = best
            metrics[f"best_lr_{name}"] = best_lr
            metrics[f"best_head_lr_mult_{name}"] = best_mult
            metrics[f"images_{name}"] = float(len(index))
            diverged = len(self.lrs) * len(self.head_lr_mults) - len(grid)
            if diverged:
                metrics[f"diverged_{name}"] = float(diverged)
        return metrics

    def _recipe(self, lr: float, mult: float, fraction: float) -> TrainRecipe:
        mults = {"head.": mult} if not math.isclose(mult, 1.0) else {}
        return replace(self.recipe, lr=lr, weight_decay=self.weight_decay_for(fraction), lr_mults=mults)
