"""Datasets: sizes, splits, item format, ImageFolder on real CIFAR-10 JPEGs and bad input."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data.datasets import CIFAR10, Digits, FakeImages, ImageFolder, stratified_split
from selfsup.errors import ConfigError, DataError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _check_item(item, size: int, num_classes: int, position: int) -> None:
    image, label, index = item
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, size, size)
    assert isinstance(label, int) and 0 <= label < num_classes
    assert index == position


def _copy_tree(src: Path, dst: Path, classes: list[str], per_class: int) -> Path:
    for cls in classes:
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / cls / f.name)
    return dst


# ------------------------------------------------------------------------------------ splits


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(4), 25)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(train) == 80 and len(val) == 20
    assert set(train).isdisjoint(val) and sorted([*train, *val]) == list(range(100))
    assert np.bincount(labels[val]).tolist() == [5, 5, 5, 5]
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], val)


def test_stratified_split_zero_and_invalid_fraction():
    labels = np.repeat(np.arange(2), 5)
    train, val = stratified_split(labels, 0.0, seed=0)
    assert len(train) == 10 and len(val) == 0
    with pytest.raises(ConfigError, match=r"dataset.val_fraction must be in \[0, 1\), got 1.0"):
        stratified_split(labels, 1.0, seed=0)


def test_stratified_split_that_leaves_nothing_to_train_on():
    labels = np.repeat(np.arange(2), 5)
    with pytest.raises(ConfigError, match="holds out 10 of the 10 images and leaves none to train on"):
        stratified_split(labels, 0.95, seed=0)
    with pytest.raises(ConfigError, match="cannot hold out a class-stratified dataset.val_fraction=0.1 of 10 images"):
        stratified_split(labels, 0.1, seed=0)  # 1 held-out image cannot represent 2 classes


# ------------------------------------------------------------------------------------ Digits


@pytest.fixture(scope="module")
def digits():
    return Digits("train"), Digits("val")


def test_digits_sizes_and_stratified_val(digits):
    train, val = digits
    assert len(train) + len(val) == 1797
    assert len(val) == 360  # ceil(0.2 * 1797)
    assert train.num_classes == val.num_classes == 10 and train.has_labels
    val_counts = np.bincount(val.labels.numpy(), minlength=10)
    all_counts = val_counts + np.bincount(train.labels.numpy(), minlength=10)
    assert np.allclose(val_counts / all_counts, 0.2, atol=0.02)


def test_digits_items(digits):
    train, val = digits
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape) == (len(train), 3, 32, 32)
    assert set(train.labels.tolist()) == set(range(10)) == set(val.labels.tolist())
    for ds in (train, val):
        for pos in (0, 7, len(ds) - 1):
            _check_item(ds[pos], 32, 10, pos)
    image = train[0][0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey repeated to RGB
    assert int(image.max()) > 128 and int(image.min()) == 0
    # eval transform is the identity at the native resolution
    assert train.eval_transform()(image) is image


def test_digits_other_image_size_and_no_val():
    ds = Digits("train", image_size=16, val_fraction=0.0)
    assert len(ds) == 1797
    _check_item(ds[5], 16, 10, 5)
    assert len(Digits("val", image_size=16, val_fraction=0.0)) == 0


def test_digits_rejects_bad_split_and_size():
    with pytest.raises(ValueError, match="split"):
        Digits("test")
    with pytest.raises(ConfigError, match="image_size"):
        Digits("train", image_size=4)


# ------------------------------------------------------------------------------------ FakeImages


def test_fake_images_deterministic_for_a_seed():
    a, b = FakeImages("train", num_samples=32, seed=3), FakeImages("train", num_samples=32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, FakeImages("train", num_samples=32, seed=4).images)
    val = FakeImages("val", num_samples=32, seed=3)
    assert not torch.equal(a.images[: len(val)], val.images)  # val images are not training images


def test_fake_images_sizes_and_balance():
    train = FakeImages("train", num_samples=64, num_classes=4, image_size=24, val_fraction=0.25)
    val = FakeImages("val", num_samples=64, num_classes=4, image_size=24, val_fraction=0.25)
    assert len(train) == 64 and len(val) == 16
    assert np.bincount(train.labels.numpy()).tolist() == [16] * 4
    assert np.bincount(val.labels.numpy()).tolist() == [4] * 4
    for ds in (train, val):
        _check_item(ds[3], 24, 4, 3)


def test_fake_images_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="num_samples"):
        FakeImages(num_samples=0)


def test_fake_images_val_fraction_zero_gives_empty_val():
    assert len(FakeImages("val", num_samples=16, val_fraction=0.0)) == 0


# ------------------------------------------------------------------------------------ ImageFolder


def test_imagefolder_class_folders(cifar_folder):
    ds = ImageFolder(str(cifar_folder), image_size=32)
    assert ds.classes == CLASSES and ds.num_classes == 10 and ds.has_labels
    assert len(ds) == 300
    assert np.bincount([y for _, y in ds.samples]).tolist() == [30] * 10
    for pos in (0, 150, 299):
        _check_item(ds[pos], 32, 10, pos)
    assert ds[299][1] == 9
    assert len(ImageFolder(str(cifar_folder), split="val")) == 0  # val_fraction 0: no held-out split


def test_imagefolder_val_fraction_is_stratified_and_disjoint(cifar_folder):
    train = ImageFolder(str(cifar_folder), "train", image_size=32, val_fraction=0.2)
    val = ImageFolder(str(cifar_folder), "val", image_size=32, val_fraction=0.2)
    assert len(train) == 240 and len(val) == 60
    train_paths, val_paths = {p for p, _ in train.samples}, {p for p, _ in val.samples}
    assert train_paths.isdisjoint(val_paths) and len(train_paths | val_paths) == 300
    assert np.bincount([y for _, y in val.samples]).tolist() == [6] * 10
    assert val.num_classes == 10
    _check_item(val[59], 32, 10, 59)
    other = ImageFolder(str(cifar_folder), "val", image_size=32, val_fraction=0.2, split_seed=1)
    assert {p for p, _ in other.samples} != val_paths


def test_imagefolder_val_root(cifar_folder, tmp_path):
    val_root = _copy_tree(cifar_folder, tmp_path / "val", CLASSES, per_class=2)
    train = ImageFolder(str(cifar_folder), "train", image_size=32, val_root=str(val_root), val_fraction=0.2)
    val = ImageFolder(str(cifar_folder), "val", image_size=32, val_root=str(val_root))
    assert len(train) == 300  # a separate val_root: the whole root is for training
    assert len(val) == 20 and val.classes == train.classes
    assert all(Path(p).is_relative_to(val_root) for p, _ in val.samples)
    _check_item(val[19], 32, 10, 19)


def test_imagefolder_val_root_with_other_classes_raises(cifar_folder, tmp_path):
    val_root = _copy_tree(cifar_folder, tmp_path / "val", CLASSES[:3], per_class=2)
    with pytest.raises(DataError, match="val_root"):
        ImageFolder(str(cifar_folder), "val", val_root=str(val_root))


def test_imagefolder_flat_folder_is_unlabelled(cifar_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for cls in CLASSES[:2]:
        for f in sorted((cifar_folder / cls).iterdir())[:5]:
            shutil.copy(f, flat / f"{cls}_{f.name}")
    (flat / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(flat), image_size=32)
    assert ds.num_classes == 0 and not ds.has_labels and ds.classes == []
    assert len(ds) == 10
    image, label, index = ds[4]
    assert label == -1 and index == 4 and tuple(image.shape) == (3, 32, 32) and image.dtype == torch.uint8
    assert len(ImageFolder(str(flat), "val", image_size=32)) == 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagefolder_val_fraction_on_a_flat_folder_raises(cifar_folder, tmp_path, split):
    """A held-out part of unlabelled images cannot feed the kNN monitor: say so instead of ignoring it."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((cifar_folder / CLASSES[0]).iterdir())[:4]:
        shutil.copy(f, flat / f.name)
    message = (
        f"dataset.val_fraction=0.2 needs class folders to hold out a labelled split, but {flat} is a flat folder "
        "of unlabelled images; set dataset.val_fraction=0 (the kNN monitor is then off)"
    )
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        ImageFolder(str(flat), split, val_fraction=0.2)


