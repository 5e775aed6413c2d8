"""``python -m selfsup.tools.tsne``: MMSelfSup's t-SNE defaults, the image selection, one real PNG and the
features / embedding files per stage (ResNet and ViT), an embedding that keeps the classes apart, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_tool
from selfsup.config import compose_tool
from selfsup.data.datasets import Digits, ImageFolder
from selfsup.eval.encoder import load_encoder
from selfsup.eval.features import stage_features
from selfsup.tools import tsne
from selfsup.tools.tsne import TSNEConfig

RESNET18_DIMS = {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
PER_CLASS = 20  # 200 of the 360 held-out digits: a few seconds of t-SNE per stage
FAST = ["device=cpu", "max_iter=300"]  # 50 iterations after the 250 of early exaggeration already separate digits


def config(*overrides: str) -> TSNEConfig:
    return compose_tool("tsne", TSNEConfig, list(overrides))


def loo_1nn_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of ``labels`` over ``points``."""
    d = torch.cdist(torch.from_numpy(points).double(), torch.from_numpy(points).double())
    d.fill_diagonal_(float("inf"))
    return float((labels[d.argmin(1).numpy()] == labels).mean())


def write_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


# ---- options and selection (no checkpoint) -------------------------------------------------------------


def test_defaults_are_mmselfsups(capsys):
    cfg = config("ckpt=some.pt")
    assert (cfg.perplexity, cfg.max_iter, cfg.learning_rate, cfg.early_exaggeration) == (30, 1000, 200, 12)
    assert (cfg.init, cfg.max_classes, cfg.per_class, cfg.split, cfg.token) == ("random", 20, 100, "val", "cls")
    assert cfg.stages is None and cfg.dataset is None and cfg.out is None  # all stages, own dataset, <ckpt>/tsne
    tsne.main(["--cfg", "ckpt=some.pt", "stages=[layer4]"])
    shown = capsys.readouterr().out
    assert "perplexity: 30.0" in shown and "max_iter: 1000" in shown and "- layer4" in shown
    tsne.main(["--help"])
    assert "visualize_tsne.py" in capsys.readouterr().out


def test_tsne_gets_every_option(monkeypatch):
    import sklearn.manifold

    seen: dict = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, x):
            return x[:, :2]

    monkeypatch.setattr(sklearn.manifold, "TSNE", Recorder)
    cfg = config("ckpt=x.pt", "perplexity=7", "max_iter=400", "learning_rate=50", "early_exaggeration=4", "init=pca")
    out = tsne.tsne_embed(np.random.default_rng(0).normal(size=(20, 5)), cfg)
    assert out.shape == (20, 2)
    iters = seen.pop("max_iter", seen.pop("n_iter", None))
    want = dict(n_components=2, perplexity=7, learning_rate=50, early_exaggeration=4, init="pca", random_state=0)
    assert iters == 400 and seen == want
    assert {k: v for k, v in vars(config("ckpt=x.pt")).items() if k in want} == dict(
        perplexity=30, learning_rate=200, early_exaggeration=12, init="random"
    )


def test_select_caps_classes_and_images_deterministically():
    labels = np.repeat(np.arange(30), [5 + c for c in range(30)])  # class c has 5 + c images
    keep = tsne.select(labels, per_class=8, max_classes=20, seed=0)
    counts = np.bincount(labels[keep], minlength=30)
    assert set(labels[keep]) == set(range(20))  # classes < 20 only, every one of them
    assert counts[:20].tolist() == [min(5 + c, 8) for c in range(20)]
    assert (np.diff(keep) > 0).all()
    assert np.array_equal(keep, tsne.select(labels, 8, 20, seed=0))
    assert not np.array_equal(keep, tsne.select(labels, 8, 20, seed=1))
    assert len(tsne.select(labels, per_class=0, max_classes=0, seed=0)) == len(labels)
    assert set(labels[tsne.select(labels, per_class=0, max_classes=3, seed=0)]) == {0, 1, 2}


def test_select_takes_unlabelled_images_as_one_group():
    keep = tsne.select(np.full(500, -1), per_class=10, max_classes=20, seed=0)
    assert len(keep) == 200 and len(set(keep.tolist())) == 200
    assert len(tsne.select(np.full(50, -1), per_class=10, max_classes=20, seed=0)) == 50


