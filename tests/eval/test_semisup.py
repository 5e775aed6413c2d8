"""bench=semisup: fixed, stratified, saved labelled subsets; the lr grid; never training on held-out images."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from selfsup.benchmark import BenchmarkConfig, main, run
from selfsup.config import compose_tool
from selfsup.data.datasets import Digits
from selfsup.errors import ConfigError, DataError
from selfsup.eval.encoder import eval_datasets, load_encoder
from selfsup.eval.semisup import SemiSupervisedBenchmark, labelled_subset, read_subset, stratified_subset

FAKE = ["dataset=fake", "dataset.num_samples=64", "dataset.image_size=32", "dataset.num_classes=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    return Digits("train").labels.numpy()  # 1437 images, 10 classes of 138 .. 146


def counts(labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.bincount(labels[index], minlength=labels.max() + 1)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37])
def test_subsets_are_stratified_and_of_the_right_size(digit_labels, fraction):
    index = stratified_subset(digit_labels, fraction, seed=0)
    assert len(index) == round(fraction * len(digit_labels))  # 14 / 144 / 532 of 1437
    assert len(np.unique(index)) == len(index) and (np.diff(index) > 0).all()
    per_class = counts(digit_labels, index)
    assert (per_class >= 1).all()
    assert np.abs(per_class - fraction * np.bincount(digit_labels)).max() < 1.0 + 1e-9


def test_subsets_of_unbalanced_classes():
    labels = np.repeat(np.arange(4), [400, 50, 5, 1])
    index = stratified_subset(labels, 0.01, seed=3)
    assert counts(labels, index).tolist() == [4, 1, 1, 1]  # at least one of every class (7 > 1% of 456)
    index = stratified_subset(labels, 0.5, seed=3)
    assert counts(labels, index).tolist() == [200, 25, 2, 1] and len(index) == round(0.5 * 456)
    labels = np.repeat(np.arange(3), [13, 7, 5])  # 20%: 2.6 + 1.4 + 1.0 = 5 -> the largest remainder gets the 5th
    assert counts(labels, stratified_subset(labels, 0.2, seed=0)).tolist() == [3, 1, 1]
    assert len(stratified_subset(labels, 1.0, seed=0)) == len(labels)


def test_subset_seed_picks_other_images(digit_labels):
    a, b = stratified_subset(digit_labels, 0.1, seed=0), stratified_subset(digit_labels, 0.1, seed=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, stratified_subset(digit_labels, 0.1, seed=0))
    assert np.array_equal(counts(digit_labels, a), counts(digit_labels, b))


def test_subset_is_saved_then_reused(tmp_path):
    data = Digits("train")
    index, path = labelled_subset(data, "digits", 0.01, 0, tmp_path)
    assert path == tmp_path / "digits_1pct_seed0.txt"
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [int(v) for v in lines] == index.tolist() and len(index) == 14
    assert labelled_subset(data, "digits", 0.1, 0, tmp_path)[1].name == "digits_10pct_seed0.txt"
    # the saved file wins over a new draw (a hand-made list is used as it is)
    path.write_text("# my images\n3\n1\n2\n")
    assert labelled_subset(data, "digits", 0.01, 0, tmp_path)[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "match"),
    [("0\n1437\n", r"outside \[0, 1437\) \(e.g. 1437\)"), ("0\n0\n", "repeated"), ("# nothing\n", "no index")],
)
def test_subset_file_that_does_not_fit_is_an_error(tmp_path, text, match):
    path = tmp_path / "digits_1pct_seed0.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_subset(path, 1437)
    assert "delete it" in str(err.value)
    path.write_text("0\nseven\n")
    with pytest.raises(DataError, match="line 2: 'seven' is not an image index"):
        read_subset(path, 1437)


def test_semisup_end_to_end(simclr_digits_ckpt, tmp_path, training_loaders):
    loaders = training_loaders
    options = ["bench=semisup", "bench.fractions=[0.25,0.5]", "bench.lrs=[0.05]", "bench.head_lr_mults=[1,10]"]
    cfg = compose_tool(
        "benchmark",
        BenchmarkConfig,
        [f"ckpt={simclr_digits_ckpt}", "device=cpu", f"out={tmp_path}", *FAKE, *options, "bench.epochs=1"],
    )
    record = run(cfg)
    m = record["metrics"]
    grid = {"top1_25pct_lr0.05_x1", "top1_25pct_lr0.05_x10", "top1_50pct_lr0.05_x1", "top1_50pct_lr0.05_x10"}
    assert grid <= set(m) and record["headline"] == "top1_50pct"
    for name in ("25pct", "50pct"):
        assert m[f"top1_{name}"] == max(m[f"top1_{name}_lr0.05_x1"], m[f"top1_{name}_lr0.05_x10"])
        assert m[f"best_lr_{name}"] == 0.05 and m[f"best_head_lr_mult_{name}"] in (1.0, 10.0)
    assert (m["images_25pct"], m["images_50pct"]) == (16.0, 32.0)
    files = sorted(p.name for p in (tmp_path / "subsets").iterdir())
    assert files == ["fakeimages_25pct_seed0.txt", "fakeimages_50pct_seed0.txt"]
    # every fine-tuning trained on its saved subset of the training split, never on a held-out image
    train_set, val_set = eval_datasets(cfg, load_encoder(cfg.ckpt, "cpu"))
    assert len(loaders) == 4
    for (dataset, idx), name in zip(loaders, ["25pct", "25pct", "50pct", "50pct"], strict=True):
        assert type(dataset).__name__ == "FakeImages" and len(dataset) == len(train_set) == 64
        assert idx == read_subset(tmp_path / "subsets" / f"fakeimages_{name}_seed0.txt", 64).tolist()

    def digest(ds, i):
        return hashlib.sha1(ds[i][0].numpy().tobytes()).hexdigest()

    seen = {digest(dataset, i) for dataset, idx in loaders for i in idx}
    assert seen.isdisjoint({digest(val_set, i) for i in range(len(val_set))})


def test_fraction_out_of_range_is_one_error_line(simclr_digits_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench=semisup", "bench.fractions=[0.1,1.5]", f"ckpt={simclr_digits_ckpt}", f"out={tmp_path}"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfsup: error: bench.fractions") and "(0, 1]" in lines[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": [0.0]}, "bench.fractions"),
        ({"fractions": []}, "bench.fractions"),
        ({"fractions": [0.1, 0.1]}, "twice"),
        ({"lrs": [0.1, -1.0]}, "bench.lrs"),
        ({"head_lr_mults": []}, "bench.head_lr_mults"),
        ({"epochs": 0}, "bench.epochs"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SemiSupervisedBenchmark(**kwargs)


def test_recipe_defaults():
    bench = SemiSupervisedBenchmark()
    r = bench.recipe
    assert (r.optimizer, r.momentum, r.epochs, r.milestones, r.gamma, r.batch_size) == (
        "sgd",
        0.9,
        20,
        [12.0, 16.0],
        0.2,
        256,
    )
    assert (bench.weight_decay_for(0.01), bench.weight_decay_for(0.1)) == (5e-4, 1e-4)
    assert bench.lrs == [0.1, 0.01, 0.001] and bench.head_lr_mults == [1.0, 10.0, 100.0]
    assert bench.headline == "top1_10pct"