@pytest.mark.parametrize("size", [24, 32, 48])
def test_imagefolder_eval_transform_output_size(cifar_folder, size):
    ds = ImageFolder(str(cifar_folder), image_size=size)
    out = ds.eval_transform()(ds[0][0])
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, size, size)
    wide = torch.randint(0, 256, (3, 20, 50), dtype=torch.uint8)  # non-square input
    assert tuple(ds.eval_transform()(wide).shape) == (3, size, size)


def test_imagefolder_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        ImageFolder(str(missing))
    assert str(missing) in str(e.value)


def test_imagefolder_empty_root(tmp_path):
    with pytest.raises(DataError, match="holds no images") as e:
        ImageFolder(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_imagefolder_only_non_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="holds no images"):
        ImageFolder(str(tmp_path))


def test_imagefolder_bad_on_bad_image_value(tmp_path):
    with pytest.raises(ConfigError, match="dataset.on_bad_image='ignore' must be 'skip' or 'error'"):
        ImageFolder(str(tmp_path), on_bad_image="ignore")


@pytest.fixture
def folder_with_corrupt(cifar_folder, tmp_path) -> tuple[Path, Path]:
    root = _copy_tree(cifar_folder, tmp_path / "data", CLASSES[:2], per_class=3)
    bad = root / CLASSES[0] / "0000_bad.jpg"  # inside the first class folder, a readable image after it
    bad.write_bytes(b"this is not a jpeg" * 20)
    return root, bad