def test_plot_colours_classes_and_names_them():
    rng = np.random.default_rng(0)
    xy, labels = rng.normal(size=(60, 2)), np.repeat([0, 2, 5], 20)
    fig = tsne.plot_embedding(xy, labels, ["a", "b", "c", "d", "e", "f"], "the title")
    ax = fig.axes[0]
    assert ax.get_title() == "the title"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "c", "f"]
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 3
    fig = tsne.plot_embedding(xy, labels, None, "t")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["0", "2", "5"]
    fig = tsne.plot_embedding(xy, np.full(60, -1), None, "t")  # unlabelled: one colour, no legend
    assert fig.axes[0].get_legend() is None and len(fig.axes[0].collections) == 1


def test_class_names_come_from_image_folders(tmp_path):
    for name in ("cat", "dog"):
        write_images(tmp_path / name, 2, seed=len(name))
    assert tsne.class_names(ImageFolder(str(tmp_path), image_size=12)) == ["cat", "dog"]
    assert tsne.class_names(Digits("val")) is None  # digits: the class index is the name


@pytest.mark.parametrize(
    "override", ["max_iter=249", "perplexity=0", "per_class=-1", "token=avg", "split=test", "init=pca2"]
)
def test_bad_options_are_config_errors(override, capsys):
    with pytest.raises(SystemExit) as e:
        tsne.main(["ckpt=x.pt", override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error: ") and len(err.splitlines()) == 1 and override.split("=")[0] in err


# ---- ResNet-18 on the held-out digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_run(simclr_digits_ckpt, tmp_path_factory):
    """Every stage of the SimCLR digits checkpoint, 20 held-out images per class; with the plot titles."""
    out = tmp_path_factory.mktemp("tsne_resnet")
    titles: dict[str, str] = {}
    plot = tsne.plot_embedding

    def recording(xy, labels, names, title):
        titles[title.split()[2]] = title  # "t-SNE of <stage> ..."
        return plot(xy, labels, names, title)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tsne, "plot_embedding", recording)
        written = tsne.run(config(f"ckpt={simclr_digits_ckpt}", f"out={out}", f"per_class={PER_CLASS}", *FAST))
    return written, titles


def test_resnet_writes_one_real_png_per_stage(resnet_run):
    written, titles = resnet_run
    assert list(written.pictures) == list(RESNET18_DIMS)  # default: all five stages, in order
    assert sorted(p.name for p in written.out.glob("*.png")) == sorted(f"{s}.png" for s in RESNET18_DIMS)
    for stage, path in written.pictures.items():
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (1000, 1000)
            rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
        assert len(colours) > 20  # dots in several colours, not a blank canvas
        assert stage in titles[stage] and "last.pt" in titles[stage] and f"{written.images} val images" in titles[stage]


def test_resnet_features_and_labels_files(resnet_run):
    written, _ = resnet_run
    labels, indices = np.load(written.labels), np.load(written.indices)
    n = written.images
    assert labels.shape == indices.shape == (n,) and n == 10 * PER_CLASS
    for stage, dim in RESNET18_DIMS.items():
        assert np.load(written.features[stage]).shape == (n, dim)
        emb = np.load(written.embeddings[stage])
        assert emb.shape == (n, 2) and np.isfinite(emb).all() and emb.std(0).min() > 0
    assert labels.min() >= 0 and labels.max() < 20 and np.bincount(labels).max() <= PER_CLASS
    val = Digits("val")  # the checkpoint's dataset, held-out split
    assert np.array_equal(labels, val.labels.numpy()[indices])  # each row's label is its image's


def test_feature_rows_are_their_images(resnet_run, simclr_digits_ckpt):
    written, _ = resnet_run
    indices = np.load(written.indices)
    rows = [0, len(indices) // 2, len(indices) - 1]
    val = Digits("val")
    images = torch.stack([val[int(indices[r])][0] for r in rows])
    enc = load_encoder(simclr_digits_ckpt, "cpu")
    want = stage_features(enc.backbone, enc.normalize(val)(images), ["stem", "layer4"])
    for stage in ("stem", "layer4"):
        got = np.load(written.features[stage])[rows]
        np.testing.assert_allclose(got, want[stage].numpy(), rtol=1e-4, atol=1e-4)


def test_embedding_keeps_digits_apart(resnet_run):
    """On the trained checkpoint, 2-D neighbours share their class far more often than chance (10%)."""
    written, _ = resnet_run
    labels = np.load(written.labels)
    accuracy = loo_1nn_accuracy(np.load(written.embeddings["layer4"]), labels)
    assert accuracy > 0.4, accuracy  # measured ~0.7; labels out of line with the features: ~0.1


# ---- ViT, the command line, errors ---------------------------------------------------------------------


def test_vit_blocks_and_token(mae_digits_ckpt, tmp_path):
    base = [f"ckpt={mae_digits_ckpt}", "per_class=4", "max_classes=10", "perplexity=10", *FAST]
    written = tsne.run(config(*base, f"out={tmp_path / 'cls'}"))
    assert list(written.pictures) == ["block1", "block2"]
    for stage in ("block1", "block2"):
        assert np.load(written.features[stage]).shape == (40, 32)
        assert np.load(written.embeddings[stage]).shape == (40, 2)
        with Image.open(written.pictures[stage]) as img:
            assert img.size == (1000, 1000)
    mean = tsne.run(config(*base, "stages=[last]", "token=mean", f"out={tmp_path / 'mean'}"))
    assert list(mean.pictures) == ["block2"]
    cls_feats, mean_feats = np.load(written.features["block2"]), np.load(mean.features["block2"])
    assert cls_feats.shape == mean_feats.shape and not np.allclose(cls_feats, mean_feats)


@pytest.mark.slow
def test_command_with_only_a_checkpoint(simclr_digits_ckpt, tmp_path):
    """``python -m selfsup.tools.tsne ckpt=PATH`` (kept small): every stage, output next to the checkpoint."""
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    shutil.copy(simclr_digits_ckpt, ckpt)
    proc = run_tool("selfsup.tools.tsne", f"ckpt={ckpt}", "per_class=4", "max_iter=250")
    assert proc.returncode == 0, proc.stderr
    out = ckpt.parent / "tsne"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{s}.png" for s in RESNET18_DIMS)
    assert f"t-SNE of 40 images (10 classes), written to {out}" in proc.stdout
    for stage in RESNET18_DIMS:
        assert str(out / f"{stage}.png") in proc.stdout
        assert (out / "features" / f"{stage}.npy").is_file() and (out / "features" / f"{stage}_tsne.npy").is_file()


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (["ckpt=nope/last.pt"], "nope/last.pt"),
        (["stages=[layer9]"], "layer9"),
        (["per_class=2"], "perplexity=30 must be smaller than the number of images to embed (20)"),
        (["dataset=digits", "dataset.val_fraction=0"], "split=train"),
        (["max_classes=0", "per_class=0", "split=train", "stages=[stem]", "bogus=1"], "bogus"),
    ],
)
def test_errors_are_one_line(simclr_digits_ckpt, tmp_path, capsys, overrides, expect):
    with pytest.raises(SystemExit) as e:
        own = [] if overrides[0].startswith("ckpt=") else [f"ckpt={simclr_digits_ckpt}"]
        tsne.main([*own, "device=cpu", f"out={tmp_path}", *overrides])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("selfsup: error: ") and expect in line
    assert not list(tmp_path.iterdir())  # failed before writing anything


def test_unlabelled_folder_is_one_colour(simclr_digits_ckpt, tmp_path, capsys):
    write_images(tmp_path / "flat", 12, seed=0)
    data = ["dataset=imagefolder", f"dataset.root={tmp_path / 'flat'}", "dataset.image_size=32"]
    with pytest.raises(SystemExit):
        tsne.main([f"ckpt={simclr_digits_ckpt}", *data, *FAST])
    assert "pass split=train" in capsys.readouterr().err
    cfg = config(f"ckpt={simclr_digits_ckpt}", *data, *FAST, "split=train", "perplexity=3", "stages=[last]")
    cfg.out = str(tmp_path / "out")
    written = tsne.run(cfg)
    assert written.classes == 0 and list(written.pictures) == ["layer4"]
    assert (np.load(written.labels) == -1).all() and np.load(written.embeddings["layer4"]).shape == (12, 2)
