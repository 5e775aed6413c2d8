"""t-SNE of a checkpoint's backbone features, one picture per stage (MMSelfSup's
``tools/analysis_tools/visualize_tsne.py``)::

    python -m selfsup.tools.tsne ckpt=outputs/simclr/<run>/last.pt                 # its own dataset, held-out split
    python -m selfsup.tools.tsne ckpt=... stages=[layer4] per_class=50 init=pca
    python -m selfsup.tools.tsne ckpt=... dataset=imagefolder dataset.root=<folder> dataset.val_fraction=0.1
    python -m selfsup.tools.tsne ckpt=zoo/r50.pth backbone=resnet50 dataset=cifar10 dataset.root=<folder>

What is embedded: the images of ``split`` (``val``, the labelled held-out split, as MMSelfSup uses ImageNet
val; or ``train``) of ``dataset`` (default: the checkpoint's own), keeping the classes with label
< ``max_classes`` (20, as MMSelfSup's ``--max-num-class``; 0 = all) and at most ``per_class`` images of
each (100, as mmpretrain's ``--max-num-samples``; 0 = all), drawn at random with ``seed`` (the same images
on every run). An unlabelled dataset (a flat image folder) has no held-out split: pass ``split=train``;
its images form one group, capped at ``per_class x max_classes`` images, drawn in one colour without legend.

Features: every stage of ``stages`` (default all: ResNet ``stem, layer1 .. layer4`` = MMSelfSup's
``feat1 .. feat5``; ViT ``block1 .. blockN``; ``last`` = the final one) in one forward pass of the
dataset's deterministic evaluation transform; a ResNet stage's map is average-pooled, a ViT block's tokens
go through the final LayerNorm and give the CLS token (``token=cls``) or the patch-token mean
(``token=mean``). See :func:`selfsup.eval.features.stage_features`.

t-SNE: scikit-learn's ``TSNE(n_components=2, perplexity, early_exaggeration, learning_rate, max_iter,
init, random_state=seed)`` on the raw features, with MMSelfSup's defaults perplexity 30, early
exaggeration 12, learning rate 200, 1000 iterations (250 is scikit-learn's minimum), init ``random``
(``pca`` is more stable across seeds). The perplexity must be below the number of images.

Written to ``out`` (default ``<checkpoint folder>/tsne``): ``features/<stage>.npy`` (the raw features
[N, D]), ``features/labels.npy`` [N] (-1 = unlabelled), ``features/indices.npy`` [N] (the images' positions
in the split), ``features/<stage>_tsne.npy`` (the embedding [N, 2]) and ``<stage>.png`` (1000 x 1000 px:
one dot per image, coloured by class with tab10 / tab20, a legend of class names, or indices where the
dataset names none). Every key, type and default: ``python -m selfsup.tools.tsne --cfg``.

Bad input (missing checkpoint, unknown stage, too few images for the perplexity, unknown option) prints
one line ``selfsup: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from selfsup.config import compose_tool
from selfsup.data.datasets import ImageDataset
from selfsup.errors import ConfigError, DataError
from selfsup.eval.encoder import EvalConfig, check_checkpoint_arg, default_out, eval_datasets, load_encoder
from selfsup.eval.features import check_stages, extract_named_features, stage_features, stage_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("selfsup")
CONFIG_NAME = "tsne"
FIGSIZE = (10.0, 10.0)  # inches, as MMSelfSup; at DPI the PNG is 1000 x 1000 pixels
DPI = 100
MAX_LEGEND = 40  # more classes than this: no legend (it would cover the picture)


@dataclass
class TSNEConfig(EvalConfig):
    """``python -m selfsup.tools.tsne`` (defaults: MMSelfSup's ``visualize_tsne.py``)."""

    stages: list[str] | None = None  # None = every stage of the backbone; names as stage_names(), or last
    token: str = "cls"  # ViT stages: cls (the CLS token) | mean (mean of the patch tokens); unused for a ResNet
    split: str = "val"  # val (labelled held-out split) | train
    per_class: int = 100  # at most this many images of each class (0 = all)
    max_classes: int = 20  # keep the classes with label < max_classes (0 = all)
    perplexity: float = 30.0
    early_exaggeration: float = 12.0
    learning_rate: float = 200.0
    max_iter: int = 1000  # scikit-learn's n_iter before 1.5; at least 250
    init: str = "random"  # random (MMSelfSup) | pca

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"token": ("cls", "mean"), "split": ("val", "train"), "init": ("random", "pca")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be one of {', '.join(allowed)}")
        if self.per_class < 0 or self.max_classes < 0:
            raise ConfigError(
                f"per_class={self.per_class} and max_classes={self.max_classes} must be >= 0 (0 = no limit)"
            )
        if not self.perplexity > 0:
            raise ConfigError(f"perplexity must be > 0, got {self.perplexity}")
        if not self.early_exaggeration >= 1:
            raise ConfigError(f"early_exaggeration must be >= 1, got {self.early_exaggeration}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_iter < 250:
            raise ConfigError(f"max_iter must be >= 250 (scikit-learn's minimum), got {self.max_iter}")


class Selection(ImageDataset):
    """The images ``indices`` of ``base``; item j is ``base[indices[j]]`` with index j (its row in the
    features :func:`~selfsup.eval.features.extract_named_features` returns)."""

    def __init__(self, base: ImageDataset, indices: np.ndarray) -> None:
        super().__init__(base.image_size, base.mean, base.std)
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.num_classes = base.num_classes

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        return self.base.eval_transform()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Tensor, int, int]:
        image, label, _ = self.base[int(self.indices[j])]
        return image, label, j


def dataset_labels(dataset: ImageDataset) -> np.ndarray:
    """The label of every image, without decoding images where the dataset keeps its labels apart."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.cpu().numpy().astype(np.int64)
    samples = getattr(dataset, "samples", None)  # ImageFolder: (path, label) pairs
    if isinstance(samples, list):
        return np.array([label for _, label in samples], dtype=np.int64)
    return np.array([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


def select(labels: np.ndarray, per_class: int, max_classes: int, seed: int) -> np.ndarray:
    """Sorted positions of the images to embed: classes ``< max_classes``, at most ``per_class`` images of
    each, drawn with ``seed`` (0 = no limit). Unlabelled images (all -1) are one group of at most
    ``per_class x max_classes``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if labels.size and (labels < 0).all():
        groups, cap = [np.arange(len(labels))], per_class * max_classes
    else:
        classes = np.unique(labels[labels >= 0])
        if max_classes:
            classes = classes[classes < max_classes]
        groups, cap = [np.flatnonzero(labels == c) for c in classes], per_class
    keep = [g if not cap or len(g) <= cap else rng.choice(g, cap, replace=False) for g in groups]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def check_perplexity(perplexity: float, n: int) -> None:
    """scikit-learn's rule, named in our options: the perplexity must be below the number of images."""
    if not perplexity < n:
        raise ConfigError(
            f"perplexity={perplexity:g} must be smaller than the number of images to embed ({n}): lower "
            "perplexity, or embed more images (raise per_class or max_classes, or split=train)"
        )


def tsne_embed(features: np.ndarray, cfg: TSNEConfig) -> np.ndarray:
    """The 2-D t-SNE embedding [N, 2] of ``features`` [N, D] with ``cfg``'s options."""
    from sklearn.manifold import TSNE

    check_perplexity(cfg.perplexity, len(features))
    iters = "max_iter" if "max_iter" in inspect.signature(TSNE.__init__).parameters else "n_iter"  # < 1.5: n_iter
    options: dict[str, Any] = {iters: cfg.max_iter}
    tsne = TSNE(
        n_components=2,
        perplexity=cfg.perplexity,
        early_exaggeration=cfg.early_exaggeration,
        learning_rate=cfg.learning_rate,
        init=cfg.init,
        random_state=cfg.seed,
        **options,
    )
    return np.asarray(tsne.fit_transform(features.astype(np.float32)), dtype=np.float32)


def class_names(dataset: ImageDataset) -> list[str] | None:
    """The dataset's class names (ImageFolder's folders), or None."""
    names = getattr(dataset, "classes", None)
    if isinstance(names, Sequence) and len(names) == dataset.num_classes and names:
        return [str(n) for n in names]
    return None


def plot_embedding(xy: np.ndarray, labels: np.ndarray, names: Sequence[str] | None, title: str) -> Figure:
    """A scatter of ``xy`` [N, 2], one colour per label (tab10 up to 10 classes, tab20 up to 20, then
    turbo), with a legend of class ``names`` (or indices); unlabelled points (-1) in one colour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_axes((0.03, 0.03, 0.78, 0.91))
    classes = [int(c) for c in np.unique(labels) if c >= 0]
    if not classes:
        ax.scatter(xy[:, 0], xy[:, 1], s=15, color="tab:blue", linewidths=0)
    else:
        n = len(classes)
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
        for k, c in enumerate(classes):
            color = cmap(k) if n <= 20 else cmap(k / max(n - 1, 1))
            name = names[c] if names is not None and c < len(names) else str(c)
            pts = xy[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=15, color=color, linewidths=0, label=name)
        if n <= MAX_LEGEND:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n <= 20 else 2, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return fig


@dataclass
class Written:
    """What :func:`run` wrote."""

    out: Path
    pictures: dict[str, Path]  # stage -> PNG
    features: dict[str, Path]  # stage -> raw features .npy
    embeddings: dict[str, Path]  # stage -> t-SNE .npy
    labels: Path
    indices: Path
    images: int
    classes: int  # classes among the images (0: unlabelled)


def run(cfg: TSNEConfig) -> Written:
    """Embed ``cfg.ckpt``'s features of every stage in ``cfg.stages`` and write them (module docstring)."""
    check_checkpoint_arg(cfg.ckpt)
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(cfg.ckpt, cfg.device, cfg.backbone, cfg.precision)
    stages = check_stages(encoder.backbone, cfg.stages if cfg.stages is not None else stage_names(encoder.backbone))
    stages = list(dict.fromkeys(stages))  # last + its own name: once
    train, val = eval_datasets(cfg, encoder)
    if cfg.split == "val" and val is None:
        why = "unlabelled images" if not train.has_labels else "no held-out images (dataset.val_fraction=0?)"
        raise ConfigError(f"split=val, but the dataset has no labelled held-out split ({why}): pass split=train")
    dataset = val if val is not None and cfg.split == "val" else train
    indices = select(dataset_labels(dataset), cfg.per_class, cfg.max_classes, cfg.seed)
    if len(indices) == 0:
        raise DataError(
            f"no images to embed: the {cfg.split} split has none with a label < max_classes={cfg.max_classes}; "
            "raise max_classes (0 = all) or choose another split"
        )
    check_perplexity(cfg.perplexity, len(indices))  # before the features are extracted
    subset = Selection(dataset, indices)

    def features_of(x: Tensor) -> dict[str, Tensor]:
        return stage_features(encoder.backbone, x, stages, token=cfg.token)  # type: ignore[arg-type]

    feats, labels_t = extract_named_features(
        features_of, subset, encoder.normalize(dataset), cfg.batch_size, cfg.num_workers, encoder.autocast
    )
    labels = labels_t.cpu().numpy().astype(np.int64)
    out = default_out(cfg, "tsne")
    classes = len(np.unique(labels[labels >= 0]))
    feature_dir = out / "features"
    feature_dir.mkdir(parents=True, exist_ok=True)
    written = Written(out, {}, {}, {}, feature_dir / "labels.npy", feature_dir / "indices.npy", len(subset), classes)
    np.save(written.labels, labels)
    np.save(written.indices, indices)
    names = class_names(dataset)
    source = Path(cfg.ckpt)
    shown = f"{source.parent.name}/{source.name}" if source.parent.name else source.name
    for stage in stages:
        x = feats[stage].cpu().numpy()
        written.features[stage] = feature_dir / f"{stage}.npy"
        np.save(written.features[stage], x)
        xy = tsne_embed(x, cfg)
        written.embeddings[stage] = feature_dir / f"{stage}_tsne.npy"
        np.save(written.embeddings[stage], xy)
        what = f"{stage} ({x.shape[1]}-d{', ' + cfg.token + ' token' if stage.startswith('block') else ''})"
        title = f"t-SNE of {what} of {shown}: {len(x)} {cfg.split} images"
        fig = plot_embedding(xy, labels, names, title)
        written.pictures[stage] = out / f"{stage}.png"
        fig.savefig(written.pictures[stage], dpi=DPI)
    return written


def main(argv: list[str] | None = None) -> None:
    from selfsup.tools import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    if "--cfg" in argv:
        cfg = run_cli(lambda: compose_tool(CONFIG_NAME, TSNEConfig, [a for a in argv if a != "--cfg"]))
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    written = run_cli(lambda: run(compose_tool(CONFIG_NAME, TSNEConfig, argv)))
    of = f"{written.classes} classes" if written.classes else "unlabelled"
    print(f"t-SNE of {written.images} images ({of}), written to {written.out}:")
    for stage, png in written.pictures.items():
        print(f"  {png}  ({written.features[stage]}, {written.embeddings[stage]})")
    print(f"  {written.labels}\n  {written.indices}", flush=True)


if __name__ == "__main__":
    main()