def test_imagefolder_corrupt_image_skipped_and_counted(folder_with_corrupt, caplog):
    root, bad = folder_with_corrupt
    ds = ImageFolder(str(root), image_size=32, on_bad_image="skip")
    pos = [p for p, _ in ds.samples].index(str(bad))
    assert ds.unreadable.dtype == torch.uint8 and tuple(ds.unreadable.shape) == (len(ds),)
    assert ds.unreadable.is_shared() and ds.unreadable_count() == 0 and ds.new_unreadable() == []
    with caplog.at_level(logging.DEBUG, logger="selfsup"):
        image, label, index = ds[pos]
        again = ds[pos]
    assert index == pos and label == ds.samples[pos + 1][1]
    assert torch.equal(image, ds[pos + 1][0]) and torch.equal(again[0], image)  # the next readable image
    assert not caplog.records  # no message per item: the trainer reports the totals
    assert ds.unreadable.tolist() == [int(i == pos) for i in range(len(ds))]
    assert ds.unreadable_count() == 1  # read twice, counted once
    assert ds.new_unreadable() == [str(bad)]
    assert ds.new_unreadable() == []  # reported once
    assert ds.unreadable_count() == 1


def test_imagefolder_unreadable_files_seen_through_loader_workers(cifar_folder, tmp_path):
    """Workers flag unreadable files in shared memory: the main process gets each path once, and the total."""
    from torch.utils.data import DataLoader

    root = _copy_tree(cifar_folder, tmp_path / "data", CLASSES[:3], per_class=4)
    bad = [root / CLASSES[0] / "0000_bad.jpg", root / CLASSES[2] / "0000_bad.png"]
    bad[0].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 10)
    bad[1].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ImageFolder(str(root), image_size=32)
    paths = [p for p, _ in ds.samples]
    bad_pos = [paths.index(str(b)) for b in bad]
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    for epoch in range(2):
        images, labels, index = (torch.cat(t) for t in zip(*loader))
        assert index.tolist() == list(range(len(ds)))
        for pos in bad_pos:  # the substitute: the next (readable) image of the same class
            assert torch.equal(images[pos], images[pos + 1]) and labels[pos] == labels[pos + 1]
            assert images[pos].float().std() > 0
        assert ds.new_unreadable() == ([str(b) for b in bad] if epoch == 0 else [])
        assert ds.unreadable_count() == 2
    assert ds.unreadable.nonzero().flatten().tolist() == bad_pos


def test_imagefolder_corrupt_image_error(folder_with_corrupt):
    root, bad = folder_with_corrupt
    ds = ImageFolder(str(root), image_size=32, on_bad_image="error")
    pos = [p for p, _ in ds.samples].index(str(bad))
    assert ds[pos + 1][2] == pos + 1  # readable images still load
    with pytest.raises(DataError, match="cannot read image .*; remove it or set dataset.on_bad_image=skip") as e:
        ds[pos]
    assert str(bad) in str(e.value)
    assert ds.unreadable_count() == 1


def test_imagefolder_skipped_image_still_fills_its_feature_row(folder_with_corrupt):
    from selfsup.data.views import Normalize
    from selfsup.eval.features import extract_features

    root, _ = folder_with_corrupt
    ds = ImageFolder(str(root), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    norm = Normalize(ds.mean, ds.std, torch.device("cpu"))
    feats, labels = extract_features(lambda x: x.mean(dim=(2, 3)) + 1.0, ds, norm, batch_size=4)
    assert (labels >= 0).all() and (feats != 0).all()


def test_imagefolder_all_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"junk")
    ds = ImageFolder(str(tmp_path), image_size=32)
    with pytest.raises(DataError, match="consecutive unreadable images"):
        ds[0]
    assert ds.unreadable_count() == 3 and sorted(ds.new_unreadable()) == sorted(p for p, _ in ds.samples)


# ------------------------------------------------------------------------------------ ImageFolder: folder layout


def _make_images(folder: Path, n: int, ext: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((4, 4, 3), 37 * i % 256, np.uint8)).save(folder / f"{i:02d}{ext}")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "selfsup"]


def test_scan_ignores_hidden_folders_and_files_silently(tmp_path, caplog):
    _make_images(tmp_path / "b", 2)
    _make_images(tmp_path / "a", 3)
    _make_images(tmp_path / ".ipynb_checkpoints", 2)  # not a class
    _make_images(tmp_path / "a" / ".thumbs", 2)  # not images of class a
    (tmp_path / "a" / "._00.png").write_bytes(b"macOS resource fork")  # an AppleDouble file, not an image
    (tmp_path / "b" / "labels.csv").write_text("x,y\n")  # non-image files: ignored
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["a", "b"] and len(ds) == 5
    relative = [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in ds.samples]
    assert relative == [("a/00.png", 0), ("a/01.png", 0), ("a/02.png", 0), ("b/00.png", 1), ("b/01.png", 1)]
    assert _warnings(caplog) == []


def test_scan_finds_images_in_nested_class_sub_folders(tmp_path):
    _make_images(tmp_path / "a" / "2024", 2, ".JPG")
    _make_images(tmp_path / "b", 1)
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["a", "b"] and [y for _, y in ds.samples] == [0, 0, 1]


def test_scan_warns_once_about_empty_class_folders(tmp_path, caplog):
    _make_images(tmp_path / "cat", 2)
    _make_images(tmp_path / "dog", 2)
    (tmp_path / "emu").mkdir()
    (tmp_path / "yak").mkdir()
    (tmp_path / "yak" / "notes.txt").write_text("no images here")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 4
    assert _warnings(caplog) == [
        f"ignoring 2 sub-folders of {tmp_path} that hold no images and are not classes: emu, yak"
    ]


def test_scan_warns_once_about_images_next_to_class_folders(tmp_path, caplog):
    _make_images(tmp_path / "cat", 2)
    _make_images(tmp_path / "dog", 2)
    _make_images(tmp_path, 3, ".jpg")  # stray images at the top level
    (tmp_path / "README.md").write_text("not an image: ignored silently")
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        train = ImageFolder(str(tmp_path), "train", val_fraction=0.5)
    assert train.classes == ["cat", "dog"] and all(Path(p).parent != tmp_path for p, _ in train.samples)
    assert _warnings(caplog) == [
        f"ignoring 3 image files at the top level of {tmp_path}, next to its class folders (e.g. 00.jpg); "
        "move them into a class folder to use them"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        ImageFolder(str(tmp_path), "val", val_fraction=0.5)  # the other split: its own report, once
    assert len(_warnings(caplog)) == 1


def test_scan_names_at_most_five_empty_folders(tmp_path, caplog):
    _make_images(tmp_path / "zz", 1)
    for i in range(7):
        (tmp_path / f"empty{i}").mkdir()
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        ImageFolder(str(tmp_path))
    (message,) = _warnings(caplog)
    assert message.startswith(f"ignoring 7 sub-folders of {tmp_path} that hold no images")
    assert message.endswith("empty0, empty1, empty2, empty3, empty4 and 2 more")


def test_scan_flat_folder_with_an_empty_sub_folder(tmp_path, caplog):
    _make_images(tmp_path, 3)
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        ds = ImageFolder(str(tmp_path))
    assert ds.classes == [] and len(ds) == 3 and [y for _, y in ds.samples] == [-1] * 3
    assert _warnings(caplog) == [f"ignoring 1 sub-folder of {tmp_path} that holds no images and is not a class: empty"]


def test_scan_returns_samples_and_classes(tmp_path):
    _make_images(tmp_path / "a", 1)
    samples, classes = ImageFolder.scan(str(tmp_path))
    assert classes == ["a"] and samples == [(str(tmp_path / "a" / "00.png"), 0)]


# ------------------------------------------------------------------------------------ ImageFolder: held-out split


def test_imagefolder_single_image_class_with_val_fraction_raises(tmp_path):
    _make_images(tmp_path / "cat", 5)
    _make_images(tmp_path / "dog", 1)
    message = (
        f"dataset.val_fraction=0.2 holds out part of every class, but 1 class folder of {tmp_path} holds a "
        "single image (dog); add images to it, remove it, or set dataset.val_fraction=0 (the kNN monitor is then off)"
    )
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        ImageFolder(str(tmp_path), "train", val_fraction=0.2)
    assert len(ImageFolder(str(tmp_path), "train", val_fraction=0.0)) == 6  # without a held-out split: fine


def test_imagefolder_single_image_classes_named_up_to_three(tmp_path):
    _make_images(tmp_path / "big", 20)
    for name in ("e", "d", "c", "b", "a"):
        _make_images(tmp_path / name, 1)
    message = (
        f"5 class folders of {tmp_path} hold a single image (a, b, c and 2 more); "
        "add images to them, remove them, or set dataset.val_fraction=0"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImageFolder(str(tmp_path), "val", val_fraction=0.5)


# ------------------------------------------------------------------------------------ CIFAR10


def test_cifar10_missing_root_raises_without_downloading(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10 as TVCIFAR10

    def no_download(self):
        raise AssertionError("CIFAR10 must not download without dataset.download=true")

    monkeypatch.setattr(TVCIFAR10, "download", no_download)
    root = str(tmp_path)
    message = (
        f"dataset.root={root} holds no CIFAR-10 (expected {root}/cifar-10-batches-py); point dataset.root at the "
        "folder that contains cifar-10-batches-py, or add dataset.download=true"
    )
    with pytest.raises(DataError, match=re.escape(message)) as e:
        CIFAR10(root)
    assert str(e.value) == message
    assert list(tmp_path.iterdir()) == []


def test_cifar10_incomplete_folder(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"partial download")
    root = str(tmp_path)
    message = (
        f"dataset.root={root} holds an incomplete or corrupted CIFAR-10 in {root}/cifar-10-batches-py; "
        "delete that folder and add dataset.download=true, or point dataset.root at a complete copy"
    )
    with pytest.raises(DataError, match=re.escape(message)) as e:
        CIFAR10(root)
    assert str(e.value) == message


def test_cifar10_bad_val_split(tmp_path):
    with pytest.raises(ConfigError, match="val_split"):
        CIFAR10(str(tmp_path), val_split="official")
